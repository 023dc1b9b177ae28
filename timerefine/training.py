"""The parts of training that do not need Ray: configuration, data, batching plan, one step, validation.

``pipelines/train.py`` wires these into a Ray Train loop; everything here is plain PyTorch and numpy, so it
runs (and is tested) in one process.

The optimisation must not depend on the number of workers (DESIGN.md section 5). Three choices give that:

- the global batch of step ``s`` is a fixed slice of a permutation seeded by (seed, epoch), and rank ``r``
  of ``W`` takes its contiguous ``1 / W`` of it, split into micro-batches (``BatchPlan``);
- the loss is weighted by sample, not by token: each sample contributes its mean answer-token
  cross-entropy plus lambda times its mean L1, and a step's loss is the mean over the global batch. A
  rank scales its sum by ``1 / per_rank`` and DDP averages over ranks, which is the same mean;
- training targets depend only on (seed, qid[, epoch]) through ``timecodec.noise_rng``, never on
  which worker sees a query.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from timerefine.batching import Batch, Sample
from timerefine.data.annotations import Query, read_annotations
from timerefine.data.storage import Storage
from timerefine.features import FeatureRow, load_features
from timerefine.llm import DEFAULT_LLM
from timerefine.metrics import THRESHOLDS, best_window_iou
from timerefine.model import ModelConfig, TimeRefineModel, fit_feature_stats
from timerefine.timecodec import Schedule, make_target, noise_rng

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """One training run. Serialisable as a plain dict (it travels to Ray workers as ``train_loop_config``).

    ``schedule`` is what ``Schedule.parse`` reads: a preset K ("4"), "rel4", or explicit sigmas ("5,3,1,0").
    The paper trains LoRA (r 64) on a 7B LLM with lr 1e-4 and global batch 128; the defaults here suit the
    small built-in LLM trained in full from random weights on a CPU, which needs a larger learning rate.
    """

    features: str
    train: str
    val: str | None = None
    durations: str | None = None  # Charades metadata CSV, for annotation formats without durations
    llm: str = DEFAULT_LLM
    schedule: str = "4"
    contain_gt: bool = True
    noise_per_epoch: bool = False
    l1_weight: float = 1.0
    lora_r: int = 0
    epochs: int = 10
    global_batch_size: int = 32
    micro_batch_size: int = 8
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    val_batch_size: int = 32
    max_val_queries: int | None = None  # validate on the first N val queries (None: all)

    def __post_init__(self) -> None:
        self.parsed_schedule()  # fail early, in the driver, on a bad schedule
        for name in ("epochs", "global_batch_size", "micro_batch_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {self.l1_weight}")

    def parsed_schedule(self) -> Schedule:
        return Schedule.parse(self.schedule, contain_gt=self.contain_gt, per_epoch=self.noise_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def model_config(self, feature_dim: int, encoder: str | None, max_new_tokens: int) -> ModelConfig:
        return ModelConfig(
            llm=self.llm,
            feature_dim=feature_dim,
            lora_r=self.lora_r,
            l1_weight=self.l1_weight,
            max_new_tokens=max_new_tokens,
            refine_steps=self.parsed_schedule().k,
            encoder=encoder,
        )


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class JoinSummary:
    """How many queries found their video's features; the others are skipped, and said so."""

    split: str
    queries: int
    joined: int
    missing_videos: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.queries - self.joined

    def describe(self) -> str:
        text = f"{self.split}: {self.joined} of {self.queries} queries have features"
        if self.skipped:
            shown = ", ".join(self.missing_videos[:5]) + (", ..." if len(self.missing_videos) > 5 else "")
            text += (
                f"; skipped {self.skipped} whose {len(self.missing_videos)} video(s) have no ok feature row "
                f"({shown})"
            )
        return text


