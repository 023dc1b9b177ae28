"""Fine-tune a grounding model with Ray Train (V2): DDP over workers, a checkpoint every epoch, resumable.

Two doors, one job: ``timerefine train ...`` and
``ray job submit --working-dir . -- python pipelines/train.py ...``.

Every worker reads the feature table (small: ~150 KB a video) and the annotations, joins them by video
id and takes its share of each global batch (``timerefine.training.BatchPlan``), so the optimisation is
the same for any worker count. Each epoch every rank validates its share of the val queries, the IoU
counts are all-reduced, and rank 0 attaches a checkpoint (model files, optimiser in safetensors, trainer
state in JSON) to ``ray.train.report``. Ray Train keeps the run under ``--output/--name``: rerunning with
the same name (or with ``--resume``, which says so) continues after the last reported epoch.

``--workers 0`` runs the same loop in this process without Ray workers (Ray Train's local mode): quick
experiments and tests. It writes its checkpoints under a local ``--output`` itself and cannot resume.

The final checkpoint is the best by validation mIoU (the latest among equals), or the last one without
``--val``; its path is printed and written to ``<output>/<name>/training_summary.json``.

Exit status: 0 when training finished, 2 when the input cannot be used or training failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script (ray job submit): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timerefine.cli import run_job
from timerefine.data.storage import Storage, StorageError, is_s3_uri, join_uri
from timerefine.timecodec import PRESETS
from timerefine.training import TrainConfig

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

logger = logging.getLogger("timerefine.train")

EXIT_OK, EXIT_UNUSABLE = 0, 2
SUMMARY_FILE = "training_summary.json"
SELECTION_METRIC = "val_mIoU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--features", required=True, help="feature table folder or s3:// prefix")
    data.add_argument("--train", required=True, help="training annotations (any supported format)")
    data.add_argument("--val", help="validation annotations, scored every epoch")
    data.add_argument("--durations", help="Charades metadata CSV, for annotations without durations")
    data.add_argument("--max-val-queries", type=int, help="validate on the first N val queries only")

    method = parser.add_argument_group("method")
    method.add_argument("--llm", default=TrainConfig.llm, help="'tiny-llama', a GGUF, an HF directory or id")
    method.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: train the whole LLM)")
    method.add_argument(
        "--refine-steps", type=int, help=f"K, the number of refinement steps (presets {sorted(PRESETS)})"
    )
    method.add_argument(
        "--sigma", type=float, nargs="+", help="noise of each step, coarse to fine, ending in 0 (seconds)"
    )
    method.add_argument("--relative-sigma", action="store_true", help="sigmas are fractions of the duration")
    method.add_argument("--noise-per-epoch", action="store_true", help="redraw rough segments every epoch")
    method.add_argument("--no-contain-gt", action="store_true", help="do not redraw until rough contains gt")
    method.add_argument(
        "--l1-weight", type=float, default=TrainConfig.l1_weight, help="lambda of the L1 head"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    optim.add_argument("--global-batch-size", type=int, default=TrainConfig.global_batch_size)
    optim.add_argument("--micro-batch-size", type=int, default=TrainConfig.micro_batch_size)
    optim.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    optim.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    optim.add_argument("--warmup-fraction", type=float, default=TrainConfig.warmup_fraction)
    optim.add_argument("--seed", type=int, default=TrainConfig.seed)

    job = parser.add_argument_group("job")
    job.add_argument("--output", required=True, help="storage folder or s3:// prefix for runs")
    job.add_argument("--name", default="timerefine", help="run name: a rerun with the same name resumes")
    job.add_argument("--resume", action="store_true", help="continue the run's last checkpoint, if any")
    job.add_argument("--workers", type=int, default=1, help="training workers (0: in this process)")
    job.add_argument("--cpus-per-worker", type=float, default=1.0)
    job.add_argument("--gpus-per-worker", type=float, default=0.0)
    job.add_argument("--max-failures", type=int, default=1, help="worker-group restarts Ray Train may do")
    job.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    job.add_argument("--endpoint-url", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")


def schedule_spec(refine_steps: int | None, sigma: list[float] | None, relative: bool) -> str:
    """The ``Schedule.parse`` spec for ``--refine-steps`` / ``--sigma`` / ``--relative-sigma``."""
    prefix = "rel:" if relative else ""
    if sigma is None:
        return f"{'rel' if relative else ''}{refine_steps or 4}"
    if refine_steps is not None and refine_steps != len(sigma):
        raise ValueError(f"--refine-steps {refine_steps} but --sigma gives {len(sigma)} values")
    return prefix + ",".join(f"{s:g}" for s in sigma)


def config_from_args(args: argparse.Namespace, storage: Storage) -> TrainConfig:
    """The run's configuration with every path absolute: Ray Train workers run in their own directory."""
    return TrainConfig(
        features=storage.canonical(args.features),
        train=storage.canonical(args.train),
        val=storage.canonical(args.val) if args.val else None,
        durations=storage.canonical(args.durations) if args.durations else None,
        max_val_queries=args.max_val_queries,
        llm=args.llm,
        lora_r=args.lora_r,
        schedule=schedule_spec(args.refine_steps, args.sigma, args.relative_sigma),
        noise_per_epoch=args.noise_per_epoch,
        contain_gt=not args.no_contain_gt,
        l1_weight=args.l1_weight,
        epochs=args.epochs,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup_fraction,
        seed=args.seed,
    )


