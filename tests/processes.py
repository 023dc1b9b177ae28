"""A test's subprocess and everything it starts, killed when the test ends, passed or failed.

A job run as a subprocess starts a Ray of its own (GCS, raylet, workers, agents); when a test fails
before it has stopped the job, or the job's Ray outlives it, those processes keep running through the
rest of the session, competing with every later test for the machine's cores. The processes are
collected while the job runs, because once the job is gone its Ray's processes are children of init and
can no longer be told from anyone else's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import psutil


class ProcessTree:
    """The processes a subprocess has started, as far as they have been seen."""

    def __init__(self, root: subprocess.Popen, every_s: float = 1.0) -> None:
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self.watch()
        threading.Thread(target=self._watch_until_the_root_ends, args=(every_s,), daemon=True).start()

    def _watch_until_the_root_ends(self, every_s: float) -> None:
        while self.root.poll() is None:
            self.watch()
            time.sleep(every_s)

    def watch(self) -> list[psutil.Process]:
        """Record the root's descendants now (call it while they run); returns them."""
        try:
            descendants = psutil.Process(self.root.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        with self._lock:
            for process in descendants:
                self.seen.setdefault(process.pid, process)
        return descendants

    def alive(self) -> list[psutil.Process]:
        """Descendants seen at some point that still run (a reused pid is told apart by its start time)."""
        with self._lock:
            return [process for process in self.seen.values() if process.is_running()]

    def kill(self) -> None:
        """SIGKILL the root and every descendant seen, including those seen just now."""
        self.watch()
        if self.root.poll() is None:
            self.root.kill()
        for process in self.alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(self.alive(), timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.root.wait(timeout=10)


@contextlib.contextmanager
def reaped(root: subprocess.Popen) -> Iterator[ProcessTree]:
    """``with reaped(subprocess.Popen(...)) as tree:``; on the way out, whatever still runs is killed."""
    tree = ProcessTree(root)
    try:
        yield tree
    finally:
        tree.kill()


def run_reaped(argv: list[str], timeout_s: float, **popen: object) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)``, except that on the
    way out, timed out or not, everything the command started and left running is killed too
    (``subprocess.run`` kills only the command itself)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    with reaped(process):
        stdout, stderr = process.communicate(timeout=timeout_s)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


REAL_TIME_POLICIES = (os.SCHED_FIFO, os.SCHED_RR)


class NormalScheduling:
    """Keeps the test process and everything it starts under the normal scheduling policy.

    On the shared machine the suite runs on, the test process was seen switched to SCHED_FIFO at priority
    99 mid-run, by nothing of ours; every job it started after that inherited it, and a CPU-bound
    real-time process is never preempted by the normal ones (Ray's GCS and raylet, the job's own
    driver), so the jobs under test starve in ways no user machine shows. A thread started before any
    such switch looks every ``every_s`` seconds at the main thread of each process of the tree and puts a
    real-time one, and all its threads, back under SCHED_OTHER; ``reset`` counts them for the summary.
    """

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.reset: dict[int, str] = {}  # pid -> its command, each process put back

    def start(self) -> None:
        """Check in a daemon thread for as long as the test process lives."""
        threading.Thread(target=self._run, name="normal-scheduling", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)
            self.check()

    def check(self) -> None:
        me = psutil.Process()
        try:
            processes = [me, *me.children(recursive=True)]
        except psutil.Error:
            return
        for process in processes:
            with contextlib.suppress(OSError, psutil.Error):
                if os.sched_getscheduler(process.pid) in REAL_TIME_POLICIES:
                    for thread in process.threads():
                        with contextlib.suppress(OSError):
                            os.sched_setscheduler(thread.id, os.SCHED_OTHER, os.sched_param(0))
                    self.reset.setdefault(process.pid, " ".join(process.cmdline()[:2])[:80])
