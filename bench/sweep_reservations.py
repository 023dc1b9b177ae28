"""Does a sweep on a Ray without its dashboard get its CPUs back after each trial?

Starts a 2-CPU local Ray (with Ray's dashboard, or without it: ``--no-dashboard``), and runs a three-trial
sweep on it, one trial at a time, as a separate job (``tune/sweep.py --address``), printing every 10 s
how many CPUs are reserved, the state of each CPU placement group and of each trial. Under Tune a
finished trial's Train run leaves its workers' placement group to a cleaner that asks Ray's state API
(served by the dashboard) whether the run's controller is gone; without it the finished trials keep both
CPUs and the third trial waits for ever (the script gives up after ``--limit-s``).

    python bench/sweep_reservations.py                 # finishes
    python bench/sweep_reservations.py --no-dashboard  # the third trial never starts
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every port on 127.0.0.1 (read at Ray's import)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402  (after the environment it reads at import)
from featurebench import write_sweep_benchmark  # noqa: E402

from pipelines import report  # noqa: E402
from timerefine.data.storage import StorageError  # noqa: E402


def trial_states(experiment: Path) -> list[str]:
    """Each trial's status in Tune's newest saved experiment state (none before the first is saved)."""
    try:
        return sorted(trial.status for trial in report.read_results(str(experiment)).trials)
    except StorageError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-dashboard", action="store_true", help="start the Ray without its dashboard")
    parser.add_argument("--limit-s", type=float, default=200.0, help="give up on the sweep after this long")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tr-sweep-"))
    os.environ["RAY_TMPDIR"] = str(folder)
    context = ray.init(
        num_cpus=2, include_dashboard=not args.no_dashboard, dashboard_host="127.0.0.1", log_to_driver=False
    )
    benchmark = write_sweep_benchmark(folder / "benchmark")
    sweep_file = folder / "three.yaml"
    sweep_file.write_text(
        yaml.safe_dump({
            "name": "three",
            "storage": str(folder / "results"),
            "data": {
                "features": str(benchmark.features), "train": str(benchmark.train), "val": str(benchmark.val)
            },
            "search": {"schedule": [1, 2, 4], "l1_weight": [0.5]},
            "train": {"epochs": 2, "global_batch_size": 4, "micro_batch_size": 4, "learning_rate": 3e-3},
            "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
            "asha": {"grace_period": 2},
        })
    )  # fmt: skip
    command = [sys.executable, str(REPO / "tune" / "sweep.py"), "--config", str(sweep_file), "--no-report"]
    command += ["--address", context.address_info["gcs_address"]]
    print(f"Ray {'without' if args.no_dashboard else 'with'} its dashboard, 2 CPUs; 3 trials one at a time")
    started = time.monotonic()
    with open(folder / "sweep.log", "w") as log:
        sweep = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while sweep.poll() is None and time.monotonic() - started < args.limit_s:
        time.sleep(10)
        reserved = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
        groups = [g["state"] for g in ray.util.placement_group_table().values() if "CPU" in g["bundles"][0]]
        print(
            f"{time.monotonic() - started:5.0f} s  CPUs reserved {reserved:g}  "
            f"CPU placement groups {groups}  trials {trial_states(folder / 'results' / 'three')}",
            flush=True,
        )
    if sweep.poll() is None:
        sweep.kill()
        print(f"the sweep had not finished after {args.limit_s:.0f} s: killed (its log: {folder}/sweep.log)")
    else:
        print(f"the sweep ended with exit status {sweep.returncode} after {time.monotonic() - started:.0f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
