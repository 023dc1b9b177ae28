"""The sweep report, on sweep folders laid out as Ray Tune writes them: experiment state, one folder per trial
with params.json and result.json (a JSON line per reported epoch), sweep.yaml, best_trial/."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import report
from timerefine.cli import main as timerefine
from timerefine.data.storage import StorageError

SEARCH = {"schedule": ["1", "2", "4"], "l1_weight": [0.0, 1.0]}


def trial(trial_id: str, schedule: str, l1_weight: float, status: str, mious: list[float]) -> dict:
    return {"trial_id": trial_id, "config": {"schedule": schedule, "l1_weight": l1_weight}, "status": status,
            "mious": mious}  # fmt: skip


TRIALS = [
    trial("a_00000", "1", 0.0, "TERMINATED", [10.0, 20.0, 25.0]),
    trial("a_00001", "2", 0.0, "TERMINATED", [12.0, 14.0]),  # stopped by ASHA after 2 of 3 epochs
    trial("a_00002", "2", 1.0, "TERMINATED", [15.0, 31.0, 31.0]),  # best: 31 at epochs 2 and 3
    trial("a_00003", "4", 0.0, "ERROR", [5.0]),
    trial("a_00004", "4", 1.0, "RUNNING", [18.0, 22.0]),
]


def epoch_row(trial_spec: dict, epoch: int, miou: float, folder: Path) -> dict:
    """A result.json line as Tune writes it for a trial whose Train run reports through TuneReportCallback."""
    return {
        "epoch": epoch, "step": 10 * epoch, "loss": 1.0 / epoch,
        "val_R1@0.3": miou + 20, "val_R1@0.5": miou + 5, "val_R1@0.7": miou - 5, "val_mIoU": miou,
        "checkpoint_path": str(folder / "train" / f"checkpoint_epoch_{epoch:03d}"),
        "done": False, "training_iteration": epoch, "trial_id": trial_spec["trial_id"],
        "config": trial_spec["config"], "time_total_s": 10.0 * epoch,
    }  # fmt: skip


def write_sweep_folder(root: Path, trials=TRIALS, with_state: bool = True, epochs: int = 3) -> Path:
    experiment = root / "demo-sweep"
    experiment.mkdir(parents=True)
    sweep_file = {"name": "demo-sweep", "search": SEARCH, "train": {"epochs": epochs}}
    (experiment / "sweep.yaml").write_text(yaml.safe_dump(sweep_file, sort_keys=False))
    states = []
    for spec in trials:
        folder_name = f"trial_{spec['trial_id']}_schedule={spec['config']['schedule']}"
        folder = experiment / folder_name
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(spec["config"]))
        lines = [json.dumps(epoch_row(spec, e, m, folder)) for e, m in enumerate(spec["mious"], start=1)]
        (folder / "result.json").write_text("".join(line + "\n" for line in lines))
        state = {"trial_id": spec["trial_id"], "status": spec["status"], "config": spec["config"],
                 "relative_logdir": folder_name, "storage": "{'_type': 'CLOUDPICKLE_FALLBACK'}"}  # fmt: skip
        states.append([json.dumps(state), json.dumps({"last_result": {}})])
    if with_state:
        (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(
            json.dumps({"trial_data": states})
        )
    return experiment


def test_each_trial_is_read_with_its_knobs_status_and_epochs(tmp_path):
    results = report.read_results(str(write_sweep_folder(tmp_path)))
    assert results.axes == SEARCH and results.max_epochs == 3
    by_id = {t.trial_id: t for t in results.trials}
    assert list(by_id) == [spec["trial_id"] for spec in TRIALS]
    assert by_id["a_00002"].knobs == {"schedule": "2", "l1_weight": 1.0}
    assert [row["val_mIoU"] for row in by_id["a_00000"].epochs] == [10.0, 20.0, 25.0]
    statuses = {trial_id: t.describe_status(results.max_epochs) for trial_id, t in by_id.items()}
    assert statuses == {
        "a_00000": "finished",
        "a_00001": "stopped early (ASHA) after 2",
        "a_00002": "finished",
        "a_00003": "failed after 1 epoch(s)",
        "a_00004": "unfinished (2 epoch(s) so far)",
    }


def test_the_best_trial_is_the_highest_validation_miou_at_its_latest_best_epoch(tmp_path):
    results = report.read_results(str(write_sweep_folder(tmp_path)))
    best_trial, best_epoch = results.best
    assert best_trial.trial_id == "a_00002"
    assert (best_epoch["epoch"], best_epoch["val_mIoU"]) == (3, 31.0)
    assert best_epoch["checkpoint_path"].endswith("trial_a_00002_schedule=2/train/checkpoint_epoch_003")


def test_a_resumed_trial_keeps_one_row_per_epoch_and_a_torn_last_line_is_skipped(tmp_path, capsys):
    experiment = write_sweep_folder(tmp_path)
    folder = next(experiment.glob("trial_a_00004_*"))
    spec = TRIALS[4]
    with (folder / "result.json").open("a") as results_file:  # epoch 2 again after a restore, then epoch 3
        results_file.write(json.dumps(epoch_row(spec, 2, 23.0, folder)) + "\n")
        results_file.write(json.dumps(epoch_row(spec, 3, 24.0, folder)) + "\n")
        results_file.write('{"epoch": 4, "val_mI')  # the driver was killed while Tune wrote this line
    resumed = {t.trial_id: t for t in report.read_results(str(experiment)).trials}["a_00004"]
    assert [(row["epoch"], row["val_mIoU"]) for row in resumed.epochs] == [(1, 18.0), (2, 23.0), (3, 24.0)]
    assert "result.json:5: skipped an incomplete line" in capsys.readouterr().err


def test_without_experiment_state_the_trial_folders_are_the_trials(tmp_path):
    results = report.read_results(str(write_sweep_folder(tmp_path, with_state=False)))
    assert sorted(t.trial_id for t in results.trials) == sorted(spec["trial_id"] for spec in TRIALS)
    assert {t.status for t in results.trials} == {"UNKNOWN"}
    assert results.best[0].trial_id == "a_00002"


def test_report_md_has_a_row_per_trial_best_first(tmp_path):
    markdown = report.render_markdown(report.read_results(str(write_sweep_folder(tmp_path))))
    rows = [line for line in markdown.splitlines() if line.startswith("| a_")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "a_00002", "a_00000", "a_00004", "a_00001", "a_00003"
    ]  # fmt: skip
    assert rows[0] == "| a_00002 | 2 | 1 | finished | 3 | 31.00 (3) | 51.00 | 36.00 | 26.00 | 31.00 |"
    assert rows[-1].startswith("| a_00003 | 4 | 0 | failed after 1 epoch(s) | 1 | 5.00 (1) |")
    assert (
        "5 trials over schedule, l1_weight (2 finished, 1 stopped early, 1 failed, 1 unfinished)" in markdown
    )
    assert "a_00002 (schedule 2, l1_weight 1): val_mIoU 31.00 at epoch 3" in markdown
    assert "Not evaluated step by step yet" in markdown
    assert "](report.png)" in markdown


def test_the_best_trials_step_by_step_evaluation_is_reported_when_it_is_of_the_best_checkpoint(tmp_path):
    experiment = write_sweep_folder(tmp_path)
    steps = {str(k): {"n": 40, "R1@0.3": 40.0 + k, "R1@0.5": 20.0 + k, "R1@0.7": 5.0 + k, "mIoU": 30.0 + k}
             for k in (1, 2)}  # fmt: skip
    evaluation = {
        "n": 40,
        "unparsed": 1,
        "missing": 0,
        **steps["2"],
        "modes": {"text": steps["2"]},
        "steps": steps,
    }
    (experiment / "best_trial").mkdir()
    (experiment / "best_trial" / "metrics.json").write_text(json.dumps(evaluation))
    selection = experiment / "best_trial" / "selection.json"
    selection.write_text(json.dumps({"trial_id": "a_00002", "epoch": 3}))
    markdown = report.render_markdown(report.read_results(str(experiment)))
    assert "(40 queries, 1 unparsed answers)" in markdown
    table = {line[:12]: line.split()[3:] for line in markdown.splitlines() if line.startswith("after step")}
    assert table == {
        "after step 1": ["40", "41.00", "21.00", "6.00", "31.00"],
        "after step 2": ["40", "42.00", "22.00", "7.00", "32.00"],
    }

    selection.write_text(json.dumps({"trial_id": "a_00000", "epoch": 3}))  # made before a_00002 took the lead
    stale = report.read_results(str(experiment))
    assert stale.evaluation_of_best is None
    assert "after step 1" not in report.render_markdown(stale)


def test_the_plot_is_a_png_with_three_panels_of_data(tmp_path):
    experiment = write_sweep_folder(tmp_path)
    png = report.render_plot(report.read_results(str(experiment)))
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (1600, 500)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    thirds = np.array_split(pixels[60:-60], 3, axis=1)
    coloured = [np.mean(np.ptp(third, axis=2) > 60) for third in thirds]  # saturated: heatmap and lines
    assert coloured[0] > 0.2  # the schedule x L1 weight heatmap fills its panel
    assert coloured[1] > 0.002  # one curve per trial


def test_the_command_writes_the_report_and_rejects_a_folder_without_trials(tmp_path, capsys):
    experiment = write_sweep_folder(tmp_path)
    assert timerefine(["report", str(experiment)]) == 0
    assert f"wrote {experiment / 'report.md'} and {experiment / 'report.png'}" in capsys.readouterr().out
    assert (experiment / "report.png").stat().st_size > 20_000

    empty = tmp_path / "empty"
    empty.mkdir()
    assert timerefine(["report", str(empty)]) == 2
    assert f"[report] error: {empty}: no Tune trials here" in capsys.readouterr().err
    with pytest.raises(StorageError, match="no such folder"):
        report.read_results(str(tmp_path / "missing"))
