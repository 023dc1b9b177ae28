"""The training job: local mode learns and reports; 1 and 2 workers optimise alike; kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from processes import reaped

from pipelines import jobs, train
from timerefine.checkpoint import load_checkpoint, training_checkpoint_problem
from timerefine.data.storage import Storage

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_local_mode_learns_reports_and_checkpoints_every_epoch(tiny_benchmark, trained_run):
    count = tiny_benchmark.queries
    assert f"train: {count} of {count + 1} queries have features; skipped 1" in trained_run.stdout
    summary = trained_run.summary
    epochs = summary["epochs"]
    assert [m["epoch"] for m in epochs] == list(range(1, trained_run.epochs + 1))
    assert summary["this_attempt"] == [m["epoch"] for m in epochs]
    for key in ("loss", "ce", "l1", "val_R1@0.3", "val_R1@0.5", "val_R1@0.7", "val_mIoU", "samples_per_s"):
        assert all(isinstance(m[key], float) for m in epochs), key
    assert epochs[-1]["loss"] < 0.1 * epochs[0]["loss"]
    assert epochs[0]["val_mIoU"] < 15 and max(m["val_mIoU"] for m in epochs) > 30  # it learns its answers
    run_dir = trained_run.output / "timerefine"
    for epoch in range(1, trained_run.epochs + 1):
        assert (run_dir / f"checkpoint_epoch_{epoch:03d}" / "trainer_state.json").is_file()
    best = max(epochs, key=lambda m: (m["val_mIoU"], m["epoch"]))
    assert summary["selection"] == "best val_mIoU"
    assert summary["final_checkpoint"] == str(run_dir / f"checkpoint_epoch_{best['epoch']:03d}")
    assert summary["final_epoch"] == best["epoch"]
    model = load_checkpoint(summary["final_checkpoint"])
    assert model.config.encoder == tiny_benchmark.encoder and model.config.feature_dim == 768
    assert model.config.l1_weight == 1.0
    assert not torch.allclose(model.adapter.feature_std, torch.ones(768))  # standardised on train features


def test_bad_inputs_exit_2_with_a_clear_message(tiny_benchmark, tmp_path, capsys):
    missing = tiny_benchmark.train_args(tmp_path, "--workers", "0")
    missing[missing.index("--features") + 1] = str(tmp_path / "nowhere")
    assert jobs.main(train, missing) == 2
    assert "nowhere: no feature table here" in capsys.readouterr().err
    mismatch = tiny_benchmark.train_args(tmp_path, "--refine-steps", "3", "--sigma", "2", "0")
    assert jobs.main(train, mismatch) == 2
    assert "--refine-steps 3 but --sigma gives 2 values" in capsys.readouterr().err


@pytest.mark.integration
def test_two_gloo_workers_optimise_like_one(tiny_benchmark, tmp_path, ray_cluster, single_threaded_torch):
    common = ("--epochs", "2", "--max-val-queries", "0")
    assert jobs.main(train, tiny_benchmark.train_args(tmp_path / "one", "--workers", "0", *common)) == 0
    assert jobs.main(train, tiny_benchmark.train_args(tmp_path / "two", "--workers", "2", *common)) == 0
    one = json.loads((tmp_path / "one" / "timerefine" / train.SUMMARY_FILE).read_text())["epochs"]
    two = json.loads((tmp_path / "two" / "timerefine" / train.SUMMARY_FILE).read_text())["epochs"]
    assert [m["epoch"] for m in two] == [1, 2] and [m["step"] for m in two] == [2, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["l1"] == pytest.approx(a["l1"], rel=1e-4)
    assert two[1]["loss"] < two[0]["loss"]  # it did train


@pytest.mark.integration
def test_killed_run_resumes_from_its_s3_checkpoints(tiny_benchmark, ray_cluster, s3_server, tmp_path):
    """Kill a run (SIGKILL to its process group) once Ray Train has registered a checkpoint in S3; the
    rerun must continue after it. Keys reach the job through the environment, as on a cluster."""
    from ray.train import Result

    # Six epochs of a second or so: the killed driver's worker goes on until Ray reaps it, and with three
    # it once finished the run first (a fresh-clone run: checkpoints 1-3 whole after the kill).
    epochs = 6
    output = "s3://features/runs"
    argv = [
        sys.executable, str(REPO / "pipelines" / "train.py"), "--address", ray_cluster,
        *tiny_benchmark.train_args(Path("unused"), "--epochs", str(epochs), "--max-val-queries", "2"),
    ]  # fmt: skip
    argv[argv.index("--output") + 1] = output
    env = {**os.environ, **s3_server.env(), "PYTHONUNBUFFERED": "1"}
    storage = Storage(endpoint_url=s3_server.endpoint_url)
    with pytest.MonkeyPatch.context() as patch:  # for this process's reads only, after the workers started
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        filesystem, run_path = storage.resolve(f"{output}/timerefine")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(argv, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    with reaped(first):
        deadline = time.monotonic() + 240
        while not _registered_epochs(Result, run_path, filesystem):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch-1 checkpoint within 240 s"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The worker lives in the cluster, not under the killed driver: until Ray reaps it, it may still be
    # copying a checkpoint into the run folder.
    _wait_until_no_training_worker_runs(timeout_s=120)
    registered = _registered_epochs(Result, run_path, filesystem)
    # What the run resumes from: the whole checkpoints in its folder (Ray Train registers them a poll later).
    run = f"{output}/timerefine"
    done = train.whole_epoch_checkpoints(run, storage)
    assert registered and max(done) >= max(registered) and max(done) < epochs

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming {output}/timerefine after epoch {max(done)}" in second.stdout
    body = s3_server.client().get_object(Bucket="features", Key=f"runs/timerefine/{train.SUMMARY_FILE}")[
        "Body"
    ]
    summary = json.loads(body.read())
    # The kill may land while the newest checkpoint is being uploaded: the workers then refuse it as
    # incomplete and resume from the one before, so at most that epoch is trained again.
    assert summary["this_attempt"] in (
        list(range(max(done) + 1, epochs + 1)),
        list(range(max(done), epochs + 1)),
    )
    assert [m["epoch"] for m in summary["epochs"]] == list(range(1, epochs + 1))
    assert summary["final_checkpoint"].startswith(f"{output}/timerefine/checkpoint_epoch_00")
    assert max(_registered_epochs(Result, run_path, filesystem)) == epochs


def _wait_until_no_training_worker_runs(timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    while any("RayTrainWorker" in " ".join(_cmdline(p)) for p in psutil.process_iter()):
        assert time.monotonic() < deadline, f"a Ray Train worker runs {timeout_s:g} s after its driver died"
        time.sleep(0.2)


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _registered_epochs(result_class, run_path: str, filesystem) -> list[int]:
    """Epochs whose checkpoint Ray Train has registered, read through Ray's own ``Result.from_path``;
    empty while there is none, or while its snapshot file is being written."""
    try:
        result = result_class.from_path(run_path, storage_filesystem=filesystem)
    except (RuntimeError, ValueError, OSError):
        return []
    return sorted(metrics["epoch"] for _, metrics in result.best_checkpoints or [])


@pytest.mark.integration
def test_a_killed_worker_costs_at_most_its_epoch_and_a_damaged_checkpoint_is_refused(
    tiny_benchmark, tmp_path, ray_cluster, capfd
):
    """SIGKILL the training worker while epoch 3 is in flight: with --max-failures 1 the run restarts from
    epoch 2's checkpoint and finishes. Then a checkpoint damaged by hand is refused, with its reason, and
    the rerun continues from the one before."""
    import psutil

    run = tmp_path / "timerefine"
    options = ("--workers", "1", "--max-failures", "1", "--max-val-queries", "2")
    args = tiny_benchmark.train_args(tmp_path, *options)
    killed: list[int] = []

    def kill_a_worker_after_epoch_2() -> None:
        # Wait until epoch 2's checkpoint is whole in the run folder: Ray Train copies its files there in
        # no fixed order, so one file present (trainer_state.json, once) does not mean the rest are.
        deadline = time.monotonic() + 300
        while training_checkpoint_problem(run / "checkpoint_epoch_002") is not None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        workers = [
            process
            for process in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(process.cmdline())
        ]
        workers[-1].kill()
        killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker_after_epoch_2, daemon=True)
    killer.start()
    assert jobs.main(train, [*args, "--epochs", "4"]) == 0, capfd.readouterr().err[-3000:]
    killer.join(timeout=5)
    assert killed, "no training worker was killed"
    summary = json.loads((run / train.SUMMARY_FILE).read_text())
    assert [m["epoch"] for m in summary["epochs"]] == [1, 2, 3, 4]
    restarted_at = summary["this_attempt"][0]  # the restarted worker's first epoch
    assert restarted_at in (3, 4)  # epoch 2 (or 3, had it been written before the kill) was kept
    assert summary["this_attempt"] == list(range(restarted_at, 5))

    (run / "checkpoint_epoch_004" / "weights.safetensors").unlink()  # damaged by hand
    assert jobs.main(train, [*args, "--epochs", "5"]) == 0, capfd.readouterr().err[-3000:]
    output = capfd.readouterr().out
    assert f"refusing checkpoint {run / 'checkpoint_epoch_004'}: weights.safetensors is missing" in output
    summary = json.loads((run / train.SUMMARY_FILE).read_text())
    assert summary["this_attempt"] == [4, 5]  # from epoch 3's checkpoint, the newest complete one
    assert [m["epoch"] for m in summary["epochs"]] == [1, 2, 3, 4, 5]
    assert (run / "checkpoint_epoch_004" / "weights.safetensors").is_file()  # written again


@pytest.mark.integration
def test_checkpoints_to_s3_under_throttling_and_dropped_connections_are_all_intact(
    tiny_benchmark, ray_cluster, s3_server, tmp_path, monkeypatch
):
    """Through a proxy that answers 30% of requests with 503 SlowDown and drops 5% of connections, every
    epoch's checkpoint lands whole (it loads) and the summary lists every epoch."""
    import pyarrow.fs as pafs
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint_url, throttle=0.3, drop=0.05).start()
    try:
        for key, value in {**s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}.items():
            monkeypatch.setenv(key, value)
        args = tiny_benchmark.train_args(
            Path("unused"), "--workers", "1", "--epochs", "2", "--max-val-queries", "2"
        )
        args[args.index("--output") + 1] = "s3://features/throttled"
        assert jobs.main(train, args) == 0
    finally:
        proxy.stop()
    requests = sum(proxy.counts.values())
    assert proxy.counts["throttled"] > 0.15 * requests and proxy.counts["dropped"] > 0, proxy.counts
    direct = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"), scheme="http", region="us-east-1",
        access_key=s3_server.access_key, secret_key=s3_server.secret_key,
    )  # fmt: skip
    with direct.open_input_stream(f"features/throttled/timerefine/{train.SUMMARY_FILE}") as stream:
        summary = json.loads(stream.read())
    assert [m["epoch"] for m in summary["epochs"]] == [1, 2]
    for epoch in (1, 2):
        local = tmp_path / f"epoch{epoch}"
        source = f"features/throttled/timerefine/checkpoint_epoch_{epoch:03d}"
        pafs.copy_files(
            source, str(local), source_filesystem=direct, destination_filesystem=pafs.LocalFileSystem()
        )
        model = load_checkpoint(local)
        assert model.config.encoder == tiny_benchmark.encoder
