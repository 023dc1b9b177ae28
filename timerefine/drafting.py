"""Drafts of a TimeRefine answer, for greedy decoding that verifies several tokens per forward pass.

A K = 4 answer is 75 tokens with a digit-per-token tokenizer (Llama, Qwen2, our small default), and decoding
one token per forward pass made it cost 3.2x to 3.4x the 12-token direct answer on a CPU. Most of those
tokens carry no information: the grammar fixes ``From <seg_start>``, `` to ``, `` <offset> ``, `` and ``,
the separators and, for a model trained on rough segments that contain the truth, the signs; and later steps
tend to repeat the previous step's refined segment with zero offsets. ``AnswerDrafter`` writes that expected
continuation as token ids; ``TimeRefineModel.generate`` feeds it after the model's last token and keeps the
longest prefix the model itself would have chosen (its argmax at each position), plus the model's own next
token. The output is the greedy answer, token for token (up to float rounding of a multi-token forward
pass), in fewer forward passes: a draft only decides how much work one pass can confirm, never what is
generated.

The template comes from tokenizing answers written by ``format_answer``: the tokenizer must spell every
answer of K steps with the same number of tokens, one token per digit. A tokenizer that merges digits (a
BPE with "35" as one token) gets no drafter, and decoding runs one token per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from timerefine.timecodec import MAX_OFFSET, NUM_BINS, Step, format_answer

if TYPE_CHECKING:  # the jobs read DEFAULT_DRAFT_TOKENS for their --help without importing transformers
    from transformers import PreTrainedTokenizerBase

# Drafted tokens one forward pass may verify. On a CPU each costs compute, and 8 measured best among
# 4, 8, 12 and 20 (bench/infer.py); on a GPU, where a pass costs about the same for 1 or 20 tokens, more pays.
DEFAULT_DRAFT_TOKENS = 8

# Digit fields of one step, in the order they are written: rough start, rough end, start offset, end offset.
_ROUGH_START, _ROUGH_END, _OFFSET_START, _OFFSET_END = range(4)


@dataclass(frozen=True)
class _Slot:
    """A template position that the model fills: one digit of a field, or a field's sign."""

    step: int
    field: int  # _ROUGH_START ... _OFFSET_END
    kind: str  # "tens", "units" or "sign"


