"""The sweep: its YAML files and their checks, the trial grid, concurrency, and a real sweep on a local Ray
cluster that is killed mid-way, continued without rerunning finished trials, evaluated and reported."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from processes import reaped
from tensorboardX.proto.event_pb2 import Event

from pipelines import jobs, report, sweep
from timerefine.data.storage import Storage
from timerefine.timecodec import Schedule

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {name: REPO / "tune" / f"{name}.yaml" for name in ("synthetic", "charades", "activitynet")}


def minimal_document(**changes) -> dict:
    document = {
        "name": "unit",
        "data": {"features": "features", "train": "train.jsonl", "val": "val.jsonl"},
        "search": {"schedule": [1, 4], "l1_weight": [0.1, 1.0]},
        "train": {"epochs": 3},
    }
    return document | changes


def from_document(document: dict, base: Path = Path("/data")) -> sweep.SweepConfig:
    return sweep.sweep_config_from_dict(document, source="unit.yaml", base=base)


# ---------------------------------------------------------------------------------------------------------
# Configuration files


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_sweep_files_load_and_sweep_the_paper_presets(name):
    config = sweep.load_sweep_config(SHIPPED[name], base=Path("/repo"))
    assert config.name
    assert all(Path(config.data[key]).is_absolute() or config.data[key].startswith("s3://")
               for key in ("features", "train", "val"))  # fmt: skip
    ks = {Schedule.parse(spec).k for spec in config.search["schedule"]}
    assert 1 in ks and 4 in ks  # the direct baseline beside the paper's default
    variants = config.variants()
    direct = [v for v in variants if Schedule.parse(v["schedule"]).direct]
    assert len(direct) == 1 and direct[0]["l1_weight"] == 0.0
    refined = len(config.search["schedule"]) - 1
    assert len(variants) == 1 + refined * len(config.search["l1_weight"]) * _other_axes(config)


def _other_axes(config: sweep.SweepConfig) -> int:
    count = 1
    for key, values in config.search.items():
        if key not in ("schedule", "l1_weight"):
            count *= len(values)
    return count


@pytest.mark.parametrize("name", ["charades", "activitynet"])
def test_gpu_sweeps_use_the_paper_settings(name):
    config = sweep.load_sweep_config(SHIPPED[name], base=Path("/repo"))
    trial = config.train_config(config.variants()[-1])
    assert (trial.lora_r, trial.learning_rate, trial.global_batch_size) == (64, 1e-4, 128)
    assert config.search["l1_weight"] == [0, 0.1, 0.3, 1, 3]
    assert {Schedule.parse(s).k for s in config.search["schedule"]} == {1, 2, 4, 6, 8}
    assert config.resources.gpus_per_worker == 1
    per_rank = trial.global_batch_size // config.resources.workers
    assert per_rank % trial.micro_batch_size == 0  # the global batch splits evenly over the GPUs


def test_synthetic_sweep_fits_a_two_core_cpu():
    config = sweep.load_sweep_config(SHIPPED["synthetic"], base=Path("/repo"))
    assert config.resources.gpus_per_worker == 0
    assert config.resources.per_run()["CPU"] <= 2
    assert sweep.max_concurrent_trials(config.resources, {"CPU": 2.0}) >= 1


def test_variants_cover_the_grid_and_run_the_direct_baseline_once():
    config = from_document(minimal_document(search={"schedule": [1, "4", "rel4"], "l1_weight": [0.1, 1]}))
    assert config.variants() == [
        {"schedule": "1", "l1_weight": 0.0},
        {"schedule": "4", "l1_weight": 0.1},
        {"schedule": "4", "l1_weight": 1},
        {"schedule": "rel4", "l1_weight": 0.1},
        {"schedule": "rel4", "l1_weight": 1},
    ]


def test_optional_axes_multiply_the_grid_and_reach_the_training_config():
    search = {"schedule": [1, 2], "l1_weight": [1], "learning_rate": [1e-3, 3e-4], "lora_r": [0, 8]}
    config = from_document(minimal_document(search=search))
    variants = config.variants()
    assert len(variants) == 2 * 4  # the direct schedule once per (lr, rank), the K = 2 schedule likewise
    trial = config.train_config({"schedule": "2", "l1_weight": 1, "learning_rate": 3e-4, "lora_r": 8})
    assert (trial.schedule, trial.learning_rate, trial.lora_r, trial.epochs) == ("2", 3e-4, 8, 3)
    assert trial.features == "/data/features" and trial.val == "/data/val.jsonl"


def test_relative_paths_are_taken_from_the_base_and_s3_uris_are_kept(tmp_path):
    document = minimal_document(
        data={"features": "s3://bucket/features", "train": "a/train.jsonl", "val": "v.jsonl"}
    )
    config = from_document(document, base=tmp_path)
    assert config.data["features"] == "s3://bucket/features"
    assert config.data["train"] == str(tmp_path / "a" / "train.jsonl")
    assert config.storage == str(tmp_path / "runs" / "sweeps")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"serach": {}}, "unknown key(s) ['serach']"),
        ({"search": {"schedule": [4]}}, "needs a 'l1_weight' axis"),
        ({"search": {"schedule": [3], "l1_weight": [1]}}, "no preset with K = 3"),
        ({"search": {"schedule": [4], "l1_weight": []}}, "'l1_weight' must be a non-empty list"),
        ({"search": {"schedule": [4], "l1_weight": [1], "lr": [1]}}, "'lr' is not a training option"),
        ({"train": {"l1_weight": 1}}, "appear under both 'search' and 'train'"),
        ({"train": {"features": "x"}}, "'features' is not a training option"),
        ({"resources": {"workers": 0}}, "resources.workers must be >= 1"),
        ({"resources": {"gpus": 1}}, "unknown key(s) ['gpus'] under 'resources'"),
        ({"search": {"schedule": [4], "l1_weight": [-1]}}, "l1_weight must be >= 0"),
        ({"name": "a/b"}, "'name' must be a non-empty string without '/'"),
    ],
)
def test_bad_sweep_files_name_the_file_and_the_key(changes, message):
    with pytest.raises(sweep.SweepConfigError) as error:
        from_document(minimal_document(**changes))
    assert str(error.value).startswith("unit.yaml: ")
    assert message in str(error.value)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsearch:\n  schedule: [1, 4\n  l1_weight: [0]\n")
    with pytest.raises(sweep.SweepConfigError, match=r"broken\.yaml, line \d+, column \d+: not valid YAML"):
        sweep.load_sweep_config(path)


def test_concurrency_follows_what_each_trial_asks_for():
    cpu = sweep.SweepResources(workers=1, cpus_per_worker=1)
    assert sweep.max_concurrent_trials(cpu, {"CPU": 2.0, "memory": 1e10}) == 2
    assert sweep.max_concurrent_trials(sweep.SweepResources(workers=2, cpus_per_worker=1), {"CPU": 2.0}) == 1
    gpu = sweep.SweepResources(workers=4, cpus_per_worker=8, gpus_per_worker=1)
    assert sweep.max_concurrent_trials(gpu, {"CPU": 192.0, "GPU": 16.0}) == 4
    assert sweep.max_concurrent_trials(gpu, {"CPU": 16.0, "GPU": 16.0}) == 1  # too few CPUs: one, which waits
    fixed = sweep.SweepResources(workers=4, gpus_per_worker=1, max_concurrent_trials=2)
    assert sweep.max_concurrent_trials(fixed, {"CPU": 8.0}) == 2  # an autoscaling cluster starts empty


def test_a_sweep_folder_keeps_the_configuration_it_started_with(tmp_path):
    storage, experiment = Storage(), str(tmp_path / "unit")
    config = from_document(minimal_document(), base=tmp_path)
    sweep.claim_sweep_folder(config, experiment, storage)
    stored = yaml.safe_load((tmp_path / "unit" / sweep.CONFIG_FILE).read_text())
    assert stored["search"] == {"schedule": ["1", "4"], "l1_weight": [0.1, 1.0]}
    assert stored["data"]["features"] == str(tmp_path / "features")
    sweep.claim_sweep_folder(config, experiment, storage)  # the same file continues
    changed = from_document(minimal_document(search={"schedule": [1, 2], "l1_weight": [1]}), base=tmp_path)
    with pytest.raises(sweep.SweepConfigError, match=r"another configuration \(differs in \['search'\]\)"):
        sweep.claim_sweep_folder(changed, experiment, storage)


def test_missing_inputs_stop_the_sweep_before_any_trial(sweep_benchmark, tmp_path, capsys):
    document = minimal_document(
        data={
            "features": str(sweep_benchmark.features),
            "train": str(sweep_benchmark.train),
            "val": "nope.jsonl",
        }
    )
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(document))
    argv = ["--config", str(tmp_path / "sweep.yaml"), "--storage", str(tmp_path / "results")]
    assert jobs.main(sweep, argv) == jobs.EXIT_UNUSABLE
    assert "nope.jsonl: no such annotation file (data.val)" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------------
# A real sweep


def write_tiny_sweep(folder: Path, benchmark, search: dict | None = None) -> Path:
    document = {
        "name": "tiny",
        "storage": str(folder / "results"),
        "data": {
            "features": str(benchmark.features),
            "train": str(benchmark.train),
            "val": str(benchmark.val),
        },
        "search": search or {"schedule": [1, 2], "l1_weight": [0.5]},
        "train": {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 4, "learning_rate": 3e-3},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "asha": {"grace_period": 1},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def trial_states(experiment: Path) -> dict[str, str]:
    """trial id -> status in Tune's newest saved experiment state (plain JSON fields only)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        document = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being written
        return {}
    return {
        state["trial_id"]: state["status"]
        for state in map(json.loads, (t for t, _ in document["trial_data"]))
    }


