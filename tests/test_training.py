"""The Ray-agnostic training pieces: batching plan, targets, one optimisation step, validation, state."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from timerefine.data.annotations import Query
from timerefine.features import FeatureRow
from timerefine.metrics import Prediction, score
from timerefine.model import ModelConfig, TimeRefineModel
from timerefine.timecodec import Schedule, parse_answer, time_to_bin
from timerefine.training import (
    BatchPlan,
    IoUTally,
    StepTotals,
    TrainConfig,
    TrainerState,
    join_queries,
    learning_rate,
    load_training_state,
    make_optimizer,
    optimisation_step,
    save_training_state,
    training_samples,
    training_target,
    validation_tally,
)

FEATURE_DIM = 16


def make_queries(count: int, duration: float = 30.0) -> list[Query]:
    return [
        Query(f"q{i}", f"v{i % 4}", duration, f"the {colour} circle moves", ((2.0 + i, 9.0 + i),))
        for i, colour in zip(range(count), ["red", "blue", "green", "pink"] * count, strict=False)
    ]


def make_features(video_ids: list[str], seed: int = 0) -> dict[str, FeatureRow]:
    rng = np.random.default_rng(seed)
    return {
        vid: FeatureRow(
            video_id=vid,
            features=rng.standard_normal((100, FEATURE_DIM)).astype(np.float16),
            frame_times_s=np.linspace(0, 29.7, 100, dtype=np.float32),
            duration_s=30.0,
            fps=10.0,
            num_frames=300,
            uri=f"/videos/{vid}.mp4",
            encoder="test-encoder",
        )
        for vid in video_ids
    }


def tiny_model(seed: int = 0, l1_weight: float = 1.0) -> TimeRefineModel:
    torch.manual_seed(seed)
    return TimeRefineModel.from_config(ModelConfig(feature_dim=FEATURE_DIM, l1_weight=l1_weight))


def config(**overrides) -> TrainConfig:
    return TrainConfig(features="unused", train="unused", **overrides)


# -- the batching plan -----------------------------------------------------------------------------------


def test_plan_lowers_the_micro_batch_to_a_divisor_of_each_ranks_share():
    plan = BatchPlan.create(global_batch_size=12, world_size=2, max_micro_batch_size=4)
    assert (plan.per_rank, plan.micro_batch_size, plan.accumulation_steps) == (6, 3, 2)
    assert BatchPlan.create(12, 1, 4).accumulation_steps == 3
    assert BatchPlan.create(8, 4, 16).micro_batch_size == 2


def test_plan_rejects_a_global_batch_that_does_not_split_over_the_workers():
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        BatchPlan.create(global_batch_size=8, world_size=3, max_micro_batch_size=2)


def test_global_batches_are_a_seeded_permutation_per_epoch_without_the_remainder():
    plan = BatchPlan.create(4, 1, 4)
    epoch0 = list(plan.global_batches(10, seed=3, epoch=0))
    assert [len(b) for b in epoch0] == [4, 4]
    seen = np.concatenate(epoch0)
    assert len(set(seen.tolist())) == 8 and set(seen.tolist()) <= set(range(10))
    again = list(plan.global_batches(10, seed=3, epoch=0))
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again, strict=True))
    epoch1 = np.concatenate(list(plan.global_batches(10, seed=3, epoch=1)))
    assert not np.array_equal(seen, epoch1)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        plan.steps_per_epoch(3)


@pytest.mark.parametrize(("world_size", "micro"), [(1, 8), (1, 3), (2, 2), (4, 1), (8, 8)])
def test_rank_shares_rebuild_the_global_batch_in_order(world_size, micro):
    plan = BatchPlan.create(8, world_size, micro)
    global_batch = np.random.default_rng(0).permutation(20)[:8]
    pieces = [m for rank in range(world_size) for m in plan.micro_batches(global_batch, rank)]
    assert all(len(m) == plan.micro_batch_size for m in pieces)
    assert np.array_equal(np.concatenate(pieces), global_batch)


def test_learning_rate_warms_up_linearly_then_decays_to_the_floor():
    cfg = config(learning_rate=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    rates = [learning_rate(step, 100, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


# -- data ------------------------------------------------------------------------------------------------


def test_join_skips_and_reports_queries_without_features():
    queries = make_queries(6)  # videos v0..v3
    joined, summary = join_queries(queries, {"v0", "v2"}, "train")
    assert [q.qid for q in joined] == ["q0", "q2", "q4"]
    assert (summary.queries, summary.joined, summary.skipped) == (6, 3, 3)
    assert summary.missing_videos == ["v1", "v3"]
    assert "skipped 3" in summary.describe() and "v1, v3" in summary.describe()


def test_targets_depend_on_the_query_not_on_order_and_per_epoch_only_when_asked():
    queries = make_queries(3)
    once = Schedule.preset(4)
    targets = [training_target(q, once, seed=0, epoch=0) for q in queries]
    assert targets == [training_target(q, once, seed=0, epoch=5) for q in queries]
    assert targets[::-1] == [training_target(q, once, seed=0, epoch=0) for q in queries[::-1]]
    per_epoch = Schedule.preset(4, per_epoch=True)
    drawn = {training_target(queries[0], per_epoch, seed=0, epoch=e) for e in range(5)}
    assert len(drawn) > 1
    for query, target in zip(queries, targets, strict=True):
        parsed = parse_answer(target)
        start, end = query.windows[0]
        assert parsed.ok and len(parsed.steps) == 4
        assert parsed.final_bins == (time_to_bin(start, 30.0), time_to_bin(end, 30.0))


# -- one optimisation step -------------------------------------------------------------------------------


def test_sample_reduction_weights_every_sample_alike_whatever_its_length():
    queries = make_queries(3)
    features = make_features(["v0", "v1", "v2"])
    direct = training_samples(queries[:1], features, Schedule.preset(1), seed=0, epoch=0)
    refined = training_samples(queries[1:], features, Schedule.preset(4), seed=0, epoch=0)
    samples = direct + refined  # answers of very different lengths, in one padded batch
    model = tiny_model().eval()
    with torch.no_grad():
        loss, parts = model(model.make_batch(samples), reduction="sample")
        alone = [model(model.make_batch([sample]))[1] for sample in samples]
    assert loss.shape == (3,)
    assert torch.allclose(parts["ce"], torch.stack([a["ce"] for a in alone]), atol=1e-5)
    assert torch.allclose(parts["l1"], torch.stack([a["l1"] for a in alone]), atol=1e-6)
    assert parts["l1"][0] == 0 and (parts["l1"][1:] > 0).all()  # the direct answer has no <offset>
    assert torch.allclose(loss, parts["ce"] + parts["l1"])


def _step(model, samples, plan, rank_batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [model.make_batch([samples[i] for i in micro]) for micro in rank_batches]
    totals = optimisation_step(model, optimizer, batches, plan, grad_clip=0.0)
    return totals, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulation_over_micro_batches_matches_one_big_batch():
    queries = make_queries(4)
    features = make_features(["v0", "v1", "v2", "v3"])
    samples = training_samples(queries, features, Schedule.preset(4), seed=0, epoch=0)
    indices = np.arange(4)
    whole = BatchPlan.create(4, 1, 4)
    split = BatchPlan.create(4, 1, 1)
    totals_a, params_a = _step(tiny_model(), samples, whole, whole.micro_batches(indices, 0))
    totals_b, params_b = _step(tiny_model(), samples, split, split.micro_batches(indices, 0))
    assert totals_a.samples == totals_b.samples == 4
    assert totals_a.loss == pytest.approx(totals_b.loss, rel=1e-5)
    assert totals_a.l1 > 0 and totals_a.ce > 0
    assert torch.allclose(params_a, params_b, atol=1e-6)
    assert not torch.equal(params_a, torch.cat([p.flatten() for p in tiny_model().parameters()]))


def test_step_totals_are_sums_that_give_sample_means():
    totals = StepTotals(6.0, 4.0, 1.0, 2) + StepTotals(3.0, 2.0, 0.5, 1)
    assert totals.all_reduced() == totals  # no process group: unchanged
    assert totals.means() == pytest.approx({"loss": 3.0, "ce": 2.0, "l1": 0.5})


def test_training_state_round_trip_resumes_the_same_optimisation(tmp_path):
    queries = make_queries(2)
    features = make_features(["v0", "v1"])
    samples = training_samples(queries, features, Schedule.preset(2), seed=0, epoch=0)
    plan = BatchPlan.create(2, 1, 2)
    cfg = config()

    def run(model, optimizer):
        batch = model.make_batch(samples)
        optimisation_step(model, optimizer, [batch], plan, grad_clip=1.0)

    model = tiny_model()
    optimizer = make_optimizer(model, cfg)
    run(model, optimizer)
    restored_model = copy.deepcopy(model)
    restored_optimizer = make_optimizer(restored_model, cfg)
    save_training_state(tmp_path, optimizer, TrainerState(epoch=1, step=1))
    state = load_training_state(tmp_path, restored_optimizer)
    assert state == TrainerState(epoch=1, step=1)
    run(model, optimizer)
    run(restored_model, restored_optimizer)
    for a, b in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(a, b)


# -- validation ------------------------------------------------------------------------------------------


def test_iou_tally_metrics_are_percentages():
    tally = IoUTally(queries=4, hits=(3, 2, 1), iou_sum=2.0)
    assert tally.metrics() == {"val_R1@0.3": 75.0, "val_R1@0.5": 50.0, "val_R1@0.7": 25.0, "val_mIoU": 50.0}
    assert tally.all_reduced() == tally


class FixedAnswers:
    """Stands in for the model's ``generate``: answers each query with a chosen segment (None: unparsed)."""

    def __init__(self, answers: dict[str, list[float] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def generate(self, features, queries, durations):
        self.calls += 1
        assert len(features) == len(queries) == len(durations)
        return [{"pred": self.answers[q], "parsed": self.answers[q] is not None} for q in queries]


def test_validation_tally_agrees_with_metrics_score():
    queries = [
        Query("a", "v0", 30.0, "the red circle", ((2.0, 10.0),)),
        Query("b", "v1", 30.0, "the blue star", ((0.0, 6.0), (20.0, 30.0))),
        Query("c", "v2", 30.0, "the green box", ((5.0, 15.0),)),
        Query("d", "v3", 30.0, "the pink ring", ((1.0, 4.0),)),
    ]
    answers = {
        "the red circle": [2.0, 10.0],  # IoU 1
        "the blue star": [21.0, 30.0],  # 0.9 against the second window
        "the green box": [10.0, 20.0],  # 1/3
        "the pink ring": None,  # unparsed: a miss
    }
    model = FixedAnswers(answers)
    tally = validation_tally(model, queries, make_features(["v0", "v1", "v2", "v3"]), batch_size=3)
    expected = score(
        [Prediction(q.qid, answers[q.query], answers[q.query] is not None) for q in queries], queries
    )
    assert model.calls == 2 and tally.queries == 4
    assert tally.hits == (3, 2, 2)
    got = tally.metrics(prefix="")
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert got[key] == pytest.approx(expected[key], abs=0.01)
