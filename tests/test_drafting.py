"""Drafts of TimeRefine answers: what the grammar fixes is drafted, the first segment never is."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from timerefine.drafting import AnswerDrafter
from timerefine.llm import build_tiny_tokenizer
from timerefine.timecodec import PRESETS, SPECIAL_TOKENS, Step, format_answer

# Where the tiny tokenizer's K = 4 answer has its pieces: From Ġ <seg_start> Ġ 1 0 Ġto Ġ 4 0 Ġ <offset> Ġ+ 0 3
# Ġand Ġ- 0 5 Ġ <refine> ...
OPENING = 4  # From Ġ <seg_start> Ġ
FIRST_ROUGH_END = 10  # after the first rough segment's last digit
FIRST_STEP_END = 19  # after the first step's end-offset digits


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def _ids(tokenizer: PreTrainedTokenizerFast, steps: list[Step], direct: bool = False) -> list[int]:
    return tokenizer(format_answer(steps, direct=direct), add_special_tokens=False)["input_ids"]


def test_a_converging_answer_is_drafted_whole_once_its_first_step_is_written(tokenizer) -> None:
    steps = [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3
    answer = _ids(tokenizer, steps)
    drafter = AnswerDrafter.for_tokenizer(tokenizer, 4)
    assert drafter is not None and len(drafter.template) == len(answer)
    assert drafter.draft([], 100) == answer[:OPENING]
    assert drafter.draft(answer[:OPENING], 100) == []  # the first segment is the model's to say
    assert drafter.draft(answer[: OPENING + 1], 100) == []  # ... digit by digit
    # After the first segment the guess is "offsets zero, and every later step the same segment".
    unchanged = _ids(tokenizer, [Step((10, 40))] * 4)
    assert drafter.draft(answer[:FIRST_ROUGH_END], 100) == unchanged[FIRST_ROUGH_END:]
    assert answer[FIRST_STEP_END - 1] != unchanged[FIRST_STEP_END - 1]  # the real offsets differ ...
    # ... and once they are written, the rest follows from them: 10 + 3 = 13, 40 - 5 = 35, offsets zero.
    assert drafter.draft(answer[:FIRST_STEP_END], 100) == answer[FIRST_STEP_END:]
    assert drafter.draft(answer[:FIRST_STEP_END], 5) == answer[FIRST_STEP_END : FIRST_STEP_END + 5]
    assert drafter.draft(answer, 100) == []  # complete


def test_a_units_digit_is_guessed_only_under_the_guessed_tens_digit(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3)
    drafter = AnswerDrafter.for_tokenizer(tokenizer, 4)
    second_rough_start = FIRST_STEP_END + 3  # Ġ <refine> Ġ, then the tens digit of 13
    assert drafter.draft(answer[: second_rough_start + 1], 1) == [answer[second_rough_start + 1]]
    two = tokenizer.convert_tokens_to_ids("2")
    assert drafter.draft([*answer[:second_rough_start], two], 100) == []  # 2x: no idea which x


def test_an_answer_that_left_the_grammar_gets_no_draft(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3)
    drafter = AnswerDrafter.for_tokenizer(tokenizer, 4)
    assert drafter.draft([*answer[:FIRST_ROUGH_END], tokenizer.eos_token_id], 100) == []
    assert drafter.draft([*answer[: OPENING - 1], answer[0]], 100) == []
    sign = answer[FIRST_ROUGH_END + 2]  # the start offset's "Ġ+"
    assert drafter.draft([*answer[: FIRST_ROUGH_END + 2], sign, sign], 100) == []  # a sign where a digit goes


def test_the_direct_format_drafts_its_fixed_tokens_only(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((12, 34))], direct=True)
    drafter = AnswerDrafter.for_tokenizer(tokenizer, 1)
    assert drafter is not None and len(drafter.template) == len(answer) == 12
    assert drafter.draft([], 100) == answer[:OPENING]
    assert drafter.draft(answer[:6], 100) == answer[6:8]  # " to "
    assert drafter.draft(answer[:FIRST_ROUGH_END], 100) == answer[FIRST_ROUGH_END:]  # " <seg_end>"


@pytest.mark.parametrize("k", sorted(PRESETS))
def test_every_preset_has_a_template_as_long_as_its_answers(tokenizer, k: int) -> None:
    steps = [Step((5 * i, 90 - 5 * i), (i, -i)) for i in range(k)]
    drafter = AnswerDrafter.for_tokenizer(tokenizer, k)
    assert drafter is not None
    assert len(drafter.template) == len(_ids(tokenizer, steps, direct=k == 1))


def test_a_tokenizer_that_writes_a_bin_as_one_token_gets_no_drafter() -> None:
    words = {"From", "to", "and", *SPECIAL_TOKENS, "[UNK]"}
    words |= {f"{n:02d}" for n in range(100)} | {f"{s}{n:02d}" for s in "+-" for n in range(100)}
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(sorted(words))}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    assert len(tokenizer("From <seg_start> 35 to 40 <seg_end>")["input_ids"]) == 6  # "35" is one token
    assert AnswerDrafter.for_tokenizer(tokenizer, 4) is None
    with pytest.raises(ValueError, match="refine_steps"):
        AnswerDrafter.for_tokenizer(tokenizer, 0)
