"""Query-blind priors on small synthetic lists and on the real Charades-STA / ActivityNet splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from timerefine.baselines import GRID_STEPS, fit_prior, score_prior
from timerefine.data.annotations import Query, read_annotations
from timerefine.metrics import best_window_iou, read_predictions, score

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# Published query-blind prior on Charades-STA test (window [0, 0.35]), from ../shared/data/README.md.
PUBLISHED_CHARADES_FIXED = {"R1@0.3": 44.1, "R1@0.5": 30.5, "R1@0.7": 17.3, "mIoU": 29.6}
PUBLISHED_ACTIVITYNET_WHOLE_MIOU = 34.6


@pytest.fixture(scope="module")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def charades_sta(shared_data) -> tuple[list[Query], list[Query]]:
    folder = shared_data / "annotations/charades_sta"
    train, _ = read_annotations(folder / "charades_sta_train.txt", durations=folder / "Charades_v1_train.csv")
    test, _ = read_annotations(folder / "charades_sta_test.txt", durations=folder / "Charades_v1_test.csv")
    return train, test


def query(qid: str, duration: float, *fractions: tuple[float, float]) -> Query:
    """A query whose windows are given as fractions of its duration."""
    windows = tuple((start * duration, end * duration) for start, end in fractions)
    return Query(qid=qid, video_id=f"video_{qid}", duration=duration, query="a person sits", windows=windows)


def random_queries(count: int, seed: int) -> list[Query]:
    rng = np.random.default_rng(seed)
    queries = []
    for index in range(count):
        fractions = []
        for _ in range(rng.integers(1, 3)):  # some queries have two windows
            start, end = sorted(rng.uniform(0, 1, size=2))
            fractions.append((start, max(end, start + 0.01)))
        queries.append(query(str(index), float(rng.uniform(10, 200)), *fractions))
    return queries


# --- fixed ----------------------------------------------------------------------------------------


def test_fixed_prior_finds_the_window_all_train_queries_share():
    train = [query(str(i), duration, (0.2, 0.6)) for i, duration in enumerate((20.0, 50.0, 80.0))]
    prior = fit_prior("fixed", train)
    assert prior.window == (0.2, 0.6)
    test = [query("t1", 33.0, (0.2, 0.6)), query("t2", 71.5, (0.2, 0.6))]
    assert [prior.predict(q) for q in test] == [(0.2 * 33.0, 0.6 * 33.0), (0.2 * 71.5, 0.6 * 71.5)]
    metrics = score_prior(prior, test)
    assert [metrics[key] for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")] == [100.0] * 4


@pytest.mark.parametrize("objective", ["mIoU", "R1@0.5"])
def test_fixed_prior_matches_an_exhaustive_search_with_the_metric(objective):
    train = random_queries(12, seed=3)
    threshold = None if objective == "mIoU" else 0.5

    def objective_value(a: float, b: float) -> float:
        ious = [best_window_iou((a * q.duration, b * q.duration), q.windows) for q in train]
        return float(np.mean(ious if threshold is None else [iou >= threshold for iou in ious]))

    grid = [step / GRID_STEPS for step in range(GRID_STEPS + 1)]
    best = max(objective_value(a, b) for a in grid for b in grid if a < b)
    prior = fit_prior("fixed", train, objective=objective)
    assert objective_value(*prior.window) == pytest.approx(best, abs=1e-12)
    if objective == "mIoU":
        assert score_prior(prior, train)["mIoU"] == round(best * 100, 2)


# --- whole and random -----------------------------------------------------------------------------


def test_whole_prior_answers_the_whole_video():
    prior = fit_prior("whole", [])
    test = [query("a", 40.0, (0.0, 1.0)), query("b", 10.0, (0.0, 0.5))]
    assert prior.predict(test[1]) == (0.0, 10.0)
    metrics = score_prior(prior, test)
    assert (metrics["R1@0.5"], metrics["R1@0.7"], metrics["mIoU"]) == (100.0, 50.0, 75.0)


def test_random_prior_draws_train_moments_scaled_to_each_video():
    train = [query("a", 30.0, (0.1, 0.3)), query("b", 90.0, (0.5, 0.9))]
    prior = fit_prior("random", train, seed=7)
    test = [query(f"t{i}", 10.0 + i, (0.0, 0.5)) for i in range(50)]
    drawn = {tuple(round(t / q.duration, 9) for t in prior.predict(q)) for q in test}
    assert drawn == {(0.1, 0.3), (0.5, 0.9)}


def test_random_prior_is_seeded_per_query_not_per_call_order():
    train = random_queries(40, seed=0)
    test = random_queries(30, seed=1)
    prior = fit_prior("random", train, seed=5)
    forward = {q.qid: prior.predict(q) for q in test}
    backward = {q.qid: prior.predict(q) for q in reversed(test)}
    assert forward == backward
    assert forward == {q.qid: fit_prior("random", train, seed=5).predict(q) for q in test}
    assert forward != {q.qid: fit_prior("random", train, seed=6).predict(q) for q in test}
    assert all(0 <= start <= end <= q.duration for q in test for start, end in [forward[q.qid]])


# --- predictions file and errors ------------------------------------------------------------------


def test_prior_predictions_rescore_like_a_model(tmp_path):
    train, test = random_queries(30, seed=0), random_queries(20, seed=1)
    prior = fit_prior("fixed", train)
    records = prior.predictions(test)
    assert records[0]["qid"] == test[0].qid and records[0]["duration"] == test[0].duration
    path = tmp_path / "fixed_prior.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    assert score(read_predictions(path), test) == score_prior(prior, test)


@pytest.mark.parametrize(
    ("kind", "train", "objective", "message"),
    [
        ("median", [query("a", 10.0, (0.0, 0.5))], "mIoU", "unknown prior kind"),
        ("fixed", [query("a", 10.0, (0.0, 0.5))], "R1@0.9", "unknown objective"),
        ("fixed", [], "mIoU", "needs training queries"),
        ("random", [], "mIoU", "needs training queries"),
    ],
)
def test_fit_prior_rejects_bad_requests(kind, train, objective, message):
    with pytest.raises(ValueError, match=message):
        fit_prior(kind, train, objective=objective)


# --- real splits ----------------------------------------------------------------------------------


def test_charades_fixed_prior_reproduces_the_published_window(charades_sta):
    """The published [0, 0.35] window is the one that maximises train R1@0.7, not train mIoU."""
    train, test = charades_sta
    prior = fit_prior("fixed", train, objective="R1@0.7")
    assert prior.window == (0.0, 0.35)
    metrics = score_prior(prior, test)
    assert metrics["n"] == 3720
    for key, published in PUBLISHED_CHARADES_FIXED.items():
        assert metrics[key] == pytest.approx(published, abs=0.05), key


def test_charades_fixed_prior_fitted_on_miou_is_a_higher_miou_floor(charades_sta):
    train, test = charades_sta
    prior = fit_prior("fixed", train)
    assert prior.window == (0.0, 0.47)
    metrics = score_prior(prior, test)
    # Measured here; kept as a regression check of the search and the metric together.
    assert [metrics[key] for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")] == [49.30, 26.94, 11.24, 30.47]
    assert metrics["mIoU"] > PUBLISHED_CHARADES_FIXED["mIoU"]


def test_activitynet_whole_video_prior(shared_data):
    val_2, _ = read_annotations(shared_data / "annotations/activitynet_captions/val_2.json")
    metrics = score_prior(fit_prior("whole", []), val_2)
    assert metrics["n"] == 17031
    assert metrics["mIoU"] == pytest.approx(PUBLISHED_ACTIVITYNET_WHOLE_MIOU, abs=0.05)
