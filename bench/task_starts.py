"""When the tasks of a stage start: plain Ray tasks, and a Ray Data map as Ray ships it and as jobs run it.

Ray Data (2.60) starts the second of two tasks on 2 CPUs a second after the first, where two plain Ray
tasks start together. Its executor reads the cluster's resources from its autoscaling coordinator actor
without waiting, gets nothing before the actor's first answer, and reads again only a second later
(``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S``); until then it runs one task, the least it always
allows. The jobs' drivers read again until the answer has come
(``pipelines.compute.start_ray_data_on_every_cpu_at_once``). This prints each task's start, seconds after
submission, for the three, rounds alternating: ``python bench/task_starts.py [--tasks N] [--repeats R]``.
Each task sleeps ``--task-s`` seconds on a CPU of its own, so that the tasks of one round can all run at
once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.compute import ray_connection, usable_cpus
from pipelines.jobs import ClusterOptions, quiet_console


def plain_task_starts(tasks: int, task_s: float) -> list[float]:
    import ray

    @ray.remote(num_cpus=1)
    def sleep(seconds: float) -> float:
        started = time.time()
        time.sleep(seconds)
        return started

    submitted = time.time()
    return sorted(started - submitted for started in ray.get([sleep.remote(task_s) for _ in range(tasks)]))


def ray_data_task_starts(tasks: int, task_s: float, rows_per_task: int = 48) -> list[float]:
    """A Ray Data map of ``tasks`` tasks of ``rows_per_task`` rows (a block a row, as the extraction's
    video dataset), each a generator that hands on its start time and then sleeps."""
    import ray

    def sleep(batch: dict) -> object:
        yield {"started": [time.time()] * len(batch["row"])}
        time.sleep(task_s)

    items = [{"row": row} for row in range(tasks * rows_per_task)]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    submitted = time.time()
    mapped = dataset.map_batches(sleep, batch_size=rows_per_task, num_cpus=1)
    return sorted({row["started"] - submitted for row in mapped.iter_rows()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=usable_cpus(), help="tasks a round (default: the CPUs)")
    parser.add_argument("--task-s", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_console()
    with ray_connection(ClusterOptions(), num_cpus=args.tasks):
        from ray.data._internal.execution.resource_manager import ResourceManager

        rereading = ResourceManager.get_global_limits
        shipped = getattr(rereading, "shipped", rereading)
        plain_task_starts(args.tasks, 0.1)  # the workers started
        ray_data_task_starts(args.tasks, 0.1)  # and Ray Data's actors
        rounds = {"plain Ray tasks": [], "Ray Data, as shipped": [], "Ray Data, as run": []}
        for repeat in range(args.repeats):
            rounds["plain Ray tasks"].append(plain_task_starts(args.tasks, args.task_s))
            order = ["Ray Data, as shipped", "Ray Data, as run"]
            for name in order if repeat % 2 == 0 else reversed(order):
                ResourceManager.get_global_limits = shipped if name.endswith("shipped") else rereading
                rounds[name].append(ray_data_task_starts(args.tasks, args.task_s))
            ResourceManager.get_global_limits = rereading
    print(f"{args.tasks} tasks of {args.task_s:g} s, {args.tasks} CPUs; seconds from submission to a start")
    for name, starts in rounds.items():
        runs = "; ".join(", ".join(f"{start:.2f}" for start in run) for run in starts)
        last = statistics.median(run[-1] for run in starts)
        print(f"{name:20s} last task started at {last:.2f} s (median)   runs: {runs}")


if __name__ == "__main__":
    main()
