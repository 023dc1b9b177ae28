"""The model's options beyond the paper's defaults: the question-first layout, the frame relevance head and
its answer, frame time embeddings, time tokens, and decoding inside the answer grammar; old checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import SMALL_SPEC, _config, _generate, _samples, _train

from timerefine.batching import Sample
from timerefine.checkpoint import load_checkpoint, save_checkpoint
from timerefine.generation import frames_segment
from timerefine.llm import tiny_llm_dir
from timerefine.model import TimeRefineModel, fit_feature_stats, frame_relevance_targets
from timerefine.timecodec import SIGN_TOKENS, SPECIAL_TOKENS, TIME_TOKENS, Schedule, make_target, parse_answer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_llm_dir(SMALL_SPEC, home=tmp_path_factory.mktemp("home")))


def test_frame_targets_mark_the_frames_whose_centre_is_inside_and_never_none() -> None:
    windows = torch.tensor([[0.0, 0.24], [0.5, 1.0], [0.41, 0.42], [0.0, 0.0]])
    targets = frame_relevance_targets(windows, num_frames=10)
    assert targets[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # centres 0.05, 0.15; 0.25 is past
    assert targets[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert targets[2].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # no centre inside: the nearest frame
    assert targets[3].sum() == 1  # even an empty window has one frame to find


@pytest.mark.parametrize(
    "logits, segment",
    [
        ([-3, -1, 2, 3, -0.5, 2, -4], (2, 5)),  # 2 + 3 - 0.5 + 2 beats 2 + 3: a dip is bridged
        ([-3, -1, 2, 3, -6, 2, -4], (2, 3)),  # but not a deep one
        ([-3, -2, -0.1, -5], (2, 2)),  # all negative: the single most likely frame
        ([1, 1, 1], (0, 2)),
    ],
)
def test_the_frames_answer_is_the_most_likely_contiguous_segment(logits, segment) -> None:
    assert frames_segment(np.array(logits, dtype=np.float32)) == segment
    # It is the maximum-likelihood segment: a brute force over all segments agrees.
    values = np.array(logits, dtype=np.float64)
    best = max(
        ((i, j) for i in range(len(values)) for j in range(i, len(values))),
        key=lambda s: values[s[0] : s[1] + 1].sum(),
    )
    assert best == segment


def test_question_first_puts_the_frames_after_the_question(small_llm: str) -> None:
    model = TimeRefineModel.from_config(_config(small_llm, prompt_layout="question-first"))
    sample = _samples()[0]
    batch = model.make_batch([sample])
    first_frame = batch.video_mask[0].nonzero()[0].item()
    before = model.tokenizer.decode(batch.input_ids[0, :first_frame])
    assert before.endswith("During which frames can we see the red circle moves to the left?\n")
    paper = TimeRefineModel.from_config(_config(small_llm)).make_batch([sample])
    assert "During which" not in model.tokenizer.decode(
        paper.input_ids[0, : paper.video_mask[0].nonzero()[0]]
    )


@pytest.fixture(scope="module")
def overfit_options(small_llm: str) -> tuple[TimeRefineModel, list[Sample]]:
    """A small question-first model with a frame head, digit time embeddings and time tokens, fitted to
    eight samples."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    samples = [
        Sample(s.features, s.query, s.duration, make_target(*s.window, s.duration, Schedule.preset(2), rng,
                                                             time_tokens=True), s.window)
        for s in _samples()
    ]  # fmt: skip
    config = _config(
        small_llm,
        refine_steps=2,
        prompt_layout="question-first",
        frame_loss_weight=1.0,
        time_embedding="digits",
        time_tokens=True,
        query_conditioning=True,
    )
    model = TimeRefineModel.from_config(config)
    model.set_feature_stats(*fit_feature_stats(s.features for s in samples))
    _train(model, samples, steps=200, lr=3e-3)
    return model, samples


def test_a_model_with_every_option_fits_and_answers_in_time_tokens(overfit_options) -> None:
    model, samples = overfit_options
    vocabulary = model.tokenizer.get_vocab()
    assert all(token in vocabulary for token in (*SPECIAL_TOKENS, *TIME_TOKENS, *SIGN_TOKENS))
    assert model.frame_time is not None and model.frame_time.units_mix is None  # a bin is one token
    assert model.query_context is not None and model.query_context.weight.abs().sum() > 0  # it trained
    for sample, prediction in zip(samples, _generate(model, samples), strict=True):
        assert prediction["text"] == sample.target
        assert parse_answer(prediction["text"]).steps == parse_answer(sample.target).steps
        start, end = prediction["pred_frames"]
        truth = sample.window
        assert abs(start - truth[0]) + abs(end - truth[1]) < 0.25 * sample.duration  # the frame head learnt
        assert prediction["off_grammar"] is False


