"""The report of a sweep: a table of its trials and a plot, from the files Tune wrote.

``timerefine report RESULTS`` (the sweep runs it at the end too) reads the sweep folder that
``timerefine sweep`` fills, local or ``s3://``, and writes ``report.md`` and ``report.png`` beside it:

- the table: one row per trial, its knobs, its status (finished, stopped early by ASHA, failed,
  unfinished), its best validation scores and at which epoch;
- the plot: best validation mIoU by schedule and L1 weight, every trial's validation mIoU per epoch, and
  the accuracy after each refinement step of the best trial's best checkpoint (``best_trial/metrics.json``,
  written by ``evaluate_best_trial``).

Only JSON is read: each trial's ``result.json`` (one line per reported epoch), and from Tune's experiment
state, the trial ids, folders and statuses, which it stores as plain JSON fields. Nothing is unpickled, so
a report can be made from results copied from anywhere. It also works on a sweep that is still running or
was interrupted: unfinished trials show what they reported so far.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # `python pipelines/report.py`: run it inside its package
    import _script  # noqa: F401

import pyarrow.fs as pafs
import yaml

from timerefine.data.storage import Storage, StorageError, join_uri
from timerefine.metrics import format_table
from timerefine.reporting import metric_rows, plot_step_scores

from . import jobs

NAME = "report"

METRIC = "val_mIoU"
CONFIG_FILE = "sweep.yaml"
REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
BEST_TRIAL_FOLDER = "best_trial"
EVALUATION_FILE = "metrics.json"
SELECTION_FILE = "selection.json"  # which trial, epoch and checkpoint best_trial/ evaluated


@dataclass
class TrialResult:
    """One trial as its files tell it: ``epochs`` holds a row of metrics per reported epoch, in order."""

    trial_id: str
    folder: str
    knobs: dict[str, Any]
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED; "UNKNOWN" without experiment state
    epochs: list[dict[str, Any]]

    @property
    def best(self) -> dict[str, Any] | None:
        """The epoch with the highest validation mIoU (the latest among equals), as the sweep selects."""
        scored = [row for row in self.epochs if _is_number(row.get(METRIC))]
        return max(scored, key=lambda row: (row[METRIC], row["epoch"])) if scored else None

    def outcome(self, max_epochs: int | None) -> str:
        """finished, stopped early (by ASHA: fewer epochs than configured), failed or unfinished."""
        if self.status == "ERROR":
            return "failed"
        if self.status == "TERMINATED":
            stopped_early = max_epochs is not None and len(self.epochs) < max_epochs
            return "stopped early" if stopped_early else "finished"
        return "unfinished"

    def describe_status(self, max_epochs: int | None) -> str:
        outcome, done = self.outcome(max_epochs), len(self.epochs)
        details = {
            "failed": f" after {done} epoch(s)",
            "stopped early": f" (ASHA) after {done}",
            "unfinished": f" ({done} epoch(s) so far)",
        }
        return outcome + details.get(outcome, "")


@dataclass
class SweepResults:
    """What a sweep folder holds: its configuration (when ``sweep.yaml`` is there), trials and evaluation."""

    uri: str
    axes: dict[str, list[Any]]  # search axis -> its values, in the sweep file's order
    max_epochs: int | None
    trials: list[TrialResult]
    best_evaluation: dict[str, Any] | None  # metrics.score's output for the best checkpoint on val
    best_selection: dict[str, Any] | None  # the trial, epoch and checkpoint that evaluation is of

    @property
    def best(self) -> tuple[TrialResult, dict[str, Any]] | None:
        """The trial with the highest validation mIoU at any epoch, and that epoch's metrics (whose
        ``checkpoint_path`` is the checkpoint); the earlier trial among equals."""
        scored = [trial for trial in self.trials if trial.best is not None]
        if not scored:
            return None
        trial = max(scored, key=lambda t: (t.best[METRIC], -scored.index(t)))
        return trial, trial.best

    @property
    def evaluation_of_best(self) -> dict[str, Any] | None:
        """best_trial/'s evaluation, when it is of the current best trial and epoch (a sweep that went on
        after it was made may have a new best)."""
        if self.best is None or self.best_evaluation is None or self.best_selection is None:
            return None
        trial, epoch = self.best
        evaluated = (self.best_selection.get("trial_id"), self.best_selection.get("epoch"))
        return self.best_evaluation if evaluated == (trial.trial_id, epoch["epoch"]) else None


@dataclass
class WrittenReport:
    markdown: str
    plot: str


def read_results(uri: str, storage: Storage | None = None) -> SweepResults:
    """Read a sweep folder (local or ``s3://``); raises StorageError when it holds no trial."""
    storage = storage or Storage()
    uri = storage.canonical(uri)
    config = _read_optional_yaml(storage, join_uri(uri, CONFIG_FILE))
    entries = _list_folder(storage, uri)
    states = _experiment_state(storage, uri, entries)
    if states is None:  # no experiment state saved yet: every folder with Tune's params.json is a trial
        states = [
            {"trial_id": "?", "relative_logdir": name, "status": "UNKNOWN", "config": None}
            for name, kind in sorted(entries.items())
            if kind == pafs.FileType.Directory and _exists(storage, join_uri(uri, name, "params.json"))
        ]
    if not states:
        raise StorageError(f"{uri}: no Tune trials here; give the folder a sweep writes, <storage>/<name>")
    trials = [_read_trial(storage, uri, state) for state in states]
    if config:
        axes = {
            axis: [str(v) if axis == "schedule" else v for v in values]
            for axis, values in config["search"].items()
        }
    else:
        names = sorted({key for trial in trials for key in trial.knobs})
        axes = {
            name: sorted({trial.knobs[name] for trial in trials if name in trial.knobs}, key=str)
            for name in names
        }
    max_epochs = int(config.get("train", {}).get("epochs", 10)) if config else None
    evaluation, selection = (
        _read_optional_json(storage, join_uri(uri, BEST_TRIAL_FOLDER, name))
        for name in (EVALUATION_FILE, SELECTION_FILE)
    )
    return SweepResults(uri, axes, max_epochs, trials, evaluation, selection)


def _list_folder(storage: Storage, uri: str) -> dict[str, pafs.FileType]:
    filesystem, path = storage.resolve(uri)
    if storage.file_type(uri) == pafs.FileType.File:
        raise StorageError(f"{uri}: is a file; give the folder a sweep writes, <storage>/<name>")
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such folder") from None
    return {info.base_name: info.type for info in infos}


def _exists(storage: Storage, uri: str) -> bool:
    return storage.file_type(uri) == pafs.FileType.File


def _read_text(storage: Storage, uri: str) -> str:
    data = storage.read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{uri}:{line}: not UTF-8 text (byte {error.start})") from None


def _read_json(storage: Storage, uri: str) -> Any:
    try:
        return json.loads(_read_text(storage, uri))
    except json.JSONDecodeError as error:
        raise ValueError(f"{uri}:{error.lineno}: invalid JSON at column {error.colno}: {error.msg}") from None


def _read_optional_json(storage: Storage, uri: str) -> dict[str, Any] | None:
    return _read_json(storage, uri) if _exists(storage, uri) else None


def _read_optional_yaml(storage: Storage, uri: str) -> dict[str, Any] | None:
    if not _exists(storage, uri):
        return None
    try:
        return yaml.safe_load(_read_text(storage, uri))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{uri}:{mark.line + 1}" if mark else uri
        raise ValueError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None


def _experiment_state(storage: Storage, uri: str, entries: dict[str, pafs.FileType]) -> list[dict] | None:
    """The trials of Tune's newest experiment state, reading only its plain-JSON fields."""
    names = sorted(
        name for name in entries if name.startswith("experiment_state-") and name.endswith(".json")
    )
    if not names:
        return None
    state_uri = join_uri(uri, names[-1])
    document = _read_json(storage, state_uri)
    try:
        return [json.loads(trial_state) for trial_state, _runtime in document["trial_data"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{state_uri}: not an experiment state Tune wrote ({error!r})") from None


def _read_trial(storage: Storage, uri: str, state: dict[str, Any]) -> TrialResult:
    folder = state["relative_logdir"]
    result_uri = join_uri(uri, folder, "result.json")
    rows = []
    if _exists(storage, result_uri):
        for line_number, line in enumerate(_read_text(storage, result_uri).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a trial killed while Tune wrote it
                    print(f"[report] {result_uri}:{line_number}: skipped an incomplete line", file=sys.stderr)
    by_epoch = {row["epoch"]: row for row in rows if "epoch" in row}  # a resumed trial's latest row wins
    first = rows[0] if rows else {}
    knobs = state.get("config") or first.get("config") or {}
    trial_id = state["trial_id"] if state["trial_id"] != "?" else first.get("trial_id", folder)
    return TrialResult(
        trial_id, folder, dict(knobs), state["status"], [by_epoch[e] for e in sorted(by_epoch)]
    )


# ---------------------------------------------------------------------------------------------------------
# Writing


def render_markdown(results: SweepResults) -> str:
    """report.md: what was swept, the trials (best first), and the best trial's scores step by step."""
    trials = sorted(results.trials, key=lambda t: -(t.best[METRIC] if t.best else -math.inf))
    outcomes = [trial.outcome(results.max_epochs) for trial in results.trials]
    counts = {outcome: outcomes.count(outcome) for outcome in dict.fromkeys(outcomes)}
    lines = [
        f"# Sweep report: {Path(results.uri).name}",
        "",
        f"Results: `{results.uri}`. {len(results.trials)} trials over {', '.join(results.axes)} "
        f"({', '.join(f'{n} {label}' for label, n in counts.items())}). Scores are validation percentages; "
        f"each trial's best epoch by {METRIC} is shown, as the sweep selects it.",
        "",
        "![validation mIoU by schedule and L1 weight, per epoch, and per refinement step](" + PLOT_FILE + ")",
        "",
        "| trial | " + " | ".join(results.axes) + " | status | epochs | best " + METRIC + " (epoch) | "
        "R1@0.3 | R1@0.5 | R1@0.7 | last " + METRIC + " |",
        "|" + "---|" * (len(results.axes) + 8),
    ]
    for trial in trials:
        best, last = trial.best, (trial.epochs[-1] if trial.epochs else None)
        knobs = " | ".join(_format_value(trial.knobs.get(axis)) for axis in results.axes)
        scores = (
            f"{best[METRIC]:.2f} ({best['epoch']}) | "
            + " | ".join(_format_score(best.get(f"val_R1@{t}")) for t in (0.3, 0.5, 0.7))
            if best
            else "- | - | - | -"
        )
        status = trial.describe_status(results.max_epochs)
        last_score = _format_score(last.get(METRIC) if last else None)
        lines.append(
            f"| {trial.trial_id} | {knobs} | {status} | {len(trial.epochs)} | {scores} | {last_score} |"
        )
    lines += ["", *_best_trial_section(results), ""]
    lines += [f"TensorBoard: `tensorboard --logdir {results.uri}`"]
    return "\n".join(lines) + "\n"


def _best_trial_section(results: SweepResults) -> list[str]:
    if results.best is None:
        return ["## Best trial", "", "No trial has reported a validation score yet."]
    trial, epoch = results.best
    lines = [
        "## Best trial",
        "",
        f"{trial.trial_id} ({_describe_knobs(trial.knobs)}): {METRIC} {epoch[METRIC]:.2f} at epoch "
        f"{epoch['epoch']}; checkpoint `{epoch.get('checkpoint_path')}`.",
        "",
    ]
    evaluation = results.evaluation_of_best
    if evaluation is None:
        return [*lines, "Not evaluated step by step yet: the sweep does it when its trials are done."]
    return [
        *lines,
        f"That checkpoint on the validation split ({evaluation['n']} queries, {evaluation['unparsed']} "
        "unparsed answers): the text answer, the L1 head's, their mean, and the refined segment after each "
        "step.",
        "",
        "```",
        format_table(metric_rows(evaluation)),
        "```",
    ]


def render_plot(results: SweepResults) -> bytes:
    """report.png: three panels, as PNG bytes (drawn without pyplot, so no display or global state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 5), layout="constrained")
    heatmap, curves, steps = figure.subplots(1, 3, width_ratios=(1, 1.2, 1))
    _plot_grid(heatmap, results, figure)
    _plot_curves(curves, results)
    _plot_steps(steps, results)
    figure.suptitle(f"Sweep {Path(results.uri).name}: validation scores (%)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_grid(axes, results: SweepResults, figure) -> None:
    """Best validation mIoU for each (schedule, L1 weight), the best over any other axis."""
    present = {str(trial.knobs.get("schedule")) for trial in results.trials}
    schedules = [str(s) for s in results.axes.get("schedule", []) if str(s) in present]
    schedules += sorted(present - set(schedules))
    weights = sorted({float(trial.knobs.get("l1_weight", 0.0)) for trial in results.trials})
    grid = [[math.nan] * len(weights) for _ in schedules]
    for trial in results.trials:
        if trial.best is None:
            continue
        row = schedules.index(str(trial.knobs.get("schedule")))
        column = weights.index(float(trial.knobs.get("l1_weight", 0.0)))
        if math.isnan(grid[row][column]) or trial.best[METRIC] > grid[row][column]:
            grid[row][column] = trial.best[METRIC]
    image = axes.imshow(grid, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label=f"best {METRIC}")
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            if math.isnan(value):
                axes.text(column, row, "-", ha="center", va="center", color="grey")
            else:  # dark text on the bright end of viridis, light text elsewhere
                colour = "black" if image.norm(value) > 0.6 else "white"
                axes.text(column, row, f"{value:.1f}", ha="center", va="center", color=colour)
    axes.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
    axes.set_yticks(range(len(schedules)), [_schedule_label(s) for s in schedules])
    axes.set_xlabel("L1 weight (lambda)")
    axes.set_ylabel("refinement schedule")
    axes.set_title(f"best {METRIC} by schedule and L1 weight")


def _plot_curves(axes, results: SweepResults) -> None:
    from matplotlib.ticker import MaxNLocator

    for trial in results.trials:
        points = [(row["epoch"], row[METRIC]) for row in trial.epochs if _is_number(row.get(METRIC))]
        if points:
            axes.plot(
                *zip(*points, strict=True), marker="o", markersize=3, label=_describe_knobs(trial.knobs)
            )
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(METRIC)
    axes.set_title("every trial per epoch (short lines: stopped by ASHA)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", ncols=1 + len(results.trials) // 12)
    axes.grid(alpha=0.3)


def _plot_steps(axes, results: SweepResults) -> None:
    evaluation = results.evaluation_of_best
    if evaluation is None or not evaluation.get("steps"):
        axes.text(0.5, 0.5, "no step-by-step evaluation of the best trial yet", ha="center", va="center")
        axes.set_axis_off()
        return
    trial, _ = results.best
    plot_step_scores(axes, {_describe_knobs(trial.knobs): evaluation["steps"]})
    axes.set_title("the best trial's checkpoint after each refinement step", fontsize="medium")


def write_report(uri: str, storage: Storage | None = None) -> WrittenReport:
    """Write report.md and report.png into the sweep folder; returns where."""
    storage = storage or Storage()
    results = read_results(uri, storage)
    markdown_uri, plot_uri = join_uri(results.uri, REPORT_FILE), join_uri(results.uri, PLOT_FILE)
    storage.write_bytes(plot_uri, render_plot(results))
    storage.write_bytes(markdown_uri, render_markdown(results).encode())
    return WrittenReport(markdown_uri, plot_uri)


def _schedule_label(spec: str) -> str:
    return "K=1 (direct)" if spec == "1" else f"K={spec}" if spec.isdigit() else spec


def _describe_knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{key} {_format_value(value)}" for key, value in knobs.items())


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _format_score(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "-"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass
class ReportConfig:
    results: str  # a sweep folder, <storage>/<name> (local or s3://)
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="a sweep folder, <storage>/<name> (local or s3://)")
    jobs.add_storage_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    return ReportConfig(args.results, jobs.cluster_from_args(args))


def run(config: ReportConfig) -> WrittenReport:
    written = write_report(config.results, config.cluster.storage())
    print(f"[report] wrote {written.markdown} and {written.plot}")
    return written


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