class AnswerDrafter:
    """Expected continuations of partial answers of exactly ``refine_steps`` steps."""

    def __init__(
        self,
        template: list[int | _Slot],
        digit_ids: dict[int, list[int]],
        sign_ids: dict[int, dict[str, int]],
    ) -> None:
        self.template = template
        self._digit_ids = digit_ids  # template position -> token id of each digit 0-9 there
        self._digit_values = {pos: {tok: d for d, tok in enumerate(ids)} for pos, ids in digit_ids.items()}
        self._sign_ids = sign_ids  # template position -> {"+": id, "-": id}
        self._sign_values = {pos: {tok: s for s, tok in ids.items()} for pos, ids in sign_ids.items()}

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, refine_steps: int) -> AnswerDrafter | None:
        """The drafter for answers of ``refine_steps`` steps, or None when the tokenizer does not spell them
        with a fixed token layout (see the module docstring)."""
        if refine_steps < 1:
            raise ValueError(f"refine_steps must be >= 1, got {refine_steps}")
        direct = refine_steps == 1

        def tokens(digit: int, flip_signs: bool = False) -> list[int]:
            number = 11 * digit  # both digits the same: 00, 11, ..., 99
            offsets = (-number, number) if flip_signs else (number, -number)
            if direct:
                offsets = (0, 0)  # the direct format writes rough + offset
            steps = [Step((number, number), offsets)] * refine_steps
            return tokenizer(format_answer(steps, direct=direct), add_special_tokens=False)["input_ids"]

        # Offsets of 1 and 99 bins with flipped signs show where the signs are: "-11" and "+11" against "+11"
        # and "-11" differ only there.
        per_digit = [tokens(d) for d in range(10)]
        flipped = tokens(1, flip_signs=True)
        if any(len(t) != len(flipped) for t in per_digit):
            return None
        fields_per_step = 2 if direct else 4
        digit_positions = [i for i in range(len(flipped)) if len({t[i] for t in per_digit}) == 10]
        sign_positions = [
            i for i in range(len(flipped)) if i not in digit_positions and flipped[i] != per_digit[1][i]
        ]
        fixed_positions = set(range(len(flipped))) - set(digit_positions) - set(sign_positions)
        if (
            len(digit_positions) != 2 * fields_per_step * refine_steps
            or len(sign_positions) != (0 if direct else 2 * refine_steps)
            or any(len({t[i] for t in per_digit}) != 1 for i in fixed_positions)
        ):
            return None
        template: list[int | _Slot] = list(per_digit[0])
        for n, pos in enumerate(digit_positions):
            field_index, digit = divmod(n, 2)
            step, field = divmod(field_index, fields_per_step)
            template[pos] = _Slot(step, field, "units" if digit else "tens")
        for n, pos in enumerate(sign_positions):
            step, which = divmod(n, 2)
            template[pos] = _Slot(step, _OFFSET_START + which, "sign")
        digit_ids = {pos: [t[pos] for t in per_digit] for pos in digit_positions}
        sign_ids: dict[int, dict[str, int]] = {}
        for n, pos in enumerate(sign_positions):
            written = "+" if n % 2 == 0 else "-"  # the start offset is written "+11", the end "-11"
            other = "-" if written == "+" else "+"
            sign_ids[pos] = {written: per_digit[1][pos], other: flipped[pos]}
        return cls(template, digit_ids, sign_ids)

    def draft(self, generated: Sequence[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` ids expected after ``generated`` (the answer so far); empty when the answer
        left the template or the next token is one the drafter cannot guess (the first step's digits)."""
        values: dict[tuple[int, int], list] = {}  # (step, field) -> [sign, tens, units], None = unknown
        for pos, token in enumerate(generated):
            if pos >= len(self.template):
                return []
            expected = self.template[pos]
            if not isinstance(expected, _Slot):
                if token != expected:
                    return []
                continue
            known = self._read(pos, expected, token)
            if known is None:
                return []
            _field_value(values, expected)[_KINDS.index(expected.kind)] = known
        draft: list[int] = []
        for pos in range(len(generated), min(len(self.template), len(generated) + max_tokens)):
            expected = self.template[pos]
            if not isinstance(expected, _Slot):
                draft.append(expected)
                continue
            guess = self._guess(values, expected)
            if guess is None:
                break
            _field_value(values, expected)[_KINDS.index(expected.kind)] = guess
            ids = self._sign_ids if expected.kind == "sign" else self._digit_ids
            draft.append(ids[pos][guess])
        return draft

    def _read(self, pos: int, slot: _Slot, token: int) -> int | str | None:
        table = self._sign_values if slot.kind == "sign" else self._digit_values
        return table[pos].get(token)

    def _guess(self, values: dict, slot: _Slot) -> int | str | None:
        """A step repeats the previous step's refined segment (rough + offset) with zero offsets: that is the
        answer of a model whose earlier step was right, and it makes offsets "+00" / "-00"."""
        if slot.kind == "sign":
            return "+" if slot.field == _OFFSET_START else "-"
        if slot.field in (_OFFSET_START, _OFFSET_END):
            expected = 0
        elif slot.step == 0:
            return None  # the first segment is the model's to say
        else:
            expected = _refined(values, slot.step - 1, slot.field)
            if expected is None:
                return None
        tens, units = divmod(expected, 10)
        if slot.kind == "tens":
            return tens
        written_tens = _field_value(values, slot)[1]
        return units if written_tens == tens else None


_KINDS = ("sign", "tens", "units")


def _field_value(values: dict, slot: _Slot) -> list:
    return values.setdefault((slot.step, slot.field), [None, None, None])


def _number(values: dict, step: int, field: int) -> int | None:
    sign, tens, units = values.get((step, field), (None, None, None))
    if tens is None or units is None:
        return None
    magnitude = min(10 * tens + units, MAX_OFFSET)
    return -magnitude if sign == "-" else magnitude


def _refined(values: dict, step: int, which: int) -> int | None:
    """Rough + offset of one boundary (which: 0 start, 1 end) of ``step``, clamped to the bins."""
    rough = _number(values, step, _ROUGH_START + which)
    offset = _number(values, step, _OFFSET_START + which)
    if rough is None or offset is None:
        return None
    return max(0, min(NUM_BINS - 1, rough + offset))