@dataclass
class TrainingData:
    """What every worker trains on: the feature table's ok videos and the queries that found theirs."""

    features: dict[str, FeatureRow]
    train: list[Query]
    val: list[Query]
    joins: list[JoinSummary]

    @property
    def encoder(self) -> str:
        return next(iter(self.features.values())).encoder

    @property
    def feature_dim(self) -> int:
        return next(iter(self.features.values())).features.shape[1]

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardisation statistics from the training videos only, in a fixed order (so every rank
        computes bit-identical values)."""
        videos = sorted({q.video_id for q in self.train})
        return fit_feature_stats(self.features[v].features for v in videos)


def load_training_data(config: TrainConfig, storage: Storage | None = None) -> TrainingData:
    """Read the feature table and the annotations, and join them by video id."""
    features = load_features(config.features, storage)
    if not features:
        raise ValueError(f"{config.features}: the feature table has no video with status ok")
    video_ids = features.keys()
    train_queries = _read_queries(config.train, config.durations, storage)
    train, train_join = join_queries(train_queries, video_ids, "train")
    if not train:
        raise ValueError(
            f"no query of {config.train} has a video in {config.features}: annotation video ids must be the "
            "video file names without extension, as the feature table stores them"
        )
    joins = [train_join]
    val: list[Query] = []
    if config.val:
        val, val_join = join_queries(_read_queries(config.val, config.durations, storage), video_ids, "val")
        val = val[: config.max_val_queries]
        joins.append(val_join)
    return TrainingData(features, train, val, joins)


def _read_queries(path: str, durations: str | None, storage: Storage | None) -> list[Query]:
    return read_annotations(path, durations=durations, storage=storage)[0]


def join_queries(
    queries: Sequence[Query], video_ids: Collection[str], split: str
) -> tuple[list[Query], JoinSummary]:
    """The queries whose video has an ok row in the feature table, in their original order."""
    joined = [query for query in queries if query.video_id in video_ids]
    missing = sorted({query.video_id for query in queries if query.video_id not in video_ids})
    return joined, JoinSummary(split, len(queries), len(joined), missing)


def training_target(query: Query, schedule: Schedule, seed: int, epoch: int) -> str:
    """The answer text a query is trained on. Its noise depends on (seed, qid) only, or on the epoch too
    when the schedule redraws per epoch. A query with several windows is trained on its first."""
    rng = noise_rng(seed, query.qid, epoch if schedule.per_epoch else None)
    start, end = query.windows[0]
    return make_target(start, end, query.duration, schedule, rng)


def training_samples(
    queries: Sequence[Query],
    features: Mapping[str, FeatureRow],
    schedule: Schedule,
    seed: int,
    epoch: int,
) -> list[Sample]:
    return [
        Sample(
            features=features[q.video_id].features,
            query=q.query,
            duration=q.duration,
            target=training_target(q, schedule, seed, epoch),
            window=q.windows[0],
        )
        for q in queries
    ]


def answer_token_budget(model: TimeRefineModel, targets: Sequence[str], margin: int = 8) -> int:
    """Tokens to let generation run: the longest training answer plus a margin. An untrained model rarely
    stops by itself, and decoding up to a generic cap would make each validation many times slower."""
    longest = max(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    return longest + margin


# ---------------------------------------------------------------------------------------------------------
# The batching plan


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch is split over ``world_size`` ranks and, on each rank, into micro-batches.

    ``global_batch_size`` is the optimisation's batch and never changes with the worker count;
    ``accumulation_steps`` is what changes.
    """

    global_batch_size: int
    world_size: int
    micro_batch_size: int

    @classmethod
    def create(cls, global_batch_size: int, world_size: int, max_micro_batch_size: int) -> BatchPlan:
        """The plan whose micro-batch is the largest divisor of each rank's share up to the requested one."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} does not split evenly over {world_size} workers; "
                f"choose a multiple of {world_size} (or another worker count)"
            )
        per_rank = global_batch_size // world_size
        micro = max(d for d in range(1, min(max_micro_batch_size, per_rank) + 1) if per_rank % d == 0)
        return cls(global_batch_size, world_size, micro)

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def steps_per_epoch(self, num_examples: int) -> int:
        """Full global batches in an epoch; the remainder (a different one each epoch) is left out, so that
        every step averages the same number of samples."""
        steps = num_examples // self.global_batch_size
        if steps == 0:
            raise ValueError(
                f"{num_examples} training queries cannot fill one global batch of {self.global_batch_size}; "
                "lower --global-batch-size or add data"
            )
        return steps

    def global_batches(self, num_examples: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
        """The example indices of each step of ``epoch``, from a permutation seeded by (seed, epoch)."""
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        for step in range(self.steps_per_epoch(num_examples)):
            yield order[step * self.global_batch_size : (step + 1) * self.global_batch_size]

    def micro_batches(self, global_batch: np.ndarray, rank: int) -> list[np.ndarray]:
        """Rank ``rank``'s contiguous share of a global batch, cut into micro-batches."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        share = global_batch[rank * self.per_rank : (rank + 1) * self.per_rank]
        return [share[i : i + self.micro_batch_size] for i in range(0, self.per_rank, self.micro_batch_size)]

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = {self.world_size} worker(s) x "
            f"{self.accumulation_steps} accumulation step(s) x micro-batch {self.micro_batch_size}"
        )


