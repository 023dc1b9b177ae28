"""Fine-tune a grounding model with Ray Train (V2): DDP over workers, a checkpoint every epoch, resumable.

Two doors, one job: ``timerefine train ...`` and
``ray job submit --working-dir . -- python pipelines/train.py ...``.

The loop is the library's (``timerefine.loop.train``); this job supplies Ray Train's hooks: the rank and
world size, the device, ``prepare_model`` (DDP), the run's latest checkpoint when it resumes, and
``ray.train.report`` with rank 0's checkpoint every epoch. Every worker reads the feature table (small:
~150 KB a video) and the annotations and takes its share of each global batch, so the optimisation is the
same for any worker count. Ray Train keeps the run under ``--output/--name``: rerunning with the same name
(or with ``--resume``, which says so) continues after the last reported epoch.

``--workers 0`` runs the same loop in this process without Ray workers (Ray Train's local mode): quick
experiments and tests. It writes its checkpoints under a local ``--output`` itself and cannot resume.

The final checkpoint is the best by validation mIoU (the latest among equals), or the last one without
``--val``; its path is printed and written to ``<output>/<name>/training_summary.json``.

Exit status: 0 when training finished, 2 when the input cannot be used or training failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # `python pipelines/train.py` (what ray job submit runs): run it inside its package
    import _script  # noqa: F401

from timerefine.data.storage import Storage, is_s3_uri, join_uri
from timerefine.training import GROUPS, TrainConfig

from . import jobs
from .compute import TrainResources, ray_connection

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

NAME = "train"
logger = logging.getLogger("timerefine.train")

SUMMARY_FILE = "training_summary.json"
SELECTION_METRIC = "val_mIoU"
# Paths in the training configuration, made absolute before workers (in their own directories) see them.
_PATHS = ("features", "train", "val", "durations")


@dataclass
class TrainJobConfig:
    """One training job: the run's optimisation (``TrainConfig``), where it lives and what it runs on."""

    train: TrainConfig
    output: str  # storage folder or s3:// prefix for runs
    name: str = "timerefine"  # the run's folder under output: a rerun with the same name resumes
    resume: bool = False  # only makes the intent explicit (and says when there is nothing to resume)
    resources: TrainResources = field(default_factory=TrainResources)
    max_failures: int = 1  # worker-group restarts Ray Train may do
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)

    @property
    def run_uri(self) -> str:
        return join_uri(self.output, self.name)


@dataclass
class TrainResult:
    """What a training job produced; also written to ``<run>/training_summary.json``."""

    run: str
    final_checkpoint: str | None
    final_epoch: int | None
    selection: str
    epochs: list[dict[str, Any]]  # every reported epoch of the run, resumed ones included
    this_attempt: list[int]  # the epochs trained by this invocation
    exit_code: int = field(default=jobs.EXIT_OK, repr=False)

    def chosen(self) -> dict[str, Any] | None:
        return next((m for m in self.epochs if m["epoch"] == self.final_epoch), None)