@dataclass
class RunSettings:
    """Where the run lives and what it runs on (everything that is not the optimisation)."""

    output: str
    name: str = "timerefine"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 1

    @property
    def local_mode(self) -> bool:
        return self.workers == 0

    @property
    def run_uri(self) -> str:
        return join_uri(self.output, self.name)


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit status (see the module docstring)."""
    try:
        storage = Storage(endpoint_url=args.endpoint_url)
        config = config_from_args(args, storage)
        settings = RunSettings(
            output=storage.canonical(args.output),
            name=args.name,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            max_failures=args.max_failures,
        )
        if settings.local_mode and is_s3_uri(settings.output):
            raise ValueError("--workers 0 (in-process) writes checkpoints to a local --output only")
        _print_joins(config, storage)
        _announce_resume(settings, storage, explicit=args.resume)
    except (StorageError, ValueError, FileNotFoundError) as error:
        print(f"[train] error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE

    from timerefine.compute import ray_connection

    try:
        with ray_connection(args.address, enabled=not settings.local_mode):
            summary = fit(config, settings, storage)
    except Exception as error:  # a failed run: its checkpoints stay, a rerun resumes
        logger.exception("training failed")
        print(
            f"[train] error: training failed ({error}); rerun with the same --name to resume", file=sys.stderr
        )
        return EXIT_UNUSABLE
    _print_summary(summary)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_job(sys.modules[__name__], argv)


# ---------------------------------------------------------------------------------------------------------
# The Ray wiring


def build_trainer(
    config: TrainConfig, settings: RunSettings, storage: Storage, callbacks: list | None = None
) -> TorchTrainer:
    """The TorchTrainer for a run (Ray Tune's sweep builds one per trial, with its report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = storage.resolve(settings.output)
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "storage": storage,
            "local_checkpoints": settings.run_uri if settings.local_mode else None,
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=settings.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(),  # keep every epoch's checkpoint
            callbacks=callbacks,
        ),
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """One rank's training: the epochs left after the last checkpoint. Returns this attempt's metrics."""
    import ray.train
    import ray.train.torch
    import torch

    from timerefine.timecodec import Schedule
    from timerefine.training import (
        BatchPlan,
        StepTotals,
        learning_rate,
        load_training_data,
        optimisation_step,
        training_samples,
        validation_tally,
    )

    config = TrainConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    data = load_training_data(config, loop_config["storage"])
    schedule: Schedule = config.parsed_schedule()
    plan = BatchPlan.create(config.global_batch_size, world_size, config.micro_batch_size)
    total_steps = config.epochs * plan.steps_per_epoch(len(data.train))
    model, optimizer, state = _restore_or_build(config, data, device)
    ddp_model = ray.train.torch.prepare_model(model)
    no_sync = getattr(ddp_model, "no_sync", None)
    if rank == 0:
        print(f"[train] {plan.describe()}; {schedule.describe()}; from epoch {state.epoch + 1}", flush=True)

    history = []
    for epoch in range(state.epoch, config.epochs):
        torch.manual_seed(config.seed * 10_007 + epoch)  # dropout, if any: the same on every rank
        ddp_model.train()
        samples = training_samples(data.train, data.features, schedule, config.seed, epoch)
        totals, started = StepTotals(), time.perf_counter()
        for global_batch in plan.global_batches(len(samples), config.seed, epoch):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, total_steps, config)
            micro_batches = [
                model.make_batch([samples[i] for i in indices]).to(device)
                for indices in plan.micro_batches(global_batch, rank)
            ]
            totals += optimisation_step(ddp_model, optimizer, micro_batches, plan, config.grad_clip, no_sync)
            state.step += 1
        totals = totals.all_reduced()
        metrics = {
            "epoch": epoch + 1,
            "step": state.step,
            **totals.means(),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": totals.samples / (time.perf_counter() - started),
        }
        if data.val:
            started = time.perf_counter()
            val_share = data.val[rank::world_size]
            tally = validation_tally(model, val_share, data.features, config.val_batch_size).all_reduced()
            metrics |= tally.metrics() | {"val_s": time.perf_counter() - started}
        state.epoch = epoch + 1
        _report(metrics, model, optimizer, state, rank, loop_config["local_checkpoints"])
        if rank == 0:
            print("[train] " + _format_metrics(metrics), flush=True)
        history.append(metrics)
    return history