def one_finished_one_checkpointed(experiment: Path) -> bool:
    states = trial_states(experiment)
    unfinished = [trial for trial, status in states.items() if status != "TERMINATED"]
    first_checkpoints = (f"trial_{trial}_*/train/checkpoint_epoch_001/metrics.json" for trial in unfinished)
    return "TERMINATED" in states.values() and any(any(experiment.glob(p)) for p in first_checkpoints)


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalar tag -> values from the TensorBoard event files in ``folder`` (TFRecord framing)."""
    scalars: dict[str, list[float]] = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_sweep_continues_without_rerunning_finished_trials(sweep_benchmark, tmp_path, ray_cluster):
    config_path = write_tiny_sweep(tmp_path, sweep_benchmark)
    experiment = tmp_path / "results" / "tiny"
    argv = [
        sys.executable,
        str(REPO / "tune" / "sweep.py"),
        "--config",
        str(config_path),
        "--address",
        ray_cluster,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([*argv, "--no-report"], env=env, stdout=log, stderr=subprocess.STDOUT)
    with reaped(first):
        # Killed mid-sweep and mid-trial: one trial finished, the other past its first checkpoint.
        deadline = time.monotonic() + 240
        while not one_finished_one_checkpointed(experiment):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished and the next checkpointed in 240 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)  # the driver dies mid-sweep; the cluster stays
        first.wait()
    states = trial_states(experiment)
    assert sorted(states.values()) != ["TERMINATED", "TERMINATED"], "the sweep was over before the kill"
    finished = next(trial for trial, status in states.items() if status == "TERMINATED")
    finished_folder = next(experiment.glob(f"trial_{finished}_*"))
    finished_results = (finished_folder / "result.json").read_bytes()
    finished_checkpoints = {
        p: p.stat().st_mtime for p in (finished_folder / "train").rglob("*") if p.is_file()
    }

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"[sweep] continuing {experiment}" in second.stdout
    assert "State API may be temporarily unavailable" not in second.stderr  # Ray Train's cleaner asked it
    assert trial_states(experiment) == {trial: "TERMINATED" for trial in states}
    assert (finished_folder / "result.json").read_bytes() == finished_results  # not rerun
    assert {p: p.stat().st_mtime for p in finished_checkpoints} == finished_checkpoints

    results = report.read_results(str(experiment))
    assert len(results.trials) == 2
    assert sorted(t.knobs["schedule"] for t in results.trials) == ["1", "2"]
    for trial in results.trials:
        assert [row["epoch"] for row in trial.epochs] == [1, 2]
        assert all(0 <= row["val_mIoU"] <= 100 for row in trial.epochs)
        assert trial.describe_status(results.max_epochs) == "finished"
        folder = next(experiment.glob(f"trial_{trial.trial_id}_*"))
        assert sorted(p.name for p in (folder / "train").glob("checkpoint_epoch_*")) == [
            "checkpoint_epoch_001",
            "checkpoint_epoch_002",
        ]
        # What TensorBoard shows for the trial (the resumed one shows its re-reported epoch twice).
        scalars = tensorboard_scalars(folder)
        shown = dict(zip(scalars["ray/tune/epoch"], scalars["ray/tune/val_mIoU"], strict=True))
        assert shown == pytest.approx({row["epoch"]: row["val_mIoU"] for row in trial.epochs})

    best_trial, best_epoch = results.best
    selection = json.loads((experiment / "best_trial" / "selection.json").read_text())
    assert (selection["trial_id"], selection["epoch"]) == (best_trial.trial_id, best_epoch["epoch"])
    evaluation = json.loads((experiment / "best_trial" / "metrics.json").read_text())
    assert evaluation["n"] == 2  # the two validation queries
    assert results.evaluation_of_best == evaluation

    markdown = (experiment / "report.md").read_text()
    rows = [
        line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| trial")
    ]
    assert sorted(row.split(" | ")[0].removeprefix("| ") for row in rows) == sorted(states)
    assert f"{best_trial.trial_id} (" in markdown
    with Image.open(experiment / "report.png") as image:
        assert image.format == "PNG" and image.width >= 1200 and image.height >= 400


@pytest.mark.integration
@pytest.mark.slow
def test_a_trial_restored_after_its_last_checkpoint_reports_it_without_training_again(
    sweep_benchmark, tmp_path, ray_cluster
):
    """A driver killed between a trial's last checkpoint and Tune recording it leaves Tune's state saying
    RUNNING and result.json without those epochs (seen after a kill at that moment). Continuing used to
    restart the Train run, which had no epoch left to report, and fail the sweep on Tune's missing metric."""
    config_path = write_tiny_sweep(tmp_path, sweep_benchmark, search={"schedule": [1], "l1_weight": [0.5]})
    job = sweep.SweepJobConfig(str(config_path), no_report=True)
    assert sweep.run(job).exit_code == jobs.EXIT_OK
    experiment = tmp_path / "results" / "tiny"
    (trial,) = trial_states(experiment)
    folder = next(experiment.glob(f"trial_{trial}_*"))
    newest_state = sorted(experiment.glob("experiment_state-*.json"))[-1]
    document = json.loads(newest_state.read_text())
    document["trial_data"] = [
        [json.dumps(json.loads(state) | {"status": "RUNNING"}), runtime]
        for state, runtime in document["trial_data"]
    ]
    newest_state.write_text(json.dumps(document))
    (folder / "result.json").write_text("")
    checkpoints = {p: p.stat().st_mtime_ns for p in (folder / "train").rglob("*") if p.is_file()}

    assert sweep.run(job).exit_code == jobs.EXIT_OK
    assert trial_states(experiment) == {trial: "TERMINATED"}
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # nothing trained again
    checkpointed = [
        json.loads((folder / "train" / f"checkpoint_epoch_00{epoch}" / "metrics.json").read_text())
        for epoch in (1, 2)
    ]
    (restored,) = report.read_results(str(experiment)).trials
    assert [(row["epoch"], row["val_mIoU"], row["loss"]) for row in restored.epochs] == [
        (row["epoch"], row["val_mIoU"], row["loss"]) for row in checkpointed
    ]
