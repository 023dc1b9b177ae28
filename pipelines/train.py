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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # `python pipelines/train.py` (what ray job submit runs): run it inside its package
    import _script  # noqa: F401

from timerefine.checkpoint import TRAINING_CHECKPOINT_ENTRIES
from timerefine.data.storage import Storage, is_s3_uri, join_uri
from timerefine.training import GROUPS, TrainConfig

from . import jobs
from .compute import TrainResources, ray_connection

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

NAME = "train"
logger = logging.getLogger("timerefine.train")

SUMMARY_FILE = "training_summary.json"
METRICS_FILE = "metrics.json"  # an epoch's metrics, beside its checkpoint
CHECKPOINT_PREFIX = "checkpoint_epoch_"  # timerefine.loop.checkpoint_name's
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
    say = jobs.console(NAME, config.name)
    _check_inputs(config.train, storage, say)
    jobs.check_output_folder(config.output, storage)
    _announce_resume(config, storage, say)
    try:
        with ray_connection(config.cluster, enabled=not config.resources.local_mode, state_api=True):
            result = fit(config, storage)
    except Exception as error:  # a failed run: its checkpoints stay, a rerun resumes
        logger.exception("training failed")
        raise jobs.JobError(f"training failed ({error}); rerun with the same --name to resume") from error
    _print_summary(result, say)
    return result


def progress(config: TrainJobConfig) -> str:
    """What an interrupted run had committed (the job protocol's line after an interrupt)."""
    if config.resources.local_mode:
        return f"checkpoints so far are in {config.run_uri}; --workers 0 does not resume: a rerun starts over"
    latest = _latest_epoch(config, config.cluster.storage())
    if latest is None:
        return f"no epoch of {config.run_uri} had finished; {jobs.RESUME} (from the start)"
    return f"every epoch up to {latest} is checkpointed in {config.run_uri}; {jobs.RESUME} after it"


