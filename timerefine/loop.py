"""The training loop: build or restore, epochs of accumulated steps, validation, a checkpoint an epoch.

``train(config, data)`` is the whole of training in one function that reads top to bottom, and runs in a
plain process (tests, benchmarks, ``bench/quality.py``). A distributed runner changes only its hooks
(``TrainHooks``): which rank this is, the device, the model wrapper (DDP), where a resumed run's checkpoint
is, and what to do with each epoch's metrics and checkpoint. ``pipelines/train.py`` supplies Ray Train's.

Determinism: for a seed, the initial weights, the order of samples, the noise of the training targets and
each epoch's random state are fixed, whatever order the feature table's rows arrive in, so two runs on the
same data and the same number of threads give the same losses and checkpoints, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timerefine.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from timerefine.model import TimeRefineModel
from timerefine.optimisation import BatchPlan, StepTotals, learning_rate, make_optimizer, optimisation_step
from timerefine.training import (
    TrainConfig,
    TrainingData,
    answer_token_budget,
    train_score_subset,
    training_samples,
    training_target,
)
from timerefine.validation import validation_tallies

# Writes one epoch's checkpoint (model, optimiser, trainer state) into the directory it is given.
CheckpointWriter = Callable[[Path], None]


def _no_checkpoint_to_resume() -> AbstractContextManager[Path | None]:
    return nullcontext(None)


def _keep_nothing(metrics: dict[str, Any], write_checkpoint: CheckpointWriter) -> None:
    del metrics, write_checkpoint


@dataclass
class TrainHooks:
    """What the place a loop runs in decides; the defaults are one process, nothing kept."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model  # e.g. DDP
    # a context giving the directory of the checkpoint to continue from, or None to start afresh
    resume_from: Callable[[], AbstractContextManager[Path | None]] = _no_checkpoint_to_resume
    # called every epoch on every rank (a distributed runner may wait for all of them)
    report: Callable[[dict[str, Any], CheckpointWriter], None] = _keep_nothing
    log: Callable[[str], None] = lambda line: print(f"[train] {line}", flush=True)


def train(config: TrainConfig, data: TrainingData, hooks: TrainHooks | None = None) -> list[dict[str, Any]]:
    """Train for the epochs ``config`` asks for that the resumed checkpoint (if any) has not done; returns
    each epoch's metrics (this call's epochs only)."""
    hooks = hooks or TrainHooks()
    schedule = config.parsed_schedule()
    plan = BatchPlan.create(config.global_batch_size, hooks.world_size, config.micro_batch_size)
    total_steps = config.epochs * plan.steps_per_epoch(len(data.train))
    with hooks.resume_from() as directory:
        if directory is None:
            model, optimizer, state = build(config, data, hooks.device)
        else:
            model, optimizer, state = restore(directory, config, hooks.device)
    wrapped = hooks.prepare_model(model)
    no_sync = getattr(wrapped, "no_sync", None)  # DDP: all-reduce gradients on the last micro-batch only
    if hooks.rank == 0:
        hooks.log(f"{plan.describe()}; {schedule.describe()}; from epoch {state.epoch + 1}")

    history = []
    for epoch in range(state.epoch, config.epochs):
        torch.manual_seed(config.seed * 10_007 + epoch)  # dropout, if any: the same on every rank
        wrapped.train()
        samples = training_samples(
            data.train, data.features, config.epoch_schedule(epoch), config.seed, epoch, config.time_tokens
        )
        totals, started = StepTotals(), time.perf_counter()
        for global_batch in plan.global_batches(len(samples), config.seed, epoch):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, total_steps, config)
            micro_batches = [
                model.make_batch([samples[i] for i in indices]).to(hooks.device)
                for indices in plan.micro_batches(global_batch, hooks.rank)
            ]
            totals += optimisation_step(wrapped, optimizer, micro_batches, plan, config.grad_clip, no_sync)
            state.step += 1
        totals = totals.all_reduced()
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            **totals.means(),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": totals.samples / (time.perf_counter() - started),
        }
        if data.val:
            metrics |= validate(model, data, config, hooks)
        state.epoch = epoch + 1
        hooks.report(metrics, lambda directory: write_checkpoint(directory, model, optimizer, state))
        if hooks.rank == 0:
            hooks.log(format_metrics(metrics))
        history.append(metrics)
    return history