def _restore_or_build(config: TrainConfig, data, device):
    """The model, optimiser and trainer state: from Ray Train's latest checkpoint, else fresh."""
    import ray.train
    import torch

    from timerefine.model import TimeRefineModel, load_checkpoint
    from timerefine.training import (
        TrainerState,
        answer_token_budget,
        load_training_state,
        make_optimizer,
        training_target,
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model = load_checkpoint(directory, device=device)
            optimizer = make_optimizer(model, config)
            state = load_training_state(directory, optimizer)
        return model, optimizer, state
    torch.manual_seed(config.seed)  # the same initial weights on every rank and for every worker count
    model_config = config.model_config(data.feature_dim, data.encoder, max_new_tokens=256)
    model = TimeRefineModel.from_config(model_config)
    targets = [training_target(q, config.parsed_schedule(), config.seed, 0) for q in data.train]
    model.config.max_new_tokens = answer_token_budget(model, targets)
    model.set_feature_stats(*data.feature_stats())
    model.to(device)
    return model, make_optimizer(model, config), TrainerState(epoch=0, step=0)


def _report(metrics, model, optimizer, state, rank: int, local_checkpoints: str | None) -> None:
    """Every rank reports (Ray Train waits for all); rank 0 attaches the epoch's checkpoint."""
    import ray.train

    name = _checkpoint_name(state.epoch)
    if local_checkpoints is not None:  # local mode: Ray Train stores nothing, so the checkpoint is final
        directory = Path(local_checkpoints) / name
        _write_checkpoint(directory, model, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        return
    with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
        checkpoint = None
        if rank == 0:
            _write_checkpoint(Path(staging), model, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(staging)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:03d}"


def _write_checkpoint(directory: Path, model, optimizer, state) -> None:
    from timerefine.model import save_checkpoint
    from timerefine.training import save_training_state

    save_checkpoint(model, directory)
    save_training_state(directory, optimizer, state)


# ---------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class TrainingSummary:
    run: str
    final_checkpoint: str | None
    final_epoch: int | None
    selection: str
    epochs: list[dict[str, Any]]  # every reported epoch of the run, resumed ones included
    this_attempt: list[int]  # the epochs trained by this invocation


def fit(config: TrainConfig, settings: RunSettings, storage: Storage) -> TrainingSummary:
    """Run the trainer and write ``training_summary.json`` beside the run's checkpoints."""
    result = build_trainer(config, settings, storage).fit()
    history = result.return_value or []
    if settings.local_mode:
        reported = [(None, metrics) for metrics in history]
        final_dir = {m["epoch"]: join_uri(settings.run_uri, _checkpoint_name(m["epoch"])) for m in history}
    else:
        reported = result.best_checkpoints or []
        final_dir = {m["epoch"]: _checkpoint_uri(c, settings) for c, m in reported}
    epochs = sorted((metrics for _, metrics in reported), key=lambda m: m["epoch"])
    validated = bool(epochs) and all(SELECTION_METRIC in m for m in epochs)
    selection = f"best {SELECTION_METRIC}" if validated else "last"
    final_epoch = None
    if epochs:
        key = (lambda m: (m[SELECTION_METRIC], m["epoch"])) if validated else (lambda m: m["epoch"])
        final_epoch = max(epochs, key=key)["epoch"]
    summary = TrainingSummary(
        run=settings.run_uri,
        final_checkpoint=final_dir[final_epoch] if final_epoch is not None else None,
        final_epoch=final_epoch,
        selection=selection,
        epochs=[_plain(m) for m in epochs],
        this_attempt=[m["epoch"] for m in history],
    )
    document = json.dumps(summary.__dict__, indent=2) + "\n"
    storage.write_bytes(join_uri(settings.run_uri, SUMMARY_FILE), document.encode())
    return summary


def _checkpoint_uri(checkpoint, settings: RunSettings) -> str:
    return f"s3://{checkpoint.path}" if is_s3_uri(settings.output) else checkpoint.path


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without Ray's bookkeeping fields, for the summary file."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not k.startswith("_")}


def _print_joins(config: TrainConfig, storage: Storage) -> None:
    """Check the inputs in the driver, before any worker starts, and say which queries are skipped."""
    from timerefine.data.annotations import read_annotations
    from timerefine.features import STATUS_OK, read_feature_table
    from timerefine.training import join_queries

    table = read_feature_table(config.features, storage, columns=["video_id", "status"])
    statuses = zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True)
    ok = {video_id for video_id, status in statuses if status == STATUS_OK}
    print(f"[train] {config.features}: {len(ok)} of {table.num_rows} videos have features", flush=True)
    for split, path in (("train", config.train), ("val", config.val)):
        if path:
            queries, read = read_annotations(path, durations=config.durations, storage=storage)
            print(f"[train] {read.describe()}", flush=True)
            print(f"[train] {join_queries(queries, ok, split)[1].describe()}", flush=True)


def _announce_resume(settings: RunSettings, storage: Storage, explicit: bool) -> None:
    """Say whether this invocation continues an earlier run (Ray Train resumes any run with this name)."""
    latest = _latest_epoch(settings, storage)
    if latest is not None:
        print(f"[train] resuming {settings.run_uri} after epoch {latest}", flush=True)
    elif explicit:
        print(f"[train] --resume: no checkpoint under {settings.run_uri}; starting fresh", flush=True)


def _latest_epoch(settings: RunSettings, storage: Storage) -> int | None:
    if settings.local_mode:
        return None
    from ray.train import Result

    filesystem, path = storage.resolve(settings.run_uri)
    try:
        result = Result.from_path(path, storage_filesystem=filesystem)
    except RuntimeError:  # no run directory, or no checkpoint reported yet
        return None
    return result.metrics["epoch"] if result.metrics else None


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = [f"epoch {metrics['epoch']}"]
    for key in ("loss", "ce", "l1", "val_R1@0.3", "val_R1@0.5", "val_R1@0.7", "val_mIoU", "samples_per_s"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    return "  ".join(parts)


def _print_summary(summary: TrainingSummary) -> None:
    # Each epoch's line was printed as it finished; the summary names the one chosen.
    chosen = [m for m in summary.epochs if m["epoch"] == summary.final_epoch]
    if chosen:
        print(f"[train] chosen ({summary.selection}): " + _format_metrics(chosen[0]))
    trained = ", ".join(map(str, summary.this_attempt)) or "none (the run was already complete)"
    print(f"[train] epochs trained now: {trained}")
    print(f"[train] final checkpoint ({summary.selection}): {summary.final_checkpoint}")


if __name__ == "__main__":
    sys.exit(main())