def build_trainer(config: TrainJobConfig, storage: Storage, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of a run (Ray Tune's sweep builds one per trial, with its report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from .torch_store import LoopbackTorchConfig

    filesystem, storage_path = storage.portable_filesystem(config.output)  # keeps its S3 retries in workers
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=LoopbackTorchConfig(),  # a local run's process group listens on 127.0.0.1 only
        train_loop_config={
            "config": config.train.to_dict(),
            "storage": storage,
            "local_checkpoints": config.run_uri if config.resources.local_mode else None,
            "run": None if config.resources.local_mode else config.run_uri,
            "name": config.name,
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

    result = _fit_in_a_thread(build_trainer(config, storage))
    history = result.return_value or []
    if config.resources.local_mode:
        by_epoch = {metrics["epoch"]: metrics for metrics in history}
    else:
        # Every epoch checkpointed in the run folder: Ray Train registers a report only when it next polls
        # the workers (every 2 s), so a worker lost meanwhile loses the registration, not the checkpoint.
        by_epoch = {metrics["epoch"]: metrics for _, metrics in result.best_checkpoints or []}
        by_epoch |= checkpointed_metrics(config.run_uri, storage)
    epochs = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    validated = bool(epochs) and all(SELECTION_METRIC in m for m in epochs)
    selection = f"best {SELECTION_METRIC}" if validated else "last"
    final_epoch = None
    if epochs:
        key = (lambda m: (m[SELECTION_METRIC], m["epoch"])) if validated else (lambda m: m["epoch"])
        final_epoch = max(epochs, key=key)["epoch"]
    summary = TrainResult(
        run=config.run_uri,
        final_checkpoint=join_uri(config.run_uri, checkpoint_name(final_epoch)) if epochs else None,
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


def _fit_in_a_thread(trainer: TorchTrainer):
    """``trainer.fit()``, waited for here. Called from the main thread, Ray Train installs its own Ctrl-C
    handler, which aborts the workers gracefully (14 s measured on 2 busy cores) and then exits the process
    without a word of what was committed; from another thread it installs none (as in Tune's trials), so
    Ctrl-C interrupts this wait at once, as SIGTERM does, and the job protocol ends the run."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)  # daemon: Ray stops it
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


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
    say = jobs.console(NAME, loop_config["name"])
    hooks = TrainHooks(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        resume_from=lambda: _newest_complete_checkpoint(loop_config["run"], loop_config["storage"], say),
        report=_ray_report(context.get_world_rank(), loop_config["local_checkpoints"]),
        log=say,
    )
    return train(config, load_training_data(config, loop_config["storage"]), hooks)


@contextmanager
def _newest_complete_checkpoint(
    run_uri: str | None, storage: Storage, say: Callable[[str], None]
) -> Iterator[Path | None]:
    """The newest complete checkpoint in the run folder (after a restart or a resumed run), as a local
    directory; None to start afresh (and always in local mode, which does not resume).

    The folder, not Ray Train's registry, is what a run resumes from: a checkpoint is written whole before
    its report, while Ray Train registers reports only when it next polls the workers, so a worker killed
    in between would otherwise cost the epochs since that poll. A checkpoint damaged since it was written
    (a file deleted or cut short by hand, a copy interrupted) would fail every restart the same way: it is
    refused, saying why, and the one before it is used.
    """
    from timerefine.checkpoint import fetch_checkpoint, training_checkpoint_problem

    names = epoch_checkpoints(run_uri, storage) if run_uri is not None else []
    for name in reversed(names):
        uri = join_uri(run_uri, name)
        with tempfile.TemporaryDirectory(prefix="timerefine-resume-") as staging:
            directory = fetch_checkpoint(uri, storage, Path(staging))
            problem = training_checkpoint_problem(directory)
            if problem is None:
                yield directory
                return
        say(f"refusing checkpoint {uri}: {problem}; trying the one before")
    if names:
        say(f"no complete checkpoint in {run_uri}: starting from the first epoch")
    yield None


def epoch_checkpoints(run_uri: str, storage: Storage) -> list[str]:
    """The names of the run's epoch checkpoint folders (``checkpoint_epoch_NNN``), oldest first."""
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(run_uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        info.base_name
        for info in infos
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)
    )


def whole_epoch_checkpoints(run_uri: str, storage: Storage) -> list[int]:
    """The epochs whose checkpoint folder holds every entry a resumed run needs, oldest first. Ray Train
    copies a checkpoint's files in no fixed order, so one file present (trainer_state.json) is not
    enough; on S3 an object exists only once uploaded whole. (Workers also check each file's contents
    before resuming from one: ``_newest_complete_checkpoint``.)"""
    import pyarrow.fs as pafs

    return [
        int(name.removeprefix(CHECKPOINT_PREFIX))
        for name in epoch_checkpoints(run_uri, storage)
        if all(
            storage.file_type(join_uri(run_uri, name, entry)) != pafs.FileType.NotFound
            for entry in TRAINING_CHECKPOINT_ENTRIES
        )
    ]


def checkpointed_metrics(run_uri: str, storage: Storage) -> dict[int, dict[str, Any]]:
    """Each checkpointed epoch's metrics, as written beside its checkpoint (``metrics.json``)."""
    import pyarrow.fs as pafs

    metrics = {}
    for name in epoch_checkpoints(run_uri, storage):
        uri = join_uri(run_uri, name, METRICS_FILE)
        if storage.file_type(uri) == pafs.FileType.File:
            epoch_metrics = json.loads(storage.read_bytes(uri))
            metrics[epoch_metrics["epoch"]] = epoch_metrics
    return metrics


def _ray_report(rank: int, local_checkpoints: str | None):
    """Every rank reports (Ray Train waits for all); rank 0 attaches the epoch's checkpoint."""
    import ray.train

    from timerefine.loop import checkpoint_name

    def write_with_metrics(directory: Path, metrics: dict[str, Any], write_checkpoint) -> None:
        write_checkpoint(directory)
        (directory / METRICS_FILE).write_text(json.dumps(_plain(metrics), indent=2) + "\n")

    def report(metrics: dict[str, Any], write_checkpoint) -> None:
        name = checkpoint_name(metrics["epoch"])
        if local_checkpoints is not None:  # local mode: Ray Train stores nothing, so the checkpoint is final
            directory = Path(local_checkpoints) / name
            write_with_metrics(directory, metrics, write_checkpoint)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
            return
        with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
            checkpoint = None
            if rank == 0:
                write_with_metrics(Path(staging), metrics, write_checkpoint)
                checkpoint = ray.train.Checkpoint.from_directory(staging)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    return report


# ---------------------------------------------------------------------------------------------------------
# Driver side


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without Ray's bookkeeping fields, for the summary file."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not k.startswith("_")}


def _check_inputs(config: TrainConfig, storage: Storage, say: Callable[[str], None]) -> None:
    """Check the inputs in the driver, before any worker starts, and say which queries are skipped."""
    from timerefine.data.annotations import read_annotations
    from timerefine.features import ok_video_ids
    from timerefine.training import join_queries

    ok, total = ok_video_ids(config.features, storage)
    say(f"{config.features}: {len(ok)} of {total} videos have features")
    for split, path in (("train", config.train), ("val", config.val)):
        if path:
            queries, read = read_annotations(path, durations=config.durations, storage=storage)
            say(read.describe())
            say(join_queries(queries, ok, split)[1].describe())


def _announce_resume(config: TrainJobConfig, storage: Storage, say: Callable[[str], None]) -> None:
    """Say whether this invocation continues an earlier run (Ray Train resumes any run with this name)."""
    latest = _latest_epoch(config, storage)
    if latest is not None:
        say(f"resuming {config.run_uri} after epoch {latest}")
    elif config.resume:
        say(f"--resume: no checkpoint under {config.run_uri}; starting fresh")


def _latest_epoch(config: TrainJobConfig, storage: Storage) -> int | None:
    """The newest epoch with a whole checkpoint in the run folder; None in local mode, which does not
    resume (or when there is none)."""
    if config.resources.local_mode:
        return None
    return max(whole_epoch_checkpoints(config.run_uri, storage), default=None)


def _print_summary(summary: TrainResult, say: Callable[[str], None]) -> None:
    from timerefine.loop import format_metrics

    # Each epoch's line was printed as it finished; the summary names the one chosen.
    chosen = summary.chosen()
    if chosen:
        say(f"chosen ({summary.selection}): " + format_metrics(chosen))
    trained = ", ".join(map(str, summary.this_attempt)) or "none (the run was already complete)"
    say(f"epochs trained now: {trained}")
    say(f"final checkpoint ({summary.selection}): {summary.final_checkpoint}")


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