def validate(model: TimeRefineModel, data: TrainingData, config: TrainConfig, hooks: TrainHooks) -> dict:
    """Greedy answers on the val queries and on a fixed subset of the training queries, each rank scoring
    its share: R1 and mIoU of the text answer (``val_mIoU``, ``train_mIoU``) and, with a frame head, of the
    frames answer (``val_frames_mIoU``...). Train beside val shows memorising as it happens."""
    started = time.perf_counter()
    fields = ("pred", "pred_frames") if model.frame_head is not None else ("pred",)
    metrics: dict[str, Any] = {}
    splits = (("val", data.val), ("train", train_score_subset(data.train, config.train_score_queries)))
    for split, queries in splits:
        share = queries[hooks.rank :: hooks.world_size]
        tallies = validation_tallies(model, share, data.features, config.val_batch_size, fields)
        for name, tally in tallies.items():
            prefix = f"{split}_" if name == "pred" else f"{split}_frames_"
            metrics |= tally.all_reduced().metrics(prefix)
    return metrics | {"val_s": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------------
# Building, restoring and writing the state of a run


def build(config: TrainConfig, data: TrainingData, device: torch.device) -> tuple:
    """A fresh model (the same initial weights on every rank and for every worker count), its optimiser and
    the trainer state of epoch 0."""
    torch.manual_seed(config.seed)
    model = TimeRefineModel.from_config(
        config.model_config(
            data.feature_dim, data.encoder, max_new_tokens=256, video_decoder=data.video_decoder
        )
    )
    targets = [
        training_target(q, config.parsed_schedule(), config.seed, 0, config.time_tokens) for q in data.train
    ]
    model.config.max_new_tokens = answer_token_budget(model, targets)
    model.set_feature_stats(*data.feature_stats())
    model.to(device)
    return model, make_optimizer(model, config), TrainerState(epoch=0, step=0)


def restore(directory: Path, config: TrainConfig, device: torch.device) -> tuple:
    """The model, optimiser and trainer state that ``write_checkpoint`` wrote into ``directory``."""
    model = load_checkpoint(directory, device=device)
    optimizer = make_optimizer(model, config)
    return model, optimizer, load_training_state(directory, optimizer)


def write_checkpoint(directory: Path, model: TimeRefineModel, optimizer, state: TrainerState) -> None:
    save_checkpoint(model, directory)
    save_training_state(directory, optimizer, state)


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:03d}"


class LocalCheckpoints:
    """A ``report`` hook for runs in this process: every epoch's checkpoint in ``folder/checkpoint_epoch_NNN``
    and the metrics kept in ``reported`` with the checkpoint's path."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.reported: list[tuple[Path, dict[str, Any]]] = []

    def __call__(self, metrics: dict[str, Any], write: CheckpointWriter) -> None:
        directory = self.folder / checkpoint_name(metrics["epoch"])
        write(directory)
        self.reported.append((directory, metrics))

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        """A ``resume_from`` hook: the newest complete checkpoint in the folder, if any."""
        done = sorted(
            p for p in self.folder.glob("checkpoint_epoch_*") if (p / "trainer_state.json").is_file()
        )
        yield done[-1] if done else None


_SHOWN_METRICS = (
    "loss", "ce", "l1", "frame",
    "train_mIoU", "val_R1@0.3", "val_R1@0.5", "val_R1@0.7", "val_mIoU",
    "train_frames_mIoU", "val_frames_mIoU", "samples_per_s",
)  # fmt: skip


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"epoch {metrics['epoch']}"]
    for key in _SHOWN_METRICS:
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    return "  ".join(parts)