# ---------------------------------------------------------------------------------------------------------
# The command line: every training option is a flag named after its TrainConfig field


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser)
    job = parser.add_argument_group("job")
    job.add_argument("--output", required=True, help="storage folder or s3:// prefix for runs")
    job.add_argument("--name", default="timerefine", help="run name: a rerun with the same name resumes")
    job.add_argument("--resume", action="store_true", help="continue the run's last checkpoint, if any")
    resources = TrainResources()
    job.add_argument("--workers", type=int, default=resources.workers, help="training workers (0: in here)")
    job.add_argument("--cpus-per-worker", type=float, default=resources.cpus_per_worker)
    job.add_argument("--gpus-per-worker", type=float, default=resources.gpus_per_worker)
    job.add_argument("--max-failures", type=int, default=1, help="worker-group restarts Ray Train may do")
    jobs.add_cluster_arguments(parser)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """A flag per ``TrainConfig`` field, ``--field-name``, in the field's group, with its default and help."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for option in dataclasses.fields(TrainConfig):
        flag = "--" + option.name.replace("_", "-")
        info = option.metadata
        kwargs: dict[str, Any] = {"help": info["help"], "dest": option.name}
        if option.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = option.default
            kwargs["help"] += f" [{option.default}]"
        if option.type in ("bool",):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _FIELD_TYPES[option.type]
            kwargs["choices"] = info["choices"]
        names = [flag, *_ALIASES.get(option.name, ())]
        groups[info["group"]].add_argument(*names, **kwargs)
    old = parser.add_argument_group("older spellings of --schedule (kept for one release)")
    old.add_argument("--refine-steps", type=int, help="K: the preset with K steps")
    old.add_argument("--sigma", type=float, nargs="+", help="noise of each step in seconds, ending in 0")
    old.add_argument("--relative-sigma", action="store_true", help="the sigmas are fractions of the duration")


# Types as dataclass annotations spell them (strings, under `from __future__ import annotations`).
_FIELD_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float}
_ALIASES = {"learning_rate": ("--lr",)}


def schedule_spec(refine_steps: int | None, sigma: list[float] | None, relative: bool) -> str:
    """The ``Schedule.parse`` spec of the older ``--refine-steps``, ``--sigma``, ``--relative-sigma``."""
    if sigma is None:
        return f"{'rel' if relative else ''}{refine_steps or 4}"
    if refine_steps is not None and refine_steps != len(sigma):
        raise ValueError(f"--refine-steps {refine_steps} but --sigma gives {len(sigma)} values")
    return ("rel:" if relative else "") + ",".join(f"{s:g}" for s in sigma)


def training_config_from_args(args: argparse.Namespace, storage: Storage) -> TrainConfig:
    """The TrainConfig the flags describe, with every path absolute (Ray Train workers run elsewhere)."""
    values = {option.name: getattr(args, option.name) for option in dataclasses.fields(TrainConfig)}
    if args.refine_steps is not None or args.sigma is not None or args.relative_sigma:
        values["schedule"] = schedule_spec(args.refine_steps, args.sigma, args.relative_sigma)
    for name in _PATHS:
        if values[name]:
            values[name] = storage.canonical(values[name])
    return TrainConfig(**values)


def config_from_args(args: argparse.Namespace) -> TrainJobConfig:
    cluster = jobs.cluster_from_args(args)
    storage = cluster.storage()
    return TrainJobConfig(
        train=training_config_from_args(args, storage),
        output=storage.canonical(args.output),
        name=args.name,
        resume=args.resume,
        resources=TrainResources(args.workers, args.cpus_per_worker, args.gpus_per_worker),
        max_failures=args.max_failures,
        cluster=cluster,
    )


# ---------------------------------------------------------------------------------------------------------
# The job


def run(config: TrainJobConfig) -> TrainResult:
    """Train; raises ``jobs.JobError`` when the input cannot be used or training failed (a rerun resumes)."""
    storage = config.cluster.storage()
    if config.resources.local_mode and is_s3_uri(config.output):
        raise jobs.JobError("--workers 0 (in-process) writes checkpoints to a local --output only")
    _check_inputs(config.train, storage)
    _announce_resume(config, storage)
    try:
        with ray_connection(config.cluster, enabled=not config.resources.local_mode):
            result = fit(config, storage)
    except Exception as error:  # a failed run: its checkpoints stay, a rerun resumes
        logger.exception("training failed")
        raise jobs.JobError(f"training failed ({error}); rerun with the same --name to resume") from error
    _print_summary(result)
    return result


def build_trainer(config: TrainJobConfig, storage: Storage, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of a run (Ray Tune's sweep builds one per trial, with its report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = storage.resolve(config.output)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.train.to_dict(),
            "storage": storage,
            "local_checkpoints": config.run_uri if config.resources.local_mode else None,
        },
        scaling_config=config.resources.scaling_config(),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(),  # keep every epoch's checkpoint
            callbacks=callbacks,
        ),
    )


def fit(config: TrainJobConfig, storage: Storage) -> TrainResult:
    """Run the trainer and write ``training_summary.json`` beside the run's checkpoints."""
    from timerefine.loop import checkpoint_name

    result = build_trainer(config, storage).fit()
    history = result.return_value or []
    if config.resources.local_mode:
        reported = [(None, metrics) for metrics in history]
        final_dir = {m["epoch"]: join_uri(config.run_uri, checkpoint_name(m["epoch"])) for m in history}
    else:
        reported = result.best_checkpoints or []
        final_dir = {m["epoch"]: _checkpoint_uri(c, config) for c, m in reported}
    epochs = sorted((metrics for _, metrics in reported), key=lambda m: m["epoch"])
    validated = bool(epochs) and all(SELECTION_METRIC in m for m in epochs)
    selection = f"best {SELECTION_METRIC}" if validated else "last"
    final_epoch = None
    if epochs:
        key = (lambda m: (m[SELECTION_METRIC], m["epoch"])) if validated else (lambda m: m["epoch"])
        final_epoch = max(epochs, key=key)["epoch"]
    summary = TrainResult(
        run=config.run_uri,
        final_checkpoint=final_dir[final_epoch] if final_epoch is not None else None,
        final_epoch=final_epoch,
        selection=selection,
        epochs=[_plain(m) for m in epochs],
        this_attempt=[m["epoch"] for m in history],
    )
    document = {k: v for k, v in dataclasses.asdict(summary).items() if k != "exit_code"}
    storage.write_bytes(
        join_uri(config.run_uri, SUMMARY_FILE), (json.dumps(document, indent=2) + "\n").encode()
    )
    return summary


