"""The answer grammar: what it fixes is drafted, the first segment never is; constraints keep answers in."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from timerefine.grammar import AnswerGrammar
from timerefine.llm import build_tiny_tokenizer
from timerefine.timecodec import PRESETS, SIGN_TOKENS, SPECIAL_TOKENS, TIME_TOKENS, Step, format_answer

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
    grammar = AnswerGrammar.for_tokenizer(tokenizer, 4)
    assert grammar is not None and len(grammar.template) == len(answer)
    assert grammar.draft([], 100) == answer[:OPENING]
    assert grammar.draft(answer[:OPENING], 100) == []  # the first segment is the model's to say
    assert grammar.draft(answer[: OPENING + 1], 100) == []  # ... digit by digit
    # After the first segment the guess is "offsets zero, and every later step the same segment".
    unchanged = _ids(tokenizer, [Step((10, 40))] * 4)
    assert grammar.draft(answer[:FIRST_ROUGH_END], 100) == unchanged[FIRST_ROUGH_END:]
    assert answer[FIRST_STEP_END - 1] != unchanged[FIRST_STEP_END - 1]  # the real offsets differ ...
    # ... and once they are written, the rest follows from them: 10 + 3 = 13, 40 - 5 = 35, offsets zero.
    assert grammar.draft(answer[:FIRST_STEP_END], 100) == answer[FIRST_STEP_END:]
    assert grammar.draft(answer[:FIRST_STEP_END], 5) == answer[FIRST_STEP_END : FIRST_STEP_END + 5]
    assert grammar.draft(answer, 100) == []  # complete


def test_a_units_digit_is_guessed_only_under_the_guessed_tens_digit(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3)
    grammar = AnswerGrammar.for_tokenizer(tokenizer, 4)
    second_rough_start = FIRST_STEP_END + 3  # Ġ <refine> Ġ, then the tens digit of 13
    assert grammar.draft(answer[: second_rough_start + 1], 1) == [answer[second_rough_start + 1]]
    two = tokenizer.convert_tokens_to_ids("2")
    assert grammar.draft([*answer[:second_rough_start], two], 100) == []  # 2x: no idea which x


def test_an_answer_that_left_the_grammar_gets_no_draft(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3)
    grammar = AnswerGrammar.for_tokenizer(tokenizer, 4)
    assert grammar.draft([*answer[:FIRST_ROUGH_END], tokenizer.eos_token_id], 100) == []
    assert grammar.draft([*answer[: OPENING - 1], answer[0]], 100) == []
    sign = answer[FIRST_ROUGH_END + 2]  # the start offset's "Ġ+"
    assert grammar.draft([*answer[: FIRST_ROUGH_END + 2], sign, sign], 100) == []  # a sign where a digit goes


def test_the_direct_format_drafts_its_fixed_tokens_only(tokenizer) -> None:
    answer = _ids(tokenizer, [Step((12, 34))], direct=True)
    grammar = AnswerGrammar.for_tokenizer(tokenizer, 1)
    assert grammar is not None and len(grammar.template) == len(answer) == 12
    assert grammar.draft([], 100) == answer[:OPENING]
    assert grammar.draft(answer[:6], 100) == answer[6:8]  # " to "
    assert grammar.draft(answer[:FIRST_ROUGH_END], 100) == answer[FIRST_ROUGH_END:]  # " <seg_end>"


@pytest.mark.parametrize("k", sorted(PRESETS))
def test_every_preset_has_a_template_as_long_as_its_answers(tokenizer, k: int) -> None:
    steps = [Step((5 * i, 90 - 5 * i), (i, -i)) for i in range(k)]
    grammar = AnswerGrammar.for_tokenizer(tokenizer, k)
    assert grammar is not None
    assert len(grammar.template) == len(_ids(tokenizer, steps, direct=k == 1))


def test_a_tokenizer_that_writes_a_signed_offset_as_one_token_has_no_grammar() -> None:
    words = {"From", "to", "and", *SPECIAL_TOKENS, "[UNK]"}
    words |= {f"{n:02d}" for n in range(100)} | {f"{s}{n:02d}" for s in "+-" for n in range(100)}
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(sorted(words))}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    assert len(tokenizer("From <seg_start> 35 to 40 <seg_end>")["input_ids"]) == 6  # "35" is one token
    assert AnswerGrammar.for_tokenizer(tokenizer, 4) is None
    with pytest.raises(ValueError, match="refine_steps"):
        AnswerGrammar.for_tokenizer(tokenizer, 0)


def _with_time_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [*TIME_TOKENS, *SIGN_TOKENS]}, replace_extra_special_tokens=False
    )
    return tokenizer


def test_allowed_tokens_are_the_fixed_token_ten_digits_or_two_signs(tokenizer) -> None:
    grammar = AnswerGrammar.for_tokenizer(tokenizer, 4)
    answer = _ids(tokenizer, [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert grammar.allowed(0) == [answer[0]]  # "From"
    assert grammar.allowed(OPENING) == digits  # the first rough start's tens digit
    assert grammar.allowed(OPENING + 1) == digits
    assert sorted(grammar.allowed(FIRST_ROUGH_END + 2)) == sorted(
        tokenizer.convert_tokens_to_ids(["Ġ+", "Ġ-"])
    )
    assert grammar.allowed(len(answer) - 1) == [answer[-1]]  # <seg_end>
    assert grammar.allowed(len(answer)) == []  # nothing after the answer
    for position, token in enumerate(answer):  # every real answer stays inside
        assert token in grammar.allowed(position)


@pytest.mark.parametrize("k", sorted(PRESETS))
def test_time_tokens_make_each_bin_one_slot_of_a_hundred_choices(tokenizer, k: int) -> None:
    timed = _with_time_tokens(tokenizer)
    steps = [Step((5 * i, 90 - 5 * i), (i, -i)) for i in range(k)]
    answer = timed(format_answer(steps, direct=k == 1, time_tokens=True), add_special_tokens=False)[
        "input_ids"
    ]
    grammar = AnswerGrammar.for_tokenizer(timed, k)
    assert grammar is not None and len(grammar.template) == len(answer)
    bins = timed.convert_tokens_to_ids(list(TIME_TOKENS))
    assert grammar.allowed(answer.index(bins[0])) == bins  # the first rough start: any of the 100 bins
    assert all(token in grammar.allowed(p) for p, token in enumerate(answer))
    # Digits take two tokens a bin and a space beside each special token: time tokens are much shorter.
    assert len(answer) < 0.7 * len(_ids(tokenizer, steps, direct=k == 1))


def test_time_token_drafts_repeat_the_refined_segment(tokenizer) -> None:
    timed = _with_time_tokens(tokenizer)
    steps = [Step((10, 40), (3, -5))] + [Step((13, 35))] * 3

    def ids(answer_steps):
        return timed(format_answer(answer_steps, time_tokens=True), add_special_tokens=False)["input_ids"]

    answer = ids(steps)
    grammar = AnswerGrammar.for_tokenizer(timed, 4)
    first_step_end = answer.index(timed.convert_tokens_to_ids("<refine>"))
    assert grammar.draft(answer[:first_step_end], 100) == answer[first_step_end:]
    assert grammar.draft(answer[:3], 100) == []  # after "From <seg_start>": the first bin is the model's
