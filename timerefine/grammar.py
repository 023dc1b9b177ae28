"""The answer grammar as token ids: what greedy decoding may write next, and what it is likely to write.

A TimeRefine answer of K steps is a fixed sequence of tokens with holes: ``From <seg_start>``, `` to ``,
``<offset>``, `` and ``, the separators and ``<seg_end>`` never change, and the holes are digits (a bin
written as two digit tokens, as Llama, Qwen2 and our small default spell numbers), whole bins (one time
token each, ``<35>``), or signs. ``AnswerGrammar`` holds that template for one tokenizer and one K, read off
the tokenizer itself by spelling answers with every number, and serves two uses:

- **Constrained decoding.** ``allowed`` lists, for each answer position, the token ids that keep the answer
  inside the grammar (one id at a fixed position, ten digits, a hundred time tokens, two signs). Decoding
  that takes the model's best allowed token always ends in an answer that parses, however weak the model:
  a 2-epoch checkpoint answers with a segment instead of ``amamam...``.
- **Drafting.** A K = 4 answer is 75 tokens with digit tokens, and one token per forward pass made it cost
  3.2x to 3.4x the 12-token direct answer on a CPU. Most tokens carry no information: the fixed ones, the
  signs of a model trained on rough segments that contain the truth, and later steps, which tend to repeat
  the previous step's refined segment with zero offsets. ``draft`` writes that expected continuation;
  ``TimeRefineModel.generate`` feeds it after the model's last token and keeps the longest prefix the model
  itself would have chosen, plus the model's own next token. A draft only decides how much work one pass
  can confirm, never what is generated.

A tokenizer that spells answers of K steps with varying lengths (a BPE that merges some digit pairs) has no
grammar: decoding then runs free, one token per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from timerefine.timecodec import MAX_OFFSET, NUM_BINS, TIME_TOKENS, Step, format_answer

if TYPE_CHECKING:  # the jobs read DEFAULT_DRAFT_TOKENS for their --help without importing transformers
    from transformers import PreTrainedTokenizerBase

# Drafted tokens one forward pass may verify. On a CPU each costs compute, and 8 measured best among
# 4, 8, 12 and 20 (bench/infer.py); on a GPU, where a pass costs about the same for 1 or 20 tokens, more pays.
DEFAULT_DRAFT_TOKENS = 8

# Number fields of one step, in the order they are written: rough start, rough end, start offset, end offset.
_ROUGH_START, _ROUGH_END, _OFFSET_START, _OFFSET_END = range(4)
_KINDS = ("sign", "tens", "units", "bin")


@dataclass(frozen=True)
class _Slot:
    """A template position that the model fills: a digit of a field, a whole bin, or a field's sign."""

    step: int
    field: int  # _ROUGH_START ... _OFFSET_END
    kind: str  # one of _KINDS