# ---------------------------------------------------------------------------------------------------------
# Ray Train's side: the hooks of timerefine.loop.train


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """One rank's training: ``timerefine.loop.train`` with Ray Train's hooks. Returns this attempt's
    metrics."""
    import ray.train
    import ray.train.torch

    from timerefine.loop import TrainHooks, train
    from timerefine.training import load_training_data

    config = TrainConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    hooks = TrainHooks(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        resume_from=_ray_checkpoint,
        report=_ray_report(context.get_world_rank(), loop_config["local_checkpoints"]),
    )
    return train(config, load_training_data(config, loop_config["storage"]), hooks)


@contextmanager
def _ray_checkpoint() -> Iterator[Path | None]:
    """Ray Train's latest checkpoint of this run (after a restart or a resumed run), as a local directory."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def _ray_report(rank: int, local_checkpoints: str | None):
    """Every rank reports (Ray Train waits for all); rank 0 attaches the epoch's checkpoint."""
    import ray.train

    from timerefine.loop import checkpoint_name

    def report(metrics: dict[str, Any], write_checkpoint) -> None:
        name = checkpoint_name(metrics["epoch"])
        if local_checkpoints is not None:  # local mode: Ray Train stores nothing, so the checkpoint is final
            directory = Path(local_checkpoints) / name
            write_checkpoint(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
            return
        with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
            checkpoint = None
            if rank == 0:
                write_checkpoint(Path(staging))
                checkpoint = ray.train.Checkpoint.from_directory(staging)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    return report


# ---------------------------------------------------------------------------------------------------------
# Driver side


def _checkpoint_uri(checkpoint, config: TrainJobConfig) -> str:
    return f"s3://{checkpoint.path}" if is_s3_uri(config.output) else checkpoint.path


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without Ray's bookkeeping fields, for the summary file."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not k.startswith("_")}


def _check_inputs(config: TrainConfig, storage: Storage) -> None:
    """Check the inputs in the driver, before any worker starts, and say which queries are skipped."""
    from timerefine.data.annotations import read_annotations
    from timerefine.features import ok_video_ids
    from timerefine.training import join_queries

    ok, total = ok_video_ids(config.features, storage)
    print(f"[train] {config.features}: {len(ok)} of {total} videos have features", flush=True)
    for split, path in (("train", config.train), ("val", config.val)):
        if path:
            queries, read = read_annotations(path, durations=config.durations, storage=storage)
            print(f"[train] {read.describe()}", flush=True)
            print(f"[train] {join_queries(queries, ok, split)[1].describe()}", flush=True)


def _announce_resume(config: TrainJobConfig, storage: Storage) -> None:
    """Say whether this invocation continues an earlier run (Ray Train resumes any run with this name)."""
    latest = _latest_epoch(config, storage)
    if latest is not None:
        print(f"[train] resuming {config.run_uri} after epoch {latest}", flush=True)
    elif config.resume:
        print(f"[train] --resume: no checkpoint under {config.run_uri}; starting fresh", flush=True)


def _latest_epoch(config: TrainJobConfig, storage: Storage) -> int | None:
    if config.resources.local_mode:
        return None
    from ray.train import Result

    filesystem, path = storage.resolve(config.run_uri)
    try:
        result = Result.from_path(path, storage_filesystem=filesystem)
    except RuntimeError:  # no run directory, or no checkpoint reported yet
        return None
    return result.metrics["epoch"] if result.metrics else None


def _print_summary(summary: TrainResult) -> None:
    from timerefine.loop import format_metrics

    # Each epoch's line was printed as it finished; the summary names the one chosen.
    chosen = summary.chosen()
    if chosen:
        print(f"[train] chosen ({summary.selection}): " + format_metrics(chosen))
    trained = ", ".join(map(str, summary.this_attempt)) or "none (the run was already complete)"
    print(f"[train] epochs trained now: {trained}")
    print(f"[train] final checkpoint ({summary.selection}): {summary.final_checkpoint}")


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
