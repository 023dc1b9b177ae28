"""Every command on unusable input: exit status 2, one line naming the file (and line), no traceback.

One table: each command (convert, score, baseline, synth, extract, train, evaluate, predict, sweep,
report) on a missing path, a folder where a file is expected, a file where a folder is expected, an empty
file, non-UTF-8 bytes, malformed JSON or YAML and an output it cannot write. Each case runs the real
command line, ``python -m timerefine.cli ...``, in its own process, with Ray's and timerefine's files in a
temporary folder. The inputs other than the bad one are valid, so each case shows that this input alone is
refused. Bad input must be refused before Ray starts or a model loads; the slowest cases are those whose
command imports torch to build its flags (train, sweep).

All cases run at the start of the module, several processes at a time, and each test checks one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from featurebench import write_feature_benchmark

from timerefine.checkpoint import save_checkpoint
from timerefine.data.annotations import read_annotations
from timerefine.encoders import resolve_encoder
from timerefine.model import ModelConfig, TimeRefineModel
from timerefine.video import write_video

pytestmark = pytest.mark.integration

CASE_TIMEOUT_S = 240
PARALLEL_CASES = 4


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Valid inputs of every kind and bad ones of every kind, by the names the table's templates use."""
    root = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEREFINE_HOME", str(root / "home"))
        yield _make_world(root)