class AnswerGrammar:
    """The token template of answers of exactly ``refine_steps`` steps for one tokenizer."""

    def __init__(self, template: list[int | _Slot], choice_ids: dict[int, list[int]]) -> None:
        self.template = template
        # template position -> token id of each value there: digits 0-9, bins 0-99, or ["+", "-"]
        self._choice_ids = choice_ids
        self._choice_values = {pos: {tok: v for v, tok in enumerate(ids)} for pos, ids in choice_ids.items()}

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, refine_steps: int) -> AnswerGrammar | None:
        """The grammar of answers of ``refine_steps`` steps in this tokenizer's spelling (digits, or time
        tokens when the tokenizer has them), or None when it has no fixed token layout (module docstring)."""
        if refine_steps < 1:
            raise ValueError(f"refine_steps must be >= 1, got {refine_steps}")
        direct = refine_steps == 1
        time_tokens = _has_time_tokens(tokenizer)

        def spell(number: int, flip_signs: bool = False) -> list[int]:
            offsets = (-number, number) if flip_signs else (number, -number)
            if direct:
                offsets = (0, 0)  # the direct format writes rough + offset
            steps = [Step((number, number), offsets)] * refine_steps
            text = format_answer(steps, direct=direct, time_tokens=time_tokens)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        # Every number in every field at once: a position's id as a function of the number says what it is.
        spellings = [spell(n) for n in range(NUM_BINS)]
        flipped = spell(1, flip_signs=True)  # "-01" / "+01" against "+01" / "-01": differs only at the signs
        if any(len(s) != len(flipped) for s in spellings):
            return None
        kinds = []
        for pos in range(len(flipped)):
            ids = [s[pos] for s in spellings]
            distinct = len(set(ids))
            if flipped[pos] != ids[1]:
                kinds.append("sign" if distinct == 1 else None)
            elif distinct == 1:
                kinds.append("fixed")
            elif distinct == NUM_BINS:
                kinds.append("bin")
            elif distinct == 10 and all(ids[n] == ids[n - n % 10] for n in range(NUM_BINS)):
                kinds.append("tens")
            elif distinct == 10 and all(ids[n] == ids[n % 10] for n in range(NUM_BINS)):
                kinds.append("units")
            else:
                kinds.append(None)
        if None in kinds or any(k == "units" and kinds[p - 1] != "tens" for p, k in enumerate(kinds)):
            return None
        fields_per_step = 2 if direct else 4
        number_positions = [p for p, k in enumerate(kinds) if k in ("tens", "bin")]
        sign_positions = [p for p, k in enumerate(kinds) if k == "sign"]
        if len(number_positions) != fields_per_step * refine_steps or len(sign_positions) != (
            0 if direct else 2 * refine_steps
        ):
            return None
        template: list[int | _Slot] = list(spellings[0])
        choice_ids: dict[int, list[int]] = {}
        field_of: dict[int, tuple[int, int]] = {}
        for n, pos in enumerate(number_positions):
            field_of[pos] = divmod(n, fields_per_step)
        for pos, kind in enumerate(kinds):
            if kind == "units":
                field_of[pos] = field_of[pos - 1]  # a units digit follows its tens digit
            if kind in ("tens", "units", "bin"):
                step, field = field_of[pos]
                template[pos] = _Slot(step, field, kind)
                values = range(10) if kind != "bin" else range(NUM_BINS)
                column = {"tens": lambda v: 10 * v, "units": lambda v: v, "bin": lambda v: v}[kind]
                choice_ids[pos] = [spellings[column(v)][pos] for v in values]
        for n, pos in enumerate(sign_positions):
            step, which = divmod(n, 2)
            template[pos] = _Slot(step, _OFFSET_START + which, "sign")
            written = spellings[1][pos]  # the start offset is written "+01", the end "-01"
            plus, minus = (written, flipped[pos]) if which == 0 else (flipped[pos], written)
            choice_ids[pos] = [plus, minus]
        return cls(template, choice_ids)

    # -----------------------------------------------------------------------------------------------------
    # Constraints

    def allowed(self, position: int) -> list[int]:
        """The token ids that keep an answer inside the grammar at answer position ``position`` (past the
        template's end, where a finished answer never goes, nothing)."""
        if position >= len(self.template):
            return []
        expected = self.template[position]
        return self._choice_ids[position] if isinstance(expected, _Slot) else [expected]

    # -----------------------------------------------------------------------------------------------------
    # Drafts

    def draft(self, generated: Sequence[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` ids expected after ``generated`` (the answer so far); empty when the answer
        left the template or the next token is one the grammar cannot guess (the first step's numbers)."""
        values: dict[tuple[int, int], list] = {}  # (step, field) -> [sign, tens, units], None = unknown
        for pos, token in enumerate(generated):
            if pos >= len(self.template):
                return []
            expected = self.template[pos]
            if not isinstance(expected, _Slot):
                if token != expected:
                    return []
                continue
            known = self._choice_values[pos].get(token)
            if known is None:
                return []
            _store(values, expected, known)
        draft: list[int] = []
        for pos in range(len(generated), min(len(self.template), len(generated) + max_tokens)):
            expected = self.template[pos]
            if not isinstance(expected, _Slot):
                draft.append(expected)
                continue
            guess = self._guess(values, expected)
            if guess is None:
                break
            _store(values, expected, guess)
            draft.append(self._choice_ids[pos][guess])
        return draft

    def _guess(self, values: dict, slot: _Slot) -> int | None:
        """A step repeats the previous step's refined segment (rough + offset) with zero offsets: that is the
        answer of a model whose earlier step was right, and it makes offsets "+00" / "-00"."""
        if slot.kind == "sign":
            return 0 if slot.field == _OFFSET_START else 1  # index into ["+", "-"]
        if slot.field in (_OFFSET_START, _OFFSET_END):
            expected = 0
        elif slot.step == 0:
            return None  # the first segment is the model's to say
        else:
            expected = _refined(values, slot.step - 1, slot.field)
            if expected is None:
                return None
        if slot.kind == "bin":
            return expected
        tens, units = divmod(expected, 10)
        if slot.kind == "tens":
            return tens
        written_tens = _field_value(values, slot)[1]
        return units if written_tens == tens else None


def _has_time_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    vocabulary = tokenizer.get_vocab()
    return all(token in vocabulary for token in TIME_TOKENS)


def _field_value(values: dict, slot: _Slot) -> list:
    return values.setdefault((slot.step, slot.field), [None, None, None])


def _store(values: dict, slot: _Slot, value: int) -> None:
    """Record a sign index (0 "+", 1 "-"), a digit, or a whole bin (as its two digits)."""
    field = _field_value(values, slot)
    if slot.kind == "sign":
        field[0] = "+-"[value]
    elif slot.kind == "bin":
        field[1], field[2] = divmod(value, 10)
    else:
        field[_KINDS.index(slot.kind)] = value


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
