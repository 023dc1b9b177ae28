"""bench/refinement_probe.py: its decoder must be the library's, so that what a forced opening changes is
the opening alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from refinement_probe import continue_answers, probes, score_probe
from test_model import SMALL_SPEC, _config, _samples, _train

from timerefine.llm import tiny_llm_dir
from timerefine.model import TimeRefineModel, fit_feature_stats
from timerefine.timecodec import parse_answer, time_to_bin


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A small K = 4 model fitted to eight samples, so that its answers parse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    samples = _samples()
    llm = str(tiny_llm_dir(SMALL_SPEC, home=tmp_path_factory.mktemp("home")))
    model = TimeRefineModel.from_config(_config(llm, refine_steps=4, max_new_tokens=120))
    model.set_feature_stats(*fit_feature_stats(s.features for s in samples))
    _train(model, samples, steps=80, lr=3e-3)
    yield model, samples
    torch.set_num_threads(threads)


def _inputs(samples):
    return [s.features for s in samples], [s.query for s in samples], [s.duration for s in samples]


def test_with_no_opening_it_decodes_exactly_what_free_generation_does(trained) -> None:
    model, samples = trained
    texts = continue_answers(model, *_inputs(samples), [""] * len(samples), max_new_tokens=120)
    free = model.generate(*_inputs(samples), constrained=False, max_new_tokens=120)
    assert texts == [answer["text"] for answer in free]
    assert sum(parse_answer(t).final_bins is not None for t in texts) >= 6  # the fit answers in the format


def test_a_forced_opening_is_kept_and_the_model_writes_the_rest(trained) -> None:
    model, samples = trained
    truths = [(time_to_bin(s.window[0], s.duration), time_to_bin(s.window[1], s.duration)) for s in samples]
    for probe in probes(shift=8)[1:]:  # every forced opening
        prefixes = [probe.prefix(t) for t in truths]
        texts = continue_answers(model, *_inputs(samples), prefixes, max_new_tokens=120)
        for prefix, text, truth in zip(prefixes, texts, truths, strict=True):
            assert text.startswith(prefix) and len(text) > len(prefix)
            steps = parse_answer(text).steps
            if steps and probe.forced is not None:
                assert steps[0].rough == probe.forced(truth)  # the opening is step 1's rough segment
        row = score_probe(probe, texts, truths)
        assert 0 <= row["mIoU"] <= 100 and row["parsed"] <= len(samples)


def test_the_error_left_is_measured_in_the_forced_direction() -> None:
    widened, moved_back = probes(shift=8)[2], probes(shift=8)[-1]
    truth = (40, 60)
    answer = "From <seg_start> 32 to 68 <offset> +04 and -04 <seg_end>"  # corrected half of the widening
    row = score_probe(widened, [answer], [truth])
    assert row["forced_bins"] == 8 and row["left_bins"] == 4 and row["steps"] == [100 * 20 / 28]
    row = score_probe(moved_back, ["From <seg_start> 32 to 52 <offset> +00 and -00 <seg_end>"], [truth])
    assert row["forced_bins"] == 8 and row["left_bins"] == 8  # -8 bins, every bin of it left
    assert score_probe(widened, ["amamam"], [truth])["mIoU"] == 0  # an answer that does not parse is a miss
