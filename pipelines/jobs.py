"""The job protocol: how every Ray job here is configured, started, ended and called by another job.

A job module provides

    NAME                              its command name, e.g. "train"
    add_arguments(parser)             its flags (the shared groups below included)
    config_from_args(args) -> Config  a dataclass holding everything the job needs
    run(config) -> Result             a dataclass of what it produced (paths, metrics); raises JobError

and ends with ``if __name__ == "__main__": sys.exit(jobs.main(sys.modules[__name__]))``. Both doors go
through ``main``: ``timerefine NAME ...`` (the CLI only dispatches) and ``python pipelines/NAME.py ...``
(what ``ray job submit`` runs). Jobs that use other jobs (the demo, the sweep) build their configs and call
``run``; they never build argv and never read back files written for the purpose.

Exit statuses: 0 done; 1 done but incomplete (``Result.exit_code``: no video got through, an answer did not
parse, some sweep trial failed); 2 the input cannot be used or the job failed (``JobError``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from timerefine.data.storage import Storage, StorageError

EXIT_OK, EXIT_INCOMPLETE, EXIT_UNUSABLE = 0, 1, 2

# What keeps a job's console to its own progress lines, for the job's process and every Ray worker it
# starts (``--verbose`` keeps the libraries' own output).
QUIET_ENV = {
    # no weight-loading bar from every process that loads a model
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Ray Train's INFO logs (resources, process group, every checkpoint) and its per-report dictionaries
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Data's per-dataset INFO lines (plan, start, finish): the jobs print their own progress
    "RAY_DATA_LOG_LEVEL": "ERROR",
}


class JobError(Exception):
    """The input cannot be used, or the job failed: one line for the person running it, exit status 2."""


@dataclass
class ClusterOptions:
    """Where a job runs and reaches its data: the options every Ray job shares."""

    address: str | None = None  # a Ray cluster; None starts a local one on 127.0.0.1
    endpoint_url: str | None = None  # an S3-compatible endpoint (else AWS_ENDPOINT_URL, else AWS)
    verbose: bool = False  # keep Ray's and the libraries' own log lines and progress bars

    def storage(self) -> Storage:
        return Storage(endpoint_url=self.endpoint_url)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' own logs and bars")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    add_storage_arguments(group)


def cluster_from_args(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(
        address=getattr(args, "address", None), endpoint_url=args.endpoint_url, verbose=args.verbose
    )


def main(job: ModuleType, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse a job's arguments, run it, and turn its outcome into an exit status and one line on error."""
    parser = argparse.ArgumentParser(
        prog=prog or f"timerefine {job.NAME}", description=(job.__doc__ or "").split("\n")[0]
    )
    job.add_arguments(parser)
    args = parser.parse_args(argv)
    quiet_console(verbose=getattr(args, "verbose", False))
    try:
        result = job.run(job.config_from_args(args))
    except (JobError, StorageError, ValueError, FileNotFoundError) as error:
        print(f"[{job.NAME}] error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    return getattr(result, "exit_code", EXIT_OK)


def quiet_console(verbose: bool = False) -> None:
    """Our loggers at INFO, other libraries from WARNING; without ``verbose``, no library progress bars."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("timerefine").setLevel(logging.INFO)
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    try:  # transformers reads the progress-bar setting when it is first imported; later, switch it off
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def job_env(cluster: ClusterOptions) -> dict[str, Any]:
    """Environment variables for every Ray worker of a job (what keeps their output quiet)."""
    return {} if cluster.verbose else dict(QUIET_ENV)