def _make_world(root: Path) -> dict[str, str]:
    encoder = resolve_encoder(None)  # built here once, in the cache the commands use
    bench = write_feature_benchmark(
        root, videos=2, queries_per_video=2, dim=768, encoder=encoder.identity,
        phrases=("the red circle moves", "a blue star spins"), video_prefix="vid",
        window_starts=(0, 50), window_lengths=(10, 30), val_queries=1,
    )  # fmt: skip
    queries, _ = read_annotations(bench.train)
    predictions = "".join(f'{{"qid": "{q.qid}", "pred": [1.0, 5.0], "parsed": true}}\n' for q in queries)
    model = TimeRefineModel.from_config(ModelConfig(feature_dim=768, encoder=encoder.identity))
    sweep = {
        "name": "bad-input",
        "data": {"features": str(bench.features), "train": str(bench.train), "val": str(bench.val)},
        "search": {"schedule": [1], "l1_weight": [0.0]},
        "train": {"epochs": 1},
        "storage": str(root / "sweeps"),
    }

    def sweep_file(name: str, **data: Path) -> Path:
        changed = {key: str(path) for key, path in data.items()}
        return _write(root / f"sweep_{name}.yaml", yaml.safe_dump(sweep | {"data": sweep["data"] | changed}))

    def results(name: str, files: dict[str, str | bytes]) -> Path:
        """A sweep folder with one trial, as Tune leaves it, plus ``files``."""
        folder = root / "results" / name
        _write(folder / "trial_1" / "params.json", '{"schedule": "1", "l1_weight": 0.0}')
        row = {"epoch": 1, "val_mIoU": 10.0, "trial_id": "1", "config": {"schedule": "1", "l1_weight": 0.0}}
        _write(folder / "trial_1" / "result.json", json.dumps(row) + "\n")
        for relative, data in files.items():
            _write(folder / relative, data)
        return folder

    text = _write(root / "notes.txt", "a text file\n")
    latin1 = _write(root / "latin1.jsonl", b'{"qid": "caf\xe9"}\n')
    paths = {
        # valid
        "features": bench.features,
        "train": bench.train,
        "val": bench.val,
        "videos": root / "videos",  # holds no video: extraction never gets to run
        "video": root / "clip.mp4",
        "home": root / "home",
        "predictions": _write(root / "predictions.jsonl", predictions),
        "checkpoint": save_checkpoint(model, root / "checkpoint"),
        "sweep": sweep_file("valid"),
        "out": root / "out",
        # bad
        "missing": root / "nowhere",
        "folder": root / "a_folder",
        "text": text,
        "empty": _write(root / "empty.jsonl", b""),
        "latin1": latin1,
        "bad_json": _write(root / "bad.jsonl", '{"qid": "q0", "video_id": "vid0",\n'),  # ends on line 2
        "bad_yaml": _write(root / "bad.yaml", "name: x\ndata:\n  features: [unclosed\nsearch: {}\n"),
        "below_file": text / "out",
        "bad_checkpoint": _write(root / "bad_checkpoint" / "timerefine.json", "{").parent,
        "empty_video": _write(root / "empty.mp4", b""),
        "not_video": _write(root / "not_video.mp4", "text, not a video\n"),
        "sweep_features_file": sweep_file("features_file", features=text),
        "sweep_train_latin1": sweep_file("train_latin1", train=latin1),
        "results_bad_yaml": results("bad_yaml", {"sweep.yaml": "search: [unclosed\n"}),
        "results_latin1": results("latin1", {"trial_1/result.json": b'{"epoch": 1, "x": "\xe9"}\n'}),
        "results_bad_state": results("bad_state", {"experiment_state-2020.json": "{"}),
        "results_unwritable": results("unwritable", {"report.md/x": "report.md is a folder"}),
    }
    frames = np.zeros((20, 120, 160, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(20, dtype=np.uint8)[:, None, None] * 10
    write_video(paths["video"], frames, fps=10.0)
    paths["folder"].mkdir()
    paths["videos"].mkdir()
    return {name: str(path) for name, path in paths.items()}


# ---------------------------------------------------------------------------------------------------------
# The table: the command line after `timerefine`, and what its error line must name ({name}: a path of the
# world; ":N" the line). Every other input is valid.

_CONVERT = "convert {bad} -o {out}/converted.jsonl"
_SCORE = "score --predictions {predictions} --annotations {train}"
_BASELINE = "baseline fixed --fit {train} --annotations {train}"
_EXTRACT = "extract --input {videos} --output {out}/features"
_EXTRACT_VIDEO = "extract --input {video} --output {out}/features"
_TRAIN = "train --workers 0 --epochs 1 --features {features} --train {train} --val {val} --output {out}/runs"
_EVALUATE = "evaluate --checkpoint {checkpoint} --features {features} --annotations {val} --output {out}/eval"
_PREDICT = "predict --checkpoint {checkpoint} --video {video} --query red"


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # a template over the world's names
    names: str  # what the error line must name, a template too

    def argv(self, world: dict[str, str]) -> list[str]:
        return self.command.format(**world).split()


def _with(template: str, flag: str, value: str) -> str:
    """``template`` with ``flag``'s value replaced (or the flag added)."""
    words = template.split()
    if flag in words:
        words[words.index(flag) + 1] = value
        return " ".join(words)
    return f"{template} {flag} {value}"


CASES = [
    Case("convert-missing", _CONVERT.replace("{bad}", "{missing}"), "{missing}"),
    Case("convert-folder", _CONVERT.replace("{bad}", "{folder}"), "{folder}"),
    Case("convert-empty", _CONVERT.replace("{bad}", "{empty}"), "{empty}:1"),
    Case("convert-latin1", _CONVERT.replace("{bad}", "{latin1}"), "{latin1}:1"),
    Case("convert-bad-json", _CONVERT.replace("{bad}", "{bad_json}"), "{bad_json}:2"),
    Case("convert-output-below-a-file", "convert {train} -o {below_file}", "{below_file}"),
    Case("convert-output-is-a-folder", "convert {train} -o {folder}", "{folder}"),
    Case(
        "convert-durations-latin1",
        _CONVERT.replace("{bad}", "{train}") + " --durations {latin1}",
        "{latin1}:1",
    ),
    Case("score-predictions-missing", _with(_SCORE, "--predictions", "{missing}"), "{missing}"),
    Case("score-predictions-folder", _with(_SCORE, "--predictions", "{folder}"), "{folder}"),
    Case("score-predictions-empty", _with(_SCORE, "--predictions", "{empty}"), "{empty}"),
    Case("score-predictions-latin1", _with(_SCORE, "--predictions", "{latin1}"), "{latin1}:1"),
    Case("score-predictions-bad-json", _with(_SCORE, "--predictions", "{bad_json}"), "{bad_json}:1"),
    Case("score-annotations-folder", _with(_SCORE, "--annotations", "{folder}"), "{folder}"),
    Case("score-annotations-empty", _with(_SCORE, "--annotations", "{empty}"), "{empty}:1"),
    Case("score-output-below-a-file", _with(_SCORE, "-o", "{below_file}"), "{below_file}"),
    Case("baseline-fit-missing", _with(_BASELINE, "--fit", "{missing}"), "{missing}"),
    Case("baseline-fit-folder", _with(_BASELINE, "--fit", "{folder}"), "{folder}"),
    Case("baseline-fit-latin1", _with(_BASELINE, "--fit", "{latin1}"), "{latin1}:1"),
    Case("baseline-annotations-bad-json", _with(_BASELINE, "--annotations", "{bad_json}"), "{bad_json}:2"),
    Case("baseline-annotations-empty", _with(_BASELINE, "--annotations", "{empty}"), "{empty}:1"),
    Case("baseline-output-below-a-file", _with(_BASELINE, "-o", "{below_file}"), "{below_file}"),
    Case("synth-output-is-a-file", "synth -o {text} --videos 3 --workers 1", "{text}"),
    Case("synth-output-below-a-file", "synth -o {below_file} --videos 3 --workers 1", "{below_file}"),
    Case("extract-input-missing", _with(_EXTRACT, "--input", "{missing}"), "{missing}"),
    Case("extract-input-empty-list", _with(_EXTRACT, "--input", "{empty}"), "{empty}"),
    Case("extract-input-latin1-list", _with(_EXTRACT, "--input", "{latin1}"), "{latin1}"),
    Case("extract-input-folder-without-videos", _EXTRACT, "{videos}"),
    Case("extract-output-is-a-file", _with(_EXTRACT_VIDEO, "--output", "{text}"), "{text}"),
    Case("extract-output-below-a-file", _with(_EXTRACT_VIDEO, "--output", "{below_file}"), "{text}"),
    Case("train-features-missing", _with(_TRAIN, "--features", "{missing}"), "{missing}"),
    Case("train-features-is-a-file", _with(_TRAIN, "--features", "{text}"), "{text}"),
    Case("train-train-folder", _with(_TRAIN, "--train", "{folder}"), "{folder}"),
    Case("train-train-empty", _with(_TRAIN, "--train", "{empty}"), "{empty}:1"),
    Case("train-train-latin1", _with(_TRAIN, "--train", "{latin1}"), "{latin1}:1"),
    Case("train-val-bad-json", _with(_TRAIN, "--val", "{bad_json}"), "{bad_json}:2"),
    Case("train-output-below-a-file", _with(_TRAIN, "--output", "{below_file}"), "{text}"),
    Case("evaluate-checkpoint-missing", _with(_EVALUATE, "--checkpoint", "{missing}"), "{missing}"),
    Case("evaluate-checkpoint-is-a-file", _with(_EVALUATE, "--checkpoint", "{text}"), "{text}"),
    Case("evaluate-checkpoint-empty-folder", _with(_EVALUATE, "--checkpoint", "{folder}"), "{folder}"),
    Case("evaluate-features-missing", _with(_EVALUATE, "--features", "{missing}"), "{missing}"),
    Case("evaluate-annotations-latin1", _with(_EVALUATE, "--annotations", "{latin1}"), "{latin1}:1"),
    Case("evaluate-annotations-bad-json", _with(_EVALUATE, "--annotations", "{bad_json}"), "{bad_json}:2"),
    Case("evaluate-output-below-a-file", _with(_EVALUATE, "--output", "{below_file}"), "{text}"),
    Case("predict-checkpoint-missing", _with(_PREDICT, "--checkpoint", "{missing}"), "{missing}"),
    Case(
        "predict-checkpoint-bad-json", _with(_PREDICT, "--checkpoint", "{bad_checkpoint}"), "{bad_checkpoint}"
    ),
    Case("predict-video-missing", _PREDICT.replace("{video}", "{missing}"), "{missing}"),
    Case("predict-video-folder", _PREDICT.replace("{video}", "{folder}"), "{folder}"),
    Case("predict-video-empty", _PREDICT.replace("{video}", "{empty_video}"), "{empty_video}"),
    Case("predict-video-not-a-video", _PREDICT.replace("{video}", "{not_video}"), "{not_video}"),
    Case("sweep-config-missing", "sweep --config {missing}", "{missing}"),
    Case("sweep-config-folder", "sweep --config {folder}", "{folder}"),
    Case("sweep-config-empty", "sweep --config {empty}", "{empty}"),
    Case("sweep-config-latin1", "sweep --config {latin1}", "{latin1}:1"),
    Case("sweep-config-bad-yaml", "sweep --config {bad_yaml}", "{bad_yaml}:4"),
    Case("sweep-features-is-a-file", "sweep --config {sweep_features_file}", "{text}"),
    Case("sweep-train-latin1", "sweep --config {sweep_train_latin1}", "{latin1}:1"),
    Case("sweep-storage-below-a-file", "sweep --config {sweep} --storage {below_file}", "{text}"),
    Case("report-missing", "report {missing}", "{missing}"),
    Case("report-is-a-file", "report {text}", "{text}"),
    Case("report-empty-folder", "report {folder}", "{folder}"),
    Case("report-sweep-yaml-bad", "report {results_bad_yaml}", "{results_bad_yaml}/sweep.yaml:2"),
    Case("report-result-latin1", "report {results_latin1}", "{results_latin1}/trial_1/result.json:1"),
    Case(
        "report-experiment-state-bad-json",
        "report {results_bad_state}",
        "{results_bad_state}/experiment_state",
    ),
    Case("report-output-unwritable", "report {results_unwritable}", "{results_unwritable}/report"),
]


@dataclass(frozen=True)
class Outcome:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    ray_sessions: list[str]  # Ray sessions the command started (none: it refused before starting Ray)


def _run(case: Case, world: dict[str, str]) -> Outcome:
    argv = case.argv(world)
    ray_tmp = Path(tempfile.mkdtemp(prefix="tr-bad-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "TIMEREFINE_HOME": world["home"],
        "OMP_NUM_THREADS": "1",
    }
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "timerefine.cli", *argv],
            env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        result = subprocess.CompletedProcess(argv, -1, str(expired.stdout), str(expired.stderr))
    seconds = time.perf_counter() - started
    sessions = sorted(path.name for path in ray_tmp.glob("ray/session_2*"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return Outcome(argv, result.returncode, result.stdout, result.stderr, seconds, sessions)


@pytest.fixture(scope="module")
def outcomes(world: dict[str, str]) -> dict[str, Outcome]:
    """Every case's outcome, run a few processes at a time (most of each is Python's start-up)."""
    with ThreadPoolExecutor(PARALLEL_CASES) as pool:
        futures = {case.name: pool.submit(_run, case, world) for case in CASES}
    return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_file(case: Case, world: dict[str, str], outcomes) -> None:
    outcome = outcomes[case.name]
    shown = (
        f"timerefine {' '.join(outcome.argv)}\nstdout:\n{outcome.stdout[-2000:]}\n"
        f"stderr:\n{outcome.stderr[-4000:]}"
    )
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    assert outcome.returncode == 2, shown
    command = outcome.argv[0]
    errors = [
        line
        for line in outcome.stderr.splitlines()
        if re.match(rf"(timerefine {command}:|\[\w+\]) error: ", line)
    ]
    assert len(errors) == 1, shown
    assert outcome.stderr.rstrip().endswith(errors[0]), shown  # the error is the last word
    path, _, line = case.names.format(**world).partition(":")
    where = re.escape(path) + (rf"(:{line}|, line {line})\b" if line else r"(\b|:|$)")
    assert re.search(where, errors[0]), f"{case.names.format(**world)!r} not in {errors[0]!r}"
    assert outcome.ray_sessions == [], "refused only after starting Ray"
