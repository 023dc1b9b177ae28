"""Optimisation independent of the worker count: the batching plan, the schedule, one accumulated step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from trainingdata import config, make_features, make_queries, tiny_model

from timerefine.optimisation import BatchPlan, StepTotals, learning_rate, optimisation_step
from timerefine.timecodec import Schedule
from timerefine.training import training_samples


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
    totals = StepTotals(6.0, 4.0, 1.0, 0.6, 2) + StepTotals(3.0, 2.0, 0.5, 0.3, 1)
    assert totals.all_reduced() == totals  # no process group: unchanged
    assert totals.means() == pytest.approx({"loss": 3.0, "ce": 2.0, "l1": 0.5, "frame": 0.3})
