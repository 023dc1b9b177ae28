"""Sweep TimeRefine's two knobs, the refinement schedule and the L1 weight, with Ray Tune.

Two doors, one job: ``timerefine sweep --config tune/synthetic.yaml`` and
``ray job submit --working-dir . -- python tune/sweep.py --config tune/synthetic.yaml`` (or
``pipelines/sweep.py``; ``tune/`` holds the search spaces and that door).

A sweep is a YAML file (``load_sweep_config``; tune/*.yaml are commented examples): the data, the search
axes (schedule x L1 weight, optionally learning rate, LoRA rank or any other training option), the training
options shared by every trial, the resources of one trial and ASHA's settings. Every combination of the
axes is one trial, except that the direct schedule (K = 1) has no ``<offset>`` token for the L1 head to
learn from, so it runs once, with weight 0: the direct baseline.

Each trial is a function that builds the training job's TorchTrainer (``pipelines.train.build_trainer``)
and fits it, Ray Train V2's pattern for Tune: ``TuneReportCallback`` hands every epoch's metrics to Tune,
and ASHA stops weak trials on validation mIoU with ``epoch`` as its clock. Tune does not see the resources
of Train's workers, so the number of concurrent trials is computed from what one trial's workers ask for
and what the cluster has.

Everything lands under one storage path (local folder or ``s3://``), ``<storage>/<name>/``:

    sweep.yaml                      the configuration the sweep runs with (restores and reports read it)
    <trial>/                        Tune's files: params.json, result.json, progress.csv, TensorBoard events
    <trial>/train/                  the trial's Ray Train run: a checkpoint every epoch
    best_trial/                     the best checkpoint evaluated on the validation split, step by step
    report.md, report.png           written by ``timerefine report`` at the end (pipelines/report.py)

Running the same command again continues an interrupted sweep (``Tuner.restore``): finished trials are
kept, unfinished ones resume from their Train run's last checkpoint. TensorBoard reads
``tensorboard --logdir <storage>/<name>``; each trial's Train run appears in Ray's dashboard.

Exit status: 0 when every trial finished, 1 when some trial failed (the report is still written), 2 when
the configuration or the data cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # `python pipelines/sweep.py`: run it inside its package
    import _script  # noqa: F401

import pyarrow.fs as pafs
import yaml

from timerefine.data.storage import Storage, is_s3_uri, join_uri
from timerefine.errors import INPUT_ERRORS
from timerefine.training import TrainConfig

from . import jobs, report
from .compute import TRIAL_DRIVER_RESOURCES, TrainResources, max_concurrent_runs, ray_connection
from .train import (
    SELECTION_METRIC,
    TrainJobConfig,
    build_trainer,
    checkpointed_metrics,
    whole_epoch_checkpoints,
)

NAME = "sweep"
logger = logging.getLogger("timerefine.sweep")

METRIC = SELECTION_METRIC  # validation mIoU, reported by every epoch of a Train run
TIME_ATTR = "epoch"
CONFIG_FILE = "sweep.yaml"
TRAIN_RUN_NAME = "train"
DATA_FIELDS = ("features", "train", "val", "durations")  # the TrainConfig fields under `data:`
REQUIRED_DATA = ("features", "train", "val")


class SweepConfigError(ValueError):
    """A sweep file that cannot be used; the message names the file and the key."""


@dataclass
class SweepResources(TrainResources):
    """What one trial's Train run asks for (the training job's resources), and how many trials may run at
    once (None: as many as fit)."""

    max_concurrent_trials: int | None = None


@dataclass
class AshaSpec:
    """ASHA's rungs: every trial runs ``grace_period`` epochs; each rung keeps 1 / ``reduction_factor``."""

    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    """One sweep: see tune/synthetic.yaml for a commented example of every key."""

    name: str
    data: dict[str, str]  # the TrainConfig data fields (features, train, val, durations), absolute
    search: dict[str, list[Any]]
    train: dict[str, Any] = field(default_factory=dict)
    resources: SweepResources = field(default_factory=SweepResources)
    asha: AshaSpec = field(default_factory=AshaSpec)
    storage: str = "runs/sweeps"

    @property
    def epochs(self) -> int:
        return int(self.train.get("epochs", TrainConfig.epochs))

    def train_config(self, variant: Mapping[str, Any]) -> TrainConfig:
        """The training configuration of the trial running ``variant`` (one value per search axis)."""
        return TrainConfig.from_dict({**self.data, **self.train, **variant})

    def variants(self) -> list[dict[str, Any]]:
        """Every combination of the search axes, in file order, with the direct schedule run once.

        K = 1 answers without an ``<offset>`` token, so its L1 weight changes nothing: it keeps one variant,
        with weight 0, which is the direct baseline.
        """
        variants: list[dict[str, Any]] = []
        for values in itertools.product(*self.search.values()):
            variant = dict(zip(self.search, values, strict=True))
            if self.train_config(variant).parsed_schedule().direct:
                variant["l1_weight"] = 0.0
            if variant not in variants:
                variants.append(variant)
        return variants

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_sweep_config(path: str | Path, base: Path | None = None) -> SweepConfig:
    """Read and check a sweep file; relative local data paths are taken from ``base`` (default: the current
    directory) and made absolute, since trials run in their own directories."""
    path = Path(path)
    if path.is_dir():
        raise SweepConfigError(f"{path}: is a folder; --config takes a sweep file (YAML)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SweepConfigError(f"{path}: no such sweep file") from None
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise SweepConfigError(f"{path}, line {line}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepConfigError(f"{path}{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    return sweep_config_from_dict(document, source=str(path), base=base or Path.cwd())


def sweep_config_from_dict(document: Any, source: str, base: Path) -> SweepConfig:
    """Build and check a SweepConfig from a parsed YAML document (``source`` names it in errors)."""

    def fail(message: str) -> SweepConfigError:
        return SweepConfigError(f"{source}: {message}")

    if not isinstance(document, dict):
        raise fail("expected a mapping with keys name, data, search, train, resources, asha, storage")
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; known keys: {sorted(known)}")
    for key in ("name", "data", "search"):
        if key not in document:
            raise fail(f"missing key {key!r}")
    name = document["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise fail(f"'name' must be a non-empty string without '/', got {name!r}")

    data = _data_section(document.get("data"), base, fail)
    resources = _section(document, "resources", SweepResources, fail)
    asha = _section(document, "asha", AshaSpec, fail)
    search = _search_axes(document["search"], fail)
    train = document.get("train") or {}
    if not isinstance(train, dict):
        raise fail(f"'train' must be a mapping of training options, got {type(train).__name__}")
    training_options = {f.name for f in dataclasses.fields(TrainConfig)} - set(DATA_FIELDS)
    for key in sorted(set(search) | set(train)):
        if key not in training_options:
            raise fail(f"{key!r} is not a training option; choose from {sorted(training_options)}")
    both = sorted(set(search) & set(train))
    if both:
        raise fail(f"{both} appear under both 'search' and 'train'; keep each option in one place")

    config = SweepConfig(
        name=name,
        data=data,
        search=search,
        train=train,
        resources=resources,
        asha=asha,
        storage=_absolute(str(document.get("storage") or SweepConfig.storage), base),
    )
    _check_numbers(config, fail)
    # Every trial's options must be valid before any trial starts.
    for values in itertools.product(*config.search.values()):
        variant = dict(zip(config.search, values, strict=True))
        try:
            config.train_config(variant)
        except (TypeError, ValueError) as error:
            raise fail(f"trial {variant}: {error}") from None
    return config


def _data_section(values: Any, base: Path, fail) -> dict[str, str]:
    if not isinstance(values, dict):
        raise fail("'data' must be a mapping with features, train and val (durations optional)")
    unknown = sorted(set(values) - set(DATA_FIELDS))
    if unknown:
        raise fail(f"unknown key(s) {unknown} under 'data'; known: {sorted(DATA_FIELDS)}")
    missing = [key for key in REQUIRED_DATA if not values.get(key)]
    if missing:
        raise fail(f"'data': missing {missing}")
    return {key: _absolute(str(value), base) for key, value in values.items() if value is not None}


def _section(document: dict, key: str, spec: type, fail) -> Any:
    values = document.get(key) or {}
    if not isinstance(values, dict):
        raise fail(f"'{key}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(spec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise fail(f"unknown key(s) {unknown} under '{key}'; known: {sorted(known)}")
    try:
        return spec(**values)
    except TypeError as error:  # a required key is missing
        raise fail(f"'{key}': {error}") from None


def _search_axes(search: Any, fail) -> dict[str, list[Any]]:
    if not isinstance(search, dict):
        raise fail("'search' must map training options to lists of values")
    for required in ("schedule", "l1_weight"):
        if required not in search:
            raise fail(f"'search' needs a {required!r} axis (a one-value list fixes it)")
    axes: dict[str, list[Any]] = {}
    for key, values in search.items():
        if not isinstance(values, list) or not values:
            raise fail(f"search axis {key!r} must be a non-empty list, got {values!r}")
        axes[key] = values
    axes["schedule"] = [str(value) for value in axes["schedule"]]  # "4" and 4 are the same preset
    return axes


def _check_numbers(config: SweepConfig, fail) -> None:
    resources, asha = config.resources, config.asha
    if resources.workers < 1:
        raise fail(f"resources.workers must be >= 1, got {resources.workers}")
    if not resources.per_run():
        raise fail("a trial's workers must ask for some CPUs or GPUs")
    if resources.max_concurrent_trials is not None and resources.max_concurrent_trials < 1:
        raise fail(f"resources.max_concurrent_trials must be >= 1, got {resources.max_concurrent_trials}")
    if asha.grace_period < 1 or asha.reduction_factor < 2:
        raise fail("asha.grace_period must be >= 1 and asha.reduction_factor >= 2")


def _absolute(uri: str, base: Path) -> str:
    if is_s3_uri(uri) or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def max_concurrent_trials(resources: SweepResources, cluster: Mapping[str, float]) -> int:
    """How many trials' Train runs fit in the cluster at once (``pipelines.compute.max_concurrent_runs``)."""
    return max_concurrent_runs(resources, dict(cluster), resources.max_concurrent_trials)


# ---------------------------------------------------------------------------------------------------------
# The trial


@dataclass
class TrialSettings:
    """What every trial needs besides its variant; handed to trials with ``tune.with_parameters``."""

    config: SweepConfig
    experiment_uri: str
    storage: Storage


def run_trial(variant: dict[str, Any], settings: TrialSettings) -> None:
    """One trial: fit the training job's TorchTrainer with this variant, reporting every epoch to Tune.

    The Train run lives in the trial's folder under a fixed name, so a trial restored after an interruption
    continues its run from the last checkpoint instead of starting over.

    A restored trial first reports its checkpointed epochs again: the sweep's driver may have died after
    a checkpoint and before Tune recorded its epoch, which would otherwise be missing from the trial's
    results (the report keeps one row an epoch; TensorBoard shows such an epoch twice). A trial with every
    epoch checkpointed stops there: its Train run would report nothing, and Tune fails a sweep whose trial
    ends without the metric.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    # Read by the trainer when it starts: the run then appears in the Ray dashboard's Train view.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    trial_folder = Path(ray.tune.get_context().get_trial_dir()).name
    resources = settings.config.resources
    job = TrainJobConfig(
        train=settings.config.train_config(variant),
        output=join_uri(settings.experiment_uri, trial_folder),
        name=TRAIN_RUN_NAME,
        resources=TrainResources(resources.workers, resources.cpus_per_worker, resources.gpus_per_worker),
    )
    checkpointed = whole_epoch_checkpoints(job.run_uri, settings.storage)
    if checkpointed:
        metrics = checkpointed_metrics(job.run_uri, settings.storage)
        for epoch in checkpointed:
            if epoch in metrics:
                ray.tune.report(metrics[epoch])
    if job.train.epochs in checkpointed:
        return
    build_trainer(job, settings.storage, callbacks=[TuneReportCallback()]).fit()


def trial_dirname(trial) -> str:
    """Folder names that say what a trial runs: ``trial_<id>_schedule=4_l1_weight=0.3``."""
    knobs = "_".join(f"{key}={value}" for key, value in trial.config.items())
    return f"trial_{trial.trial_id}_{knobs}".replace("/", "-")


# ---------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepJobConfig:
    config: str  # the sweep file (tune/synthetic.yaml, tune/charades.yaml...)
    storage: str | None = None  # results folder or s3:// prefix (default: the file's 'storage')
    name: str | None = None  # sweep name under the storage path (default: the file's 'name')
    no_report: bool = False  # skip the evaluation of the best trial and the report
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)


@dataclass
class SweepResult:
    experiment: str  # <storage>/<name>
    failed: list[str]  # folders of the trials that failed
    report: report.WrittenReport | None

    @property
    def exit_code(self) -> int:
        return jobs.EXIT_INCOMPLETE if self.failed else jobs.EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="sweep file (tune/synthetic.yaml, tune/charades.yaml...)"
    )
    parser.add_argument("--storage", help="results folder or s3:// prefix (default: the file's 'storage')")
    parser.add_argument("--name", help="sweep name under the storage path (default: the file's 'name')")
    parser.add_argument(
        "--no-report", action="store_true", help="skip the evaluation of the best trial and the report"
    )
    jobs.add_cluster_arguments(parser)


def config_from_args(args: argparse.Namespace) -> SweepJobConfig:
    return SweepJobConfig(args.config, args.storage, args.name, args.no_report, jobs.cluster_from_args(args))


def run(job: SweepJobConfig) -> SweepResult:
    """Run (or continue) the sweep, then evaluate its best trial and write the report."""
    config = load_sweep_config(job.config)
    if job.name:
        config.name = job.name
    storage = job.cluster.storage()
    experiment_uri = join_uri(storage.canonical(job.storage or config.storage), config.name)
    check_data(config.data, storage)
    jobs.check_output_folder(experiment_uri, storage)
    claim_sweep_folder(config, experiment_uri, storage)

    written = None
    with ray_connection(job.cluster, state_api=True):
        failed = fit(config, experiment_uri, storage)
        if not job.no_report:
            evaluate_best_trial(config, experiment_uri, storage, job.cluster)
            written = report.write_report(experiment_uri, storage)
            print(f"[sweep] report: {written.markdown} and {written.plot}", flush=True)
    if failed:
        print(
            f"[sweep] {len(failed)} trial(s) failed: {', '.join(failed)}; rerun to retry them",
            file=sys.stderr,
        )
    return SweepResult(experiment_uri, failed, written)


def progress(job: SweepJobConfig) -> str:
    """What an interrupted sweep had committed (the job protocol's line after an interrupt)."""
    config = load_sweep_config(job.config)
    storage = job.cluster.storage()
    experiment_uri = join_uri(storage.canonical(job.storage or config.storage), job.name or config.name)
    results = report.read_results(experiment_uri, storage)
    epochs = sum(len(trial.epochs) for trial in results.trials)
    return (
        f"{len(results.trials)} trial(s) with {epochs} checkpointed epoch(s) in all are kept in "
        f"{experiment_uri}; {jobs.RESUME} (finished trials are not run again)"
    )


def check_data(data: Mapping[str, str], storage: Storage) -> None:
    """Fail in the driver, before any trial starts, when an input is missing or unreadable (every trial
    would fail the same way)."""
    from timerefine.data.annotations import read_annotations
    from timerefine.features import part_uris

    if not part_uris(data["features"], storage):
        raise FileNotFoundError(f"{data['features']}: no feature table here (run `timerefine extract` first)")
    for split in ("train", "val"):
        uri = data[split]
        if storage.file_type(uri) != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}: no such annotation file (data.{split})")
        read_annotations(uri, durations=data.get("durations"), storage=storage)


def claim_sweep_folder(config: SweepConfig, experiment_uri: str, storage: Storage) -> None:
    """Record the configuration in a new sweep folder; accept a folder started with the same one.

    Tune cannot change a sweep's search space once it started, so a changed file is an error rather than
    a continued sweep that silently ignores the change.
    """
    config_uri = join_uri(experiment_uri, CONFIG_FILE)
    if storage.file_type(config_uri) == pafs.FileType.NotFound:
        storage.write_bytes(config_uri, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
        return
    try:
        stored = yaml.safe_load(storage.read_bytes(config_uri))
    except yaml.YAMLError as error:
        raise SweepConfigError(f"{config_uri}: not valid YAML ({error}); delete it to start over") from None
    wanted = config.to_dict()
    if not isinstance(stored, dict):
        raise SweepConfigError(f"{config_uri}: not a sweep configuration; delete it to start over")
    if stored != wanted:
        changed = sorted(key for key in stored.keys() | wanted.keys() if stored.get(key) != wanted.get(key))
        raise SweepConfigError(
            f"{experiment_uri} holds a sweep started with another configuration (differs in {changed}); "
            "choose another --name, or delete that folder to start over"
        )


def fit(config: SweepConfig, experiment_uri: str, storage: Storage) -> list[str]:
    """Run the sweep's trials, continuing an interrupted sweep at ``experiment_uri``; returns the failed."""
    import ray
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    # Tune's own Ctrl-C handler ends the sweep as if done, and the driver would go on to evaluate and report
    # a partial sweep; without it Ctrl-C interrupts as SIGTERM does (the job protocol's line), and a rerun
    # restores the experiment state Tune saves as it goes.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    filesystem, experiment_path = storage.resolve(experiment_uri)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, settings=TrialSettings(config, experiment_uri, storage)),
        TRIAL_DRIVER_RESOURCES,
    )
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        print(f"[sweep] continuing {experiment_uri}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        variants = config.variants()
        concurrency = max_concurrent_trials(config.resources, ray.cluster_resources())
        print(
            f"[sweep] {len(variants)} trials over {', '.join(config.search)}; up to {concurrency} at once "
            f"({_describe_need(config.resources)} each); ASHA on {METRIC} per {TIME_ATTR}; "
            f"results in {experiment_uri}",
            flush=True,
        )
        # The grid is enumerated here (the direct schedule once) and handed to Tune as points to evaluate;
        # the param space names each axis's values, which Tune shows and checks the points against.
        axes = {key: list(dict.fromkeys(variant[key] for variant in variants)) for key in config.search}
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune.choice(values) for key, values in axes.items()},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                # Given a search algorithm, Tune ignores max_concurrent_trials: the algorithm limits it.
                search_alg=BasicVariantGenerator(points_to_evaluate=variants, max_concurrent=concurrency),
                num_samples=len(variants),
                scheduler=ASHAScheduler(
                    time_attr=TIME_ATTR,
                    max_t=config.epochs,
                    grace_period=config.asha.grace_period,
                    reduction_factor=config.asha.reduction_factor,
                ),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=str(Path(experiment_path).parent),
                storage_filesystem=filesystem,
                callbacks=[TBXLoggerCallback()],
            ),
        )
    results = tuner.fit()
    return [Path(result.path).name for result in results if result.error is not None]


def evaluate_best_trial(
    config: SweepConfig, experiment_uri: str, storage: Storage, cluster: jobs.ClusterOptions
) -> bool:
    """Evaluate the best trial's best checkpoint on the validation split with the evaluation job, step by
    step, into ``<sweep>/best_trial/`` (what the report plots). Skipped when that checkpoint already has
    its evaluation, as when a finished sweep is run again. Returns whether an evaluation is there."""
    from .evaluate import EvaluateConfig
    from .evaluate import run as evaluate

    results = report.read_results(experiment_uri, storage)
    chosen = results.best
    if chosen is None:
        print("[sweep] no trial reported a validation score: nothing to evaluate", file=sys.stderr)
        return False
    trial, epoch = chosen
    checkpoint = epoch["checkpoint_path"]
    checkpoint = f"s3://{checkpoint}" if is_s3_uri(experiment_uri) else checkpoint
    selection = {
        "trial_id": trial.trial_id,
        "knobs": trial.knobs,
        "epoch": epoch["epoch"],
        "checkpoint": checkpoint,
    }
    if results.best_selection == selection and results.best_evaluation is not None:
        return True
    print(
        f"[sweep] evaluating the best trial {trial.trial_id} (epoch {epoch['epoch']}) on {config.data['val']}"
    )
    folder = join_uri(experiment_uri, report.BEST_TRIAL_FOLDER)
    evaluation = EvaluateConfig(
        checkpoint=checkpoint,
        features=config.data["features"],
        annotations=config.data["val"],
        durations=config.data.get("durations"),
        output=folder,
        cluster=cluster,
    )
    try:
        evaluate(evaluation)
    except (jobs.JobError, *INPUT_ERRORS) as error:
        print(
            f"[sweep] the best trial's evaluation failed ({error}); the report goes without it",
            file=sys.stderr,
        )
        return False
    storage.write_bytes(join_uri(folder, report.SELECTION_FILE), json.dumps(selection, indent=2).encode())
    return True


def _describe_need(resources: SweepResources) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.per_run().items())


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
