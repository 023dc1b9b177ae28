"""The one-command demo at a tiny size, run as a newcomer runs it (``timerefine demo`` in a new process that
starts and stops its own Ray): every stage, the printed table, the files it writes, the last line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from processes import run_reaped

from timerefine.baselines import fit_prior, score_prior
from timerefine.data.annotations import read_annotations
from timerefine.features import STATUS_OK, read_feature_table
from timerefine.metrics import METRIC_KEYS, read_predictions, score

VIDEOS = 24


def table_row(output: str, name: str) -> list[str]:
    """The values printed after a row's name in a format_table table: n, R1@0.3, R1@0.5, R1@0.7, mIoU."""
    lines = [line for line in output.splitlines() if line.startswith(name + "  ")]
    assert len(lines) == 1, f"no single row {name!r} in:\n{output}"
    return lines[0][len(name) :].split()


def printed(metrics: dict) -> list[str]:
    return [str(metrics["n"]), *(f"{metrics[key]:.2f}" for key in METRIC_KEYS)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess]]:
    workdir = tmp_path_factory.mktemp("demo")
    # Ray's session folder holds Unix sockets (at most 107 characters a path, the dashboard's included):
    # pytest's folders are too deep for them.
    ray_tmp = Path(tempfile.mkdtemp(prefix="demo-ray-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TIMEREFINE_HOME": str(workdir / "home")}
    argv = ["timerefine.cli", "demo", "--workdir", str(workdir), "--videos", str(VIDEOS), "--epochs", "1"]
    argv += ["--global-batch-size", "4"]
    try:
        finished = run_reaped([sys.executable, "-m", *argv], timeout_s=900, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    yield workdir, finished


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_prints_every_stage_and_ends_saying_where_everything_is(demo):
    workdir, finished = demo
    lines = finished.stdout.splitlines()
    stages = [line for line in lines if line.startswith("[demo] ") and "/4 " in line]
    assert [line.split("/4 ")[1] for line in stages] == [
        "synthesise the benchmark", "extract features", "fit the query-blind priors",
        "train and evaluate direct (K=1) and TimeRefine (K=2, L1 1) at once",
    ]  # fmt: skip
    assert "[extract] 24/24 videos (24 ok, 0 failed)" in finished.stdout
    for name, label in (("direct", "direct (K=1)"), ("timerefine", "TimeRefine (K=2, L1 1)")):
        # each job's lines say whose they are, and each training run's progress reaches the console once
        assert sum(line.startswith(f"[train {name}] epoch 1 ") for line in lines) == 1
        assert sum(line.startswith(f"[train {name}] final checkpoint") for line in lines) == 1
        for split in ("test", "train"):
            assert sum(line.startswith(f"[evaluate {name} {split}] wrote ") for line in lines) == 1
        done = [line for line in lines if line.startswith(f"[demo] {label}: trained in ")]
        assert len(done) == 1 and ", evaluated in " in done[0]
    assert not any(line.startswith(("[train] ", "[evaluate] ")) for line in lines)  # no unlabelled line
    last = finished.stdout.strip().splitlines()[-1]
    assert last.startswith("[demo] done") and last.endswith(f"are in {workdir}")
    noise = [
        line
        for line in (finished.stdout + finished.stderr).splitlines()
        if "Warning" in line or "Traceback" in line
    ]
    assert noise == []


@pytest.mark.integration
@pytest.mark.slow
def test_the_table_holds_the_priors_and_both_models_as_scored_from_the_files(demo):
    workdir, finished = demo
    train, _ = read_annotations(workdir / "benchmark" / "train.jsonl")
    test, _ = read_annotations(workdir / "benchmark" / "test.jsonl")
    fixed = fit_prior("fixed", train)
    fixed_name = f"prior: fixed [{fixed.window[0]:.2f}, {fixed.window[1]:.2f}]"
    assert table_row(finished.stdout, fixed_name) == printed(score_prior(fixed, test))
    assert table_row(finished.stdout, "prior: random") == printed(
        score_prior(fit_prior("random", train), test)
    )
    sample, _ = read_annotations(workdir / "eval" / "train_sample.jsonl")  # train scored on as many as test
    assert len(sample) == len(test) and {q.qid for q in sample} <= {q.qid for q in train}
    for name, label in (("direct", "direct (K=1)"), ("timerefine", "TimeRefine (K=2, L1 1)")):
        for split, folder, queries in (("test", "", test), ("train", "train", sample)):
            predictions = read_predictions(workdir / "eval" / name / folder / "predictions.jsonl")
            rescored = score(predictions, queries)
            assert json.loads((workdir / "eval" / name / folder / "metrics.json").read_text()) == rescored
            assert table_row(finished.stdout, f"{label}: {split}") == printed(rescored)
            assert len(predictions) == len(queries)
    # The demo's own table of TimeRefine's modes comes after the ones the evaluation jobs print.
    refined_table = finished.stdout.split("TimeRefine on test: each answer mode")[1]
    refined = json.loads((workdir / "eval" / "timerefine" / "metrics.json").read_text())
    assert table_row(refined_table, "answer: text") == printed(refined["modes"]["text"])


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_writes_the_benchmark_features_runs_and_report(demo):
    workdir, _ = demo
    assert len(list((workdir / "benchmark" / "videos").glob("*.mp4"))) == VIDEOS
    statuses = read_feature_table(str(workdir / "features"), columns=["status"]).column("status").to_pylist()
    assert statuses == [STATUS_OK] * VIDEOS
    for name in ("direct", "timerefine"):
        summary = json.loads((workdir / "runs" / name / "training_summary.json").read_text())
        assert [epoch["epoch"] for epoch in summary["epochs"]] == [1]
        assert Path(summary["final_checkpoint"]).is_dir()
    report = (workdir / "report.md").read_text()
    assert "direct (K=1)" in report and "TimeRefine (K=2, L1 1)" in report and "](report.png)" in report
    with Image.open(workdir / "report.png") as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 400
    assert json.loads((workdir / "demo.json").read_text())["videos"] == VIDEOS