# ---------------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases, norms and buffers-like vectors do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak: a function of the step alone, so
    that resuming needs no scheduler state."""
    warmup = math.ceil(config.warmup_fraction * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = config.min_lr_ratio * config.learning_rate
    return floor + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (config.learning_rate - floor)


@dataclass
class StepTotals:
    """Sums over the samples a rank saw: all-reduce them to get the global step's means."""

    loss: float = 0.0
    ce: float = 0.0
    l1: float = 0.0
    samples: int = 0

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def all_reduced(self) -> StepTotals:
        values = all_reduce_sum(torch.tensor(astuple(self), dtype=torch.float64))
        return StepTotals(*values[:3].tolist(), samples=round(values[3].item()))

    def means(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"loss": self.loss / n, "ce": self.ce / n, "l1": self.l1 / n}


def optimisation_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    plan: BatchPlan,
    grad_clip: float,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> StepTotals:
    """One optimiser step on this rank's share of a global batch, accumulating over its micro-batches.

    ``model`` returns per-sample losses (``reduction="sample"``); their sum is scaled by ``1 / per_rank`` so
    that DDP's average over ranks makes the global batch's sample mean. ``no_sync`` (DDP's) skips the
    gradient all-reduce on all but the last micro-batch.
    """
    totals = StepTotals()
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last or no_sync is None else no_sync():
            loss, parts = model(batch, reduction="sample")
            (loss.sum() / plan.per_rank).backward()
        totals += StepTotals(
            loss.detach().sum().item(), parts["ce"].sum().item(), parts["l1"].sum().item(), len(batch)
        )
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when torch.distributed runs (gloo tensors live on the CPU), else unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


# ---------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class IoUTally:
    """IoU counts of the text answer over some queries; sums, so ranks combine by all-reduce."""

    queries: int = 0
    hits: tuple[int, ...] = (0,) * len(THRESHOLDS)
    iou_sum: float = 0.0

    def all_reduced(self) -> IoUTally:
        values = all_reduce_sum(torch.tensor([self.queries, *self.hits, self.iou_sum], dtype=torch.float64))
        counts = [round(v) for v in values[:-1].tolist()]
        return IoUTally(counts[0], tuple(counts[1:]), values[-1].item())

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """R1@0.3 / 0.5 / 0.7 and mIoU in percent, as metrics.score reports them."""
        n = max(self.queries, 1)
        result = {f"{prefix}R1@{t}": 100 * h / n for t, h in zip(THRESHOLDS, self.hits, strict=True)}
        result[f"{prefix}mIoU"] = 100 * self.iou_sum / n
        return result


def validation_tally(
    model: TimeRefineModel, queries: Sequence[Query], features: Mapping[str, FeatureRow], batch_size: int
) -> IoUTally:
    """Generate answers for ``queries`` and count IoU hits of the text answer (unparsed: IoU 0)."""
    ious = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        videos = [features[q.video_id].features for q in chunk]
        predictions = model.generate(videos, [q.query for q in chunk], [q.duration for q in chunk])
        ious += [best_window_iou(p["pred"], q.windows) for p, q in zip(predictions, chunk, strict=True)]
    values = np.asarray(ious, dtype=np.float64)
    hits = tuple(int((values >= t).sum()) for t in THRESHOLDS)
    return IoUTally(len(ious), hits, float(values.sum()))


# ---------------------------------------------------------------------------------------------------------
# Training state in checkpoints (beside the model's own files)


@dataclass
class TrainerState:
    """Where a run stands after an epoch: what a resumed run needs besides weights and optimiser."""

    epoch: int  # epochs completed
    step: int  # optimiser steps taken


def fetch_checkpoint(uri: str, storage: Storage, staging: Path) -> Path:
    """A local directory with the checkpoint at ``uri``: the directory itself when it is local, else a
    copy downloaded into ``staging`` (from S3, where Ray Train stores runs on a cluster)."""
    local = storage.local_path(uri)
    if local is not None:
        if not Path(local).is_dir():
            raise FileNotFoundError(f"checkpoint {uri} is not a directory")
        return Path(local)
    filesystem, path = storage.resolve(uri)
    pafs.copy_files(
        path, str(staging), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem()
    )
    return staging


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    """Optimiser tensors in safetensors and everything else in JSON: no pickle, so loading runs no code."""
    directory = Path(directory)
    optimizer_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, directory / OPTIMIZER_FILE)
    document = {
        "trainer": asdict(state),
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
    }
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(document, indent=2) + "\n")


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore the optimiser written by ``save_training_state`` and return the trainer's state."""
    directory = Path(directory)
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is a model checkpoint without training state")
    document = json.loads(path.read_text())
    state: dict[int, dict[str, Any]] = {}
    entries = {**load_file(directory / OPTIMIZER_FILE), **document["optimizer"]["scalars"]}
    for key, value in entries.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["optimizer"]["param_groups"]})
    return TrainerState(**document["trainer"])
