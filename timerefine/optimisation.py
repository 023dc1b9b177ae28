"""Optimisation that does not depend on the number of workers: the batching plan, AdamW, the learning-rate
schedule and one accumulated step (DESIGN.md section 5).

Three choices make the optimisation the same for any worker count:

- the global batch of step ``s`` is a fixed slice of a permutation seeded by (seed, epoch), and rank ``r``
  of ``W`` takes its contiguous ``1 / W`` of it, split into micro-batches (``BatchPlan``);
- the loss is weighted by sample, not by token: each sample contributes its mean answer-token
  cross-entropy plus its weighted L1 and frame losses, and a step's loss is the mean over the global
  batch. A rank scales its sum by ``1 / per_rank`` and DDP averages over ranks, which is the same mean;
- training targets depend only on (seed, qid[, epoch]) through ``timecodec.noise_rng``, never on which
  worker sees a query (``timerefine.training``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from timerefine.batching import Batch

if TYPE_CHECKING:
    from timerefine.training import TrainConfig


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
    frame: float = 0.0
    samples: int = 0

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def all_reduced(self) -> StepTotals:
        values = all_reduce_sum(torch.tensor(astuple(self), dtype=torch.float64))
        return StepTotals(*values[:4].tolist(), samples=round(values[4].item()))

    def means(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"loss": self.loss / n, "ce": self.ce / n, "l1": self.l1 / n, "frame": self.frame / n}


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
            loss.detach().sum().item(),
            parts["ce"].sum().item(),
            parts["l1"].sum().item(),
            parts["frame"].sum().item(),
            len(batch),
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
