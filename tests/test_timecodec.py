import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timerefine.timecodec import (
    PRESETS,
    QUESTION_FIRST,
    Schedule,
    Step,
    bin_to_time,
    format_answer,
    format_prompt,
    make_steps,
    make_target,
    noise_rng,
    parse_answer,
    time_to_bin,
)

PAPER_EXAMPLE = (
    "From <seg_start> 30 to 46 <offset> +05 and -06 <refine> 32 to 44 <offset> +03 and -04 <refine> "
    "35 to 41 <offset> +00 and -01 <refine> 35 to 40 <offset> +00 and -00 <seg_end>"
)


def test_bins_follow_vtimellm():
    assert time_to_bin(0.0, 30.0) == 0
    assert time_to_bin(30.0, 30.0) == 99  # min(99, 100)
    assert time_to_bin(10.5, 30.0) == 35
    assert time_to_bin(0.15, 1.0) == 15
    assert time_to_bin(0.125, 1.0) == 12  # Python's round: half to even, as VTimeLLM
    assert bin_to_time(35, 30.0) == pytest.approx(10.5)
    assert bin_to_time(120, 30.0) == 30.0 and bin_to_time(-3, 30.0) == 0.0


def test_paper_example_parses_to_its_steps():
    parsed = parse_answer(PAPER_EXAMPLE)
    assert parsed.ok and parsed.error is None
    assert [s.rough for s in parsed.steps] == [(30, 46), (32, 44), (35, 41), (35, 40)]
    assert [s.offset for s in parsed.steps] == [(5, -6), (3, -4), (0, -1), (0, 0)]
    assert parsed.final_bins == (35, 40)
    assert parsed.segment_s(30.0) == pytest.approx((10.5, 12.0))
    assert parsed.trace_s(30.0) == [pytest.approx((10.5, 12.0))] * 4
    assert format_answer(parsed.steps) == PAPER_EXAMPLE


def test_direct_format_is_k1():
    rng = np.random.default_rng(0)
    text = make_target(10.5, 12.0, 30.0, Schedule.preset(1), rng)
    assert text == "From <seg_start> 35 to 40 <seg_end>"
    parsed = parse_answer(text)
    assert parsed.ok and parsed.steps == [Step((35, 40), (0, 0))]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no <seg_start>"),
        ("garbage 12 to 40", "no <seg_start>"),
        ("From <seg_start> 30 to 46 <offset> +05 and -06 <refine> 32 to", "truncated"),
        ("From <seg_start> 30 to 46 <offset> +05 and -06 <refine> 32 to 44 <offset> +03 and", "truncated"),
        ("From <seg_start> 30 to 46 <refine> 32 to 44 <offset> +03 and -04 <seg_end>", "no <offset>"),
        ("From <seg_start> 30 to 46 <offset> 05 and -06 <seg_end>", "malformed"),
        ("From <seg_start> 3a to 46 <seg_end>", "malformed"),
        ("From <seg_start> 300 to 46 <seg_end>", "malformed"),
    ],
)
def test_parser_reports_failures(text, reason):
    parsed = parse_answer(text)
    assert not parsed.ok
    assert reason in parsed.error
    assert parsed.segment_s(30.0) is None


def test_truncated_answer_keeps_complete_steps_for_the_trace():
    parsed = parse_answer("From <seg_start> 30 to 46 <offset> +05 and -06 <refine> 32 to 4")
    assert not parsed.ok and parsed.steps == [Step((30, 46), (5, -6))]
    assert parsed.trace_s(100.0) == [pytest.approx((35.0, 40.0))]


def test_parser_tolerates_decoder_spacing_and_never_raises():
    squeezed = PAPER_EXAMPLE.replace(" <", "<").replace("> ", ">")
    assert parse_answer(squeezed).final_bins == (35, 40)
    assert parse_answer("ASSISTANT: " + PAPER_EXAMPLE + "</s> trailing").ok
    for junk in [None, 3, "<seg_start><seg_end>", "<seg_start>" * 3, "\x00<refine>", "<seg_end> 1 to 2"]:
        assert parse_answer(junk).ok is False


def test_refined_answer_is_clamped_and_ordered():
    parsed = parse_answer("From <seg_start> 90 to 95 <offset> +20 and -40 <seg_end>")
    assert parsed.ok
    assert parsed.segment_s(10.0) == pytest.approx((5.5, 10.0))  # bins (110, 55) -> clamp, then sort


@pytest.mark.parametrize("spec, expected", [("4", (5, 3, 1, 0)), ("1", (0,)), ("5,3,1,0", (5, 3, 1, 0))])
def test_schedule_parse(spec, expected):
    assert Schedule.parse(spec).sigmas == expected


def test_relative_schedule_scales_with_duration():
    rel = Schedule.parse("rel4")
    assert rel.relative and rel.sigmas[0] == pytest.approx(5 / 30)
    assert Schedule.parse("rel:0.2,0").sigmas == (0.2, 0.0)
    # On a 300 s video the relative schedule's first step is ~10x wider (in bins: same) than 5 s noise.
    widths_abs, widths_rel = [], []
    for i in range(200):
        a = make_steps(100, 160, 300, Schedule.preset(4, contain_gt=False), noise_rng(0, str(i)))[0]
        r = make_steps(
            100, 160, 300, Schedule.preset(4, relative=True, contain_gt=False), noise_rng(0, str(i))
        )[0]
        widths_abs.append(abs(a.offset[0]))
        widths_rel.append(abs(r.offset[0]))
    assert np.mean(widths_rel) > 5 * np.mean(widths_abs)


