"""bench/extract.py's account of where the decode stage's cores went: each process counted under its role,
and the ceiling that follows from the shares."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from timerefine.decoder import DecodeSettings, IsolatedDecoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def _import_benchmark() -> ModuleType:
    """bench/extract.py quiets Ray's and transformers' logs as it is imported; the suite keeps its own."""
    environment = dict(os.environ)
    try:
        return importlib.import_module("extract")
    finally:
        os.environ.clear()
        os.environ.update(environment)


bench = _import_benchmark()
DECODERS, WORKERS, DRIVER, RAY_OWN, OTHER = (
    bench.DECODERS,
    bench.WORKERS,
    bench.DRIVER,
    bench.RAY_OWN,
    bench.OTHER,
)


def test_a_decoder_process_this_process_and_another_are_told_apart():
    decoder = IsolatedDecoder(DecodeSettings())
    decoder.start()
    other = subprocess.Popen(["sleep", "30"])
    try:
        roles = {pid: role for pid, (role, _) in bench.cpu_by_role().items()}
    finally:
        other.kill()
        other.wait()
        decoder_pid = decoder.pid
        decoder.close()

    assert roles[decoder_pid] == DECODERS
    assert roles[os.getpid()] == DRIVER
    assert roles[other.pid] == OTHER


def test_cpu_used_is_the_difference_by_role_and_counts_new_processes_whole():
    before = {1: (DECODERS, 10.0), 2: (DRIVER, 1.0)}
    after = {1: (DECODERS, 14.0), 2: (DRIVER, 1.5), 3: (WORKERS, 0.7)}

    used = bench.cpu_used(before, after)

    assert used == {DECODERS: 4.0, WORKERS: 0.7, DRIVER: 0.5, RAY_OWN: 0.0, OTHER: 0.0}


def test_the_ceiling_is_the_decoders_share_scaled_by_their_speed_against_in_process():
    # 2 cores x 10 s: decoders 16 s (80%) for 200 videos, 80 ms a video, where in process one took 72 ms.
    used = {DECODERS: 16.0, WORKERS: 1.4, DRIVER: 1.0, RAY_OWN: 0.8, OTHER: 0.2, "wall": 10.0}
    decode = bench.Measure(cpu=[used])

    line = bench.decode_stage_cores({"repeats": [{"decode_s": 0.072}]}, decode, cores=2, count=200)

    assert f"{DECODERS} 80%" in line and f"{WORKERS} 7%" in line and "idle 3%" in line
    assert "80.0 ms (in process, one core: 72.0 ms)" in line
    assert f"at most {0.8 * 72 / 80:.0%}" in line  # 72%


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
