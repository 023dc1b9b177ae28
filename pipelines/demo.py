"""The one-command demo: synthetic videos -> features -> the direct baseline and TimeRefine -> evaluation.

``timerefine demo [--workdir DIR] [--videos N]`` runs the whole pipeline on a local Ray cluster that it
starts and stops, through the same jobs a user runs one by one (``timerefine synth / extract / train /
evaluate``), and prints the table every result is judged by: the query-blind priors (the floor), the
direct baseline (K = 1, no L1 head) and TimeRefine (K = 4 with the L1 head), on the test split, with
TimeRefine's accuracy after each refinement step. It writes ``report.md`` and ``report.png`` beside the
benchmark, features, training runs and predictions.

The defaults finish in under 10 minutes on a 2-core CPU. Running it again in the same folder reuses what
is there (videos, features, finished training runs) and only redoes what is missing.

Exit status: 0 when the table was written, 2 when a stage failed (its own message says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_OK, EXIT_FAILED = 0, 2
SETTINGS_FILE = "demo.json"
REPORT_FILE, PLOT_FILE = "report.md", "report.png"
# What keeps the demo's output to its own progress lines, set for this process and every Ray worker:
QUIET_ENV = {
    # no model-loading progress bar from each worker
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Ray Train's INFO logs (resources, process group, every checkpoint) are left out; the training
    # job's own print lines reach the console once
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Data's per-dataset INFO lines (plan, start, finish) and its note that progress bars are off:
    # the jobs print their own progress
    "RAY_DATA_LOG_LEVEL": "ERROR",
    # Not RAY_BACKEND_LOG_LEVEL: it hides Ray core's notice about restartable actors (three lines a demo)
    # but makes every Ray process announce the level it read (about 25 lines).
}


@dataclass(frozen=True)
class Model:
    """One of the two models the demo trains: the same code path, two settings."""

    name: str
    label: str
    refine_steps: int
    l1_weight: float


MODELS = (
    Model("direct", "direct (K=1)", refine_steps=1, l1_weight=0.0),
    Model("timerefine", "TimeRefine (K=4, L1 1)", refine_steps=4, l1_weight=1.0),
)


@dataclass(frozen=True)
class DemoSettings:
    """What the results in a workdir depend on; a rerun with other settings needs another workdir."""

    videos: int
    epochs: int
    seed: int
    global_batch_size: int
    learning_rate: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default="runs/demo", help="where everything is written (default: %(default)s)"
    )
    parser.add_argument("--videos", type=int, default=200, help="synthetic videos, 80/10/10 train/val/test")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (see the module docstring)."""
    workdir = Path(args.workdir).resolve()
    settings = DemoSettings(args.videos, args.epochs, args.seed, args.global_batch_size, args.lr)
    try:
        _claim_workdir(workdir, settings)
    except ValueError as error:
        print(f"[demo] error: {error}", file=sys.stderr)
        return EXIT_FAILED
    _quiet_libraries()

    import ray

    stages = StageClock()
    print(f"[demo] writing everything to {workdir}", flush=True)
    dashboard = _start_local_ray()
    print(f"[demo] local Ray cluster started; its dashboard: http://{dashboard}", flush=True)
    try:
        benchmark = stages.run("synthesise the benchmark", lambda: _synthesise(workdir, settings))
        stages.run("extract features", lambda: _extract(workdir))
        rows = stages.run("fit the query-blind priors", lambda: _priors(benchmark, settings.seed))
        evaluations = {}
        for model in MODELS:
            checkpoint = stages.run(
                f"train {model.label}", lambda m=model: _train(workdir, benchmark, m, settings)
            )
            evaluations[model] = stages.run(
                f"evaluate {model.label}", lambda m=model, c=checkpoint: _evaluate(workdir, benchmark, m, c)
            )
    except StageFailed as failure:
        print(f"[demo] error: {failure}; rerun the same command to continue", file=sys.stderr)
        return EXIT_FAILED
    finally:
        ray.shutdown()

    rows |= {model.label: metrics for model, metrics in evaluations.items()}
    refined = evaluations[MODELS[1]]
    tables = _tables(rows, refined)
    print("\n" + tables, flush=True)
    _write_report(workdir, settings, rows, evaluations, tables, stages)
    print(stages.summary(), flush=True)
    print(
        f"[demo] done: the table, report.md and report.png, the benchmark, features, runs and predictions "
        f"are in {workdir}",
        flush=True,
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from timerefine.cli import run_job

    return run_job(sys.modules[__name__], argv)


# ---------------------------------------------------------------------------------------------------------
# Stages


class StageFailed(RuntimeError):
    """A stage's job returned a failure status (it printed why)."""


class StageClock:
    """Announces each stage as ``[demo] 3/7 ...`` and keeps its duration for the summary."""

    TOTAL = 3 + 2 * len(MODELS)

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self.started = time.monotonic()

    def run(self, name: str, stage: Callable[[], Any]) -> Any:
        print(f"[demo] {len(self.durations) + 1}/{self.TOTAL} {name}", flush=True)
        started = time.monotonic()
        result = stage()
        self.durations[name] = time.monotonic() - started
        print(f"[demo] {name}: {_duration(self.durations[name])}", flush=True)
        return result

    def summary(self) -> str:
        parts = ", ".join(f"{name} {_duration(seconds)}" for name, seconds in self.durations.items())
        return f"[demo] {_duration(time.monotonic() - self.started)} in all: {parts}"


@dataclass(frozen=True)
class Benchmark:
    folder: Path

    @property
    def videos(self) -> Path:
        return self.folder / "videos"

    def split(self, name: str) -> Path:
        return self.folder / f"{name}.jsonl"


def _synthesise(workdir: Path, settings: DemoSettings) -> Benchmark:
    from timerefine.data.synthetic import SynthConfig, generate_benchmark

    benchmark = Benchmark(workdir / "benchmark")
    if benchmark.split("test").is_file():  # annotations are written last: their presence means complete
        print(f"[demo] reusing {benchmark.folder}", flush=True)
        return benchmark
    summary = generate_benchmark(benchmark.folder, SynthConfig(videos=settings.videos, seed=settings.seed))
    print(f"[demo] {summary.format()}", flush=True)
    return benchmark


def _extract(workdir: Path) -> None:
    from pipelines import extract_features

    argv = ["--input", str(workdir / "benchmark" / "videos"), "--output", str(workdir / "features")]
    _run_job(
        extract_features, [*argv, "--videos-per-file", "20", "--progress-every", "20"], "feature extraction"
    )


def _priors(benchmark: Benchmark, seed: int) -> dict[str, dict[str, Any]]:
    from timerefine.baselines import fit_prior, score_prior
    from timerefine.data.annotations import read_annotations

    train, _ = read_annotations(benchmark.split("train"))
    test, _ = read_annotations(benchmark.split("test"))
    rows = {}
    for kind in ("fixed", "random"):
        prior = fit_prior(kind, train, seed=seed)
        window = f" [{prior.window[0]:.2f}, {prior.window[1]:.2f}]" if prior.window else ""
        rows[f"prior: {kind}{window}"] = score_prior(prior, test)
    return rows


def _train(workdir: Path, benchmark: Benchmark, model: Model, settings: DemoSettings) -> str:
    from pipelines import train

    argv = [
        "--features", str(workdir / "features"),
        "--train", str(benchmark.split("train")), "--val", str(benchmark.split("val")),
        "--output", str(workdir / "runs"), "--name", model.name,
        "--refine-steps", str(model.refine_steps), "--l1-weight", str(model.l1_weight),
        "--epochs", str(settings.epochs), "--global-batch-size", str(settings.global_batch_size),
        "--lr", str(settings.learning_rate), "--seed", str(settings.seed),
        "--workers", "1", "--cpus-per-worker", str(_usable_cpus()),
    ]  # fmt: skip
    _run_job(train, argv, f"training {model.label}")
    summary = json.loads((workdir / "runs" / model.name / train.SUMMARY_FILE).read_text())
    return summary["final_checkpoint"]


def _evaluate(workdir: Path, benchmark: Benchmark, model: Model, checkpoint: str) -> dict[str, Any]:
    from pipelines import evaluate

    output = workdir / "eval" / model.name
    argv = ["--checkpoint", checkpoint, "--features", str(workdir / "features")]
    argv += ["--annotations", str(benchmark.split("test")), "--output", str(output)]
    _run_job(evaluate, argv, f"evaluation of {model.label}")
    return json.loads((output / evaluate.METRICS_FILE).read_text())


def _run_job(job, argv: list[str], what: str) -> None:
    parser = argparse.ArgumentParser(prog=job.__name__)
    job.add_arguments(parser)
    if job.run(parser.parse_args(argv)) != 0:
        raise StageFailed(f"{what} failed")


# ---------------------------------------------------------------------------------------------------------
# Output


def _tables(rows: dict[str, dict[str, Any]], refined: dict[str, Any]) -> str:
    from timerefine.metrics import format_table
    from tune.report import metric_rows

    return (
        "Test split: query-blind priors, the direct baseline and TimeRefine (text answers)\n"
        + format_table(rows)
        + "\n\nTimeRefine: each answer mode, and the refined segment after each step\n"
        + format_table(metric_rows(refined))
    )


def _write_report(
    workdir: Path,
    settings: DemoSettings,
    rows: dict[str, dict[str, Any]],
    evaluations: dict[Model, dict[str, Any]],
    tables: str,
    stages: StageClock,
) -> None:
    (workdir / PLOT_FILE).write_bytes(_plot(rows, evaluations))
    times = "\n".join(f"| {name} | {_duration(seconds)} |" for name, seconds in stages.durations.items())
    text = f"""# timerefine demo

{settings.videos} synthetic videos (80 / 10 / 10 train / val / test), features from the built-in CLIP
encoder, {settings.epochs} training epochs for each model, scored on the test split (percent). The priors
never see the query or the frames: a model has learnt grounding only where it beats them.

```
{tables}
```

![scores of the priors and both models, and TimeRefine after each refinement step]({PLOT_FILE})

| stage | time |
|---|---|
{times}

Files: `benchmark/` (videos and annotations), `features/` (Parquet feature table), `runs/<model>/` (Ray
Train runs with a checkpoint per epoch), `eval/<model>/` (predictions.jsonl and metrics.json).
"""
    (workdir / REPORT_FILE).write_text(text)


def _plot(rows: dict[str, dict[str, Any]], evaluations: dict[Model, dict[str, Any]]) -> bytes:
    import io

    from matplotlib.figure import Figure

    from timerefine.metrics import METRIC_KEYS
    from tune.report import plot_step_scores

    figure = Figure(figsize=(13, 4.5), layout="constrained")
    bars, steps = figure.subplots(1, 2, width_ratios=(1.4, 1))
    width = 0.8 / len(rows)
    # Priors in greys (the floor); the models in the colours the step panel gives them (C0, C1).
    priors = len(rows) - len(evaluations)
    colours = [f"{0.5 + 0.3 * i / max(1, priors - 1):.2f}" for i in range(priors)]
    colours += [f"C{i}" for i in range(len(evaluations))]
    for index, (name, metrics) in enumerate(rows.items()):
        positions = [k + (index - (len(rows) - 1) / 2) * width for k in range(len(METRIC_KEYS))]
        bars.bar(positions, [metrics[key] for key in METRIC_KEYS], width, label=name, color=colours[index])
    bars.set_xticks(range(len(METRIC_KEYS)), METRIC_KEYS)
    bars.set_ylabel("test score (%)")
    bars.set_title("priors, direct baseline and TimeRefine")
    bars.legend(fontsize="small")
    bars.grid(axis="y", alpha=0.3)
    plot_step_scores(steps, {m.label: e["steps"] for m, e in evaluations.items() if e.get("steps")})
    steps.set_title("after each refinement step (test)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _start_local_ray() -> str:
    """Start a local Ray on 127.0.0.1 for the demo; returns its dashboard's address.

    Its GCS port is chosen here so that every worker can be told its cluster's address: Ray Train's
    helpers otherwise look the cluster up by scanning the machine's processes, and fail when another Ray
    runs beside the demo (a test session, a colleague's cluster).
    """
    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    context = ray.init(
        num_cpus=_usable_cpus(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        runtime_env={"env_vars": {**QUIET_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}},
    )
    return context.dashboard_url


def _usable_cpus() -> int:
    """The CPUs this process may run on (``taskset`` and container CPU sets included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _claim_workdir(workdir: Path, settings: DemoSettings) -> None:
    """Record the settings in a new workdir; refuse a workdir whose results came from other settings."""
    path = workdir / SETTINGS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != asdict(settings):
            raise ValueError(
                f"{workdir} holds a demo run with other settings ({stored}); choose another --workdir"
            )
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(settings), indent=2) + "\n")


def _quiet_libraries() -> None:
    """Keep the demo's own progress lines readable: no per-library INFO logs or progress bars."""
    os.environ.update(QUIET_ENV)
    # A demo's cluster serves no one else: keep Ray on 127.0.0.1 (read when Ray is first imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")  # actor-pool sizing tips
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the jobs print their own progress


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