def test_drafting_time_token_answers_changes_the_cost_not_the_answer(overfit_options) -> None:
    model, samples = overfit_options
    args = ([s.features for s in samples], [s.query for s in samples], [s.duration for s in samples])
    one_by_one = model.generate(*args, max_draft_tokens=0)
    drafted = model.generate(*args, max_draft_tokens=8)
    assert [p["text"] for p in drafted] == [p["text"] for p in one_by_one]
    for fast, plain in zip(drafted, one_by_one, strict=True):
        assert fast["pred_frames"] == plain["pred_frames"]


def test_a_checkpoint_keeps_the_options_and_gives_the_same_answers(overfit_options, tmp_path: Path) -> None:
    model, samples = overfit_options
    directory = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(directory)
    for name in ("prompt_layout", "frame_loss_weight", "time_embedding", "time_tokens", "query_conditioning"):
        assert getattr(loaded.config, name) == getattr(model.config, name)
    assert _generate(loaded, samples) == _generate(model, samples)


@pytest.mark.parametrize("kind", ["digits", "learned"])
def test_time_embeddings_give_every_frame_its_own_vector(small_llm: str, kind: str) -> None:
    model = TimeRefineModel.from_config(_config(small_llm, time_embedding=kind, num_frames=100))
    vectors = model.frame_time(model.causal_lm.get_input_embeddings())
    assert vectors.shape == (100, SMALL_SPEC.hidden_size)
    assert len({tuple(v.round(decimals=5).tolist()) for v in vectors}) == 100
    if kind == "digits":  # frame 35 is told "3" and "5": the digits' own embeddings, units rotated
        embeddings = model.causal_lm.get_input_embeddings().weight
        three, five = model.tokenizer.convert_tokens_to_ids(["3", "5"])
        mix = model.frame_time.units_mix
        assert torch.allclose(vectors[35], embeddings[three] + mix(embeddings[five]), atol=1e-6)
        assert torch.allclose(mix.weight @ mix.weight.T, torch.eye(mix.weight.shape[0]), atol=1e-5)


def test_constrained_decoding_makes_even_an_untrained_model_answer_in_the_grammar(small_llm: str) -> None:
    torch.manual_seed(0)
    model = TimeRefineModel.from_config(_config(small_llm, refine_steps=4, max_new_tokens=120))
    samples = _samples()[:4]
    args = ([s.features for s in samples], [s.query for s in samples], [s.duration for s in samples])
    constrained = model.generate(*args)
    free = model.generate(*args, constrained=False)
    for kept, loose in zip(constrained, free, strict=True):
        parsed = parse_answer(kept["text"])
        assert kept["parsed"] and len(parsed.steps) == 4 and kept["pred"] is not None
        assert kept["off_grammar"] is True  # the untrained model's own choices are nonsense ...
        assert not loose["parsed"] and "off_grammar" not in loose  # ... and free decoding shows it
        # The two agree up to the first token the grammar overruled.
        common = 0
        while kept["text"][common : common + 1] == loose["text"][common : common + 1]:
            common += 1
        assert kept["text"].startswith(loose["text"][:common])
    # Drafts change the cost only, constrained too.
    assert [p["text"] for p in model.generate(*args, max_draft_tokens=0)] == [p["text"] for p in constrained]


def test_a_checkpoint_written_before_the_options_existed_loads_as_the_paper(small_llm: str, tmp_path: Path):
    torch.manual_seed(0)
    model = TimeRefineModel.from_config(_config(small_llm, refine_steps=1, l1_weight=0.0))
    directory = save_checkpoint(model, tmp_path / "old")
    meta_path = directory / "timerefine.json"
    meta = json.loads(meta_path.read_text())
    for name in ("prompt_layout", "frame_loss_weight", "time_embedding", "time_tokens", "query_conditioning"):
        del meta["model"][name]
    meta_path.write_text(json.dumps(meta))
    loaded = load_checkpoint(directory)
    assert loaded.config.prompt_layout == "video-first" and loaded.frame_head is None
    assert loaded.frame_time is None and not loaded.config.time_tokens
    samples = _samples(k=1)[:2]
    assert _generate(loaded, samples) == _generate(model, samples)
    assert all("pred_frames" not in p for p in _generate(loaded, samples))
