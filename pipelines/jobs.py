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
parse, some sweep trial failed); 2 the input cannot be used or the job failed (``JobError``, or any error of
bad input: a reader's ``ValueError``, an ``OSError``, a ``StorageError``), told in one line that names the
file; 128 + the signal when interrupted.

Interrupted by Ctrl-C or SIGTERM (what ``kill``, ``ray job stop``, systemd and Kubernetes send), a job stops
at once: the ``KeyboardInterrupt`` unwinds through ``compute.ray_connection``, which shuts down the Ray it
started, and ``main`` prints one line saying what the job had committed and how to go on (its module's
optional ``progress(config) -> str``; by default, that the same command resumes). Ray takes SIGTERM over
when it starts (its handler exits without that line), so ``ray_connection`` hands it back
(``interrupt_on_sigterm``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from timerefine.data.storage import Storage, is_s3_uri
from timerefine.errors import INPUT_ERRORS, check_output_path, describe

EXIT_OK, EXIT_INCOMPLETE, EXIT_UNUSABLE = 0, 1, 2
RESUME = "rerun the same command to resume"

# What keeps a job's console to its own progress lines, for the job's process and every Ray worker it
# starts (``--verbose`` keeps the libraries' own output).
QUIET_ENV = {
    # no weight-loading bar or advice from every process that loads a model (transformers reads both when
    # it is imported: a job that does not need it does not import it for this, 1.3 s)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # Ray Train's INFO logs (resources, process group, every checkpoint) and its per-report dictionaries
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Data's per-dataset INFO lines (plan, start, finish): the jobs print their own progress
    "RAY_DATA_LOG_LEVEL": "ERROR",
}


class JobError(Exception):
    """The input cannot be used, or the job failed: one line for the person running it, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the job stands as Ctrl-C's ``KeyboardInterrupt`` is (code that catches one
    catches both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The last SIGTERM this process took: Ray's blocking calls turn any exception a signal handler raises into a
# plain KeyboardInterrupt, so the exit status cannot come from the exception alone.
_terminated_by: int | None = None


def _raise_interrupted(signum: int, frame: object) -> None:
    global _terminated_by
    _terminated_by = signum
    raise Interrupted(signum)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM interrupt this process as Ctrl-C does (from the main thread only, where Python runs
    signal handlers; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


@dataclass
class ClusterOptions:
    """Where a job runs and reaches its data: the options every Ray job shares."""

    address: str | None = None  # a Ray cluster; None: a local one on 127.0.0.1 (``cluster_address``)
    endpoint_url: str | None = None  # an S3-compatible endpoint (else AWS_ENDPOINT_URL, else AWS)
    verbose: bool = False  # keep Ray's and the libraries' own log lines and progress bars
    # Serve Ray's dashboard from a local Ray (on 127.0.0.1) even where the job does not need it; jobs that
    # train always start it (``compute.ray_connection``), and a cluster serves its own either way.
    dashboard: bool = False

    def storage(self) -> Storage:
        return Storage(endpoint_url=self.endpoint_url)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' own logs and bars")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)"
    )
    group.add_argument(
        "--dashboard",
        action="store_true",
        help="a local Ray serves Ray's dashboard on 127.0.0.1 (jobs that train always do)",
    )
    add_storage_arguments(group)


def cluster_address(flag: str | None) -> str | None:
    """``--address``, else ``RAY_ADDRESS``: what ``ray job submit`` sets for its entrypoint, so that a
    submitted job joins the cluster it was submitted to instead of starting a Ray of its own (whose workers
    could not fetch the job's ``--working-dir`` package, which lives in the submitted-to cluster)."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def cluster_from_args(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(
        address=cluster_address(getattr(args, "address", None)),
        endpoint_url=args.endpoint_url,
        verbose=args.verbose,
        dashboard=getattr(args, "dashboard", False),
    )


def check_output_folder(uri: str, storage: Storage) -> None:
    """Refuse, before any work, an output folder or prefix that cannot be written: a local path below a
    file, or one that is a file, is named as such; anything else must take a probe write."""
    if not is_s3_uri(uri):
        check_output_path(uri, folder=True)
    storage.check_writable(uri)


def main(job: ModuleType, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse a job's arguments, run it, and turn its outcome into an exit status and one line on error."""
    parser = argparse.ArgumentParser(
        prog=prog or f"timerefine {job.NAME}", description=(job.__doc__ or "").split("\n")[0]
    )
    job.add_arguments(parser)
    args = parser.parse_args(argv)
    from .compute import prepare_local_ray  # compute builds on this module

    # before anything imports Ray
    prepare_local_ray(ClusterOptions(address=cluster_address(getattr(args, "address", None))))
    quiet_console(verbose=getattr(args, "verbose", False))
    global _terminated_by
    _terminated_by = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    config = None
    try:
        interrupt_on_sigterm()
        config = job.config_from_args(args)
        result = job.run(config)
    except (JobError, *INPUT_ERRORS) as error:
        print(f"[{job.NAME}] error: {describe(error)}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print(f"[{job.NAME}] interrupted: {_progress(job, config)}", file=sys.stderr)
        return 128 + (_terminated_by or signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return getattr(result, "exit_code", EXIT_OK)


def _progress(job: ModuleType, config: Any) -> str:
    """What an interrupted job had committed and how to go on, in its own words (``progress(config)``)."""
    progress = getattr(job, "progress", None)
    if progress is None or config is None:
        return f"what it had written stays; {RESUME}"
    try:
        return progress(config)
    except (Exception, KeyboardInterrupt) as error:  # a second Ctrl-C, or storage out of reach
        return f"what it had written stays (could not tell what: {describe(error)}); {RESUME}"


def console(job: str, label: str | None = None) -> Callable[[str], None]:
    """A job's console: ``say(text)`` writes ``[job label] text`` in one write, so the lines (and tables) of
    jobs run side by side in one process, as the demo runs them, stay whole and say whose they are."""
    tag = f"[{job} {label}]" if label else f"[{job}]"

    def say(text: str) -> None:
        sys.stdout.write(f"{tag} {text}\n")
        sys.stdout.flush()

    return say


def quiet_console(verbose: bool = False) -> None:
    """Our loggers at INFO, other libraries from WARNING; without ``verbose``, no library progress bars."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("timerefine").setLevel(logging.INFO)
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # it read the settings above when it was imported; now switch them
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def job_env(cluster: ClusterOptions) -> dict[str, Any]:
    """Environment variables for every Ray worker of a job (what keeps their output quiet)."""
    return {} if cluster.verbose else dict(QUIET_ENV)
