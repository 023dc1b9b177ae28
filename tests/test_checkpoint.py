"""A run's training state beside its model checkpoint: saved without pickle, resumed to the same step."""

from __future__ import annotations

import copy

import torch
from trainingdata import config, make_features, make_queries, tiny_model

from timerefine.checkpoint import TrainerState, load_training_state, save_training_state
from timerefine.optimisation import BatchPlan, make_optimizer, optimisation_step
from timerefine.timecodec import Schedule
from timerefine.training import training_samples


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