@pytest.mark.parametrize("bad", ["3", "5,3,1", "-1,0", "", "abc"])
def test_bad_schedules_are_rejected_with_help(bad):
    with pytest.raises(ValueError, match=r"bad refinement schedule"):
        Schedule.parse(bad)


def test_noise_is_per_sample_or_per_epoch():
    sched = Schedule.preset(4)
    once = [make_target(5, 9, 30, sched, noise_rng(7, "q1")) for _ in range(2)]
    assert once[0] == once[1]
    epochs = {make_target(5, 9, 30, sched, noise_rng(7, "q1", epoch=e)) for e in range(10)}
    assert len(epochs) > 1
    per_query = {make_target(5, 9, 30, sched, noise_rng(7, f"q{i}")) for i in range(10)}
    assert len(per_query) > 1


def test_noise_widths_follow_sigma():
    sched = Schedule.preset(4, contain_gt=False)
    offsets = np.array(
        [[s.offset[0] for s in make_steps(10, 20, 100, sched, noise_rng(1, str(i)))] for i in range(400)]
    )
    spread = np.abs(offsets).mean(axis=0)  # bins of 1 s on a 100 s video: mean |N(0, sigma)| = 0.8 sigma
    assert spread[0] == pytest.approx(0.8 * 5, rel=0.2)
    assert spread[1] == pytest.approx(0.8 * 3, rel=0.2)
    assert spread[3] == 0


def test_prompt_matches_the_paper():
    assert (
        format_prompt("The person stirs soup.")
        == "<video>\nDuring which frames can we see the person stirs soup?"
    )


def test_the_question_first_layout_puts_the_frames_after_the_question():
    assert (
        format_prompt("The person stirs soup.", QUESTION_FIRST)
        == "During which frames can we see the person stirs soup?\n<video>"
    )
    with pytest.raises(ValueError, match="prompt layout"):
        format_prompt("x", "frames-last")


def test_time_tokens_spell_a_bin_and_a_sign_as_one_token_each():
    steps = parse_answer(PAPER_EXAMPLE).steps
    text = format_answer(steps, time_tokens=True)
    assert text.startswith("From <seg_start><30> to<46><offset><+><05> and<-><06><refine><32> to<44>")
    assert text.endswith("<35> to<40><offset><+><00> and<-><00><seg_end>")
    assert parse_answer(text).steps == steps
    assert (
        format_answer([Step((35, 40))], direct=True, time_tokens=True)
        == "From <seg_start><35> to<40><seg_end>"
    )
    assert parse_answer("From <seg_start><35> to<40><seg_end>").final_bins == (35, 40)
    for broken in (
        "From <seg_start><3> to<40><seg_end>",
        "From <seg_start><35> to<40><offset><05> and<-><06><seg_end>",
    ):
        assert not parse_answer(broken).ok


moments = st.tuples(st.floats(0.5, 600, allow_nan=False), st.floats(0, 1), st.floats(0, 1)).map(
    lambda t: (min(t[1], t[2]) * t[0], max(t[1], t[2]) * t[0], t[0])
)
schedules = st.one_of(
    st.sampled_from(sorted(PRESETS)).map(Schedule.preset),
    st.sampled_from(sorted(PRESETS)).map(lambda k: Schedule.preset(k, relative=True)),
    st.sampled_from(sorted(PRESETS)).map(lambda k: Schedule.preset(k, contain_gt=False)),
    st.lists(st.floats(0.01, 60), min_size=0, max_size=9).map(lambda s: Schedule((*s, 0.0))),
)


@settings(max_examples=300, deadline=None)
@given(moment=moments, schedule=schedules, seed=st.integers(0, 2**31), time_tokens=st.booleans())
def test_targets_round_trip(moment, schedule, seed, time_tokens):
    start, end, duration = moment
    steps = make_steps(start, end, duration, schedule, np.random.default_rng(seed))
    text = format_answer(steps, direct=schedule.direct, time_tokens=time_tokens)
    parsed = parse_answer(text)
    assert parsed.ok, (text, parsed.error)
    assert parsed.steps == steps
    gt = (time_to_bin(start, duration), time_to_bin(end, duration))
    assert parsed.final_bins == gt
    assert steps[-1].rough == gt and steps[-1].offset == (0, 0)
    for step in steps:
        assert all(-99 <= o <= 99 for o in step.offset)
        assert 0 <= step.rough[0] <= step.rough[1] <= 99
        assert step.refined == gt
        if schedule.contain_gt:
            assert step.offset[0] >= 0 and step.offset[1] <= 0
    assert len(steps) == schedule.k


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+- toandFrom<>_segstarendofftrfi")), max_size=120))
def test_parser_never_raises_on_noise(text):
    parsed = parse_answer(text)
    assert parsed.ok in (True, False)
    if parsed.ok:
        assert parsed.steps
