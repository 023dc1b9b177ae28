"""One local Ray cluster for a whole test session, on 127.0.0.1, with its files in a temporary folder.

Ray takes seconds to start (over ten on a busy 2-core machine), so every Ray test of a session shares
one cluster: request the ``ray_cluster`` fixture (tests/conftest.py) or call
``start_local_ray`` from a session fixture of your own. Jobs run in the test process then find Ray
initialised and use it; jobs run as subprocesses connect with ``--address``.

Two settings must be in the environment before Ray is imported anywhere in the test process (Ray reads
them at import), so importing this module sets them:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every Ray port on 127.0.0.1; without it Ray binds and
  advertises the machine's external interface (measured here with ``ss -ltnp``).
- ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns token authentication on by default; tests turn it off
  explicitly rather than depend on a token file in the home directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # after the environment it reads at import


def start_local_ray(
    temp_dir: Path, num_cpus: int = 2, object_store_bytes: int = 1 << 30, attempt: int = 1
) -> str:
    """Start a local Ray in this process; returns the address subprocesses pass to ``ray.init``.

    It serves Ray's dashboard, as a cluster's head does, for the state API it serves: every Ray Train run
    starts a detached placement-group cleaner that asks it whether the run's controller lives. Without it
    the cleaners never learned that their runs had ended: a sweep's finished trials kept their workers'
    CPUs reserved (CI saw the killed-sweep test's continued sweep wait 400 s with a CPU still reserved
    after it), and each training test left a cleaner polling for the rest of the session (200 MB, 1% of a
    core each).

    ``temp_dir`` holds Ray's sessions, sockets and logs (keep its path short: Unix socket paths are
    limited to about 107 characters) and timerefine's cache (``TIMEREFINE_HOME``), so a test session
    writes nothing to the home directory.
    """
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this test process; share the ray_cluster fixture")
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "Ray was imported before tests/raycluster.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so it "
            "would bind the external interface: import raycluster (or set it) before anything imports ray"
        )
    os.environ["RAY_TMPDIR"] = str(temp_dir)  # for jobs started as subprocesses, too
    os.environ["TIMEREFINE_HOME"] = str(temp_dir / "timerefine")
    context = ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,  # Ray's state API, as on a cluster: Ray Train's cleaners ask it (below)
        dashboard_host="127.0.0.1",
        object_store_memory=object_store_bytes,
        _temp_dir=str(temp_dir / ("ray" if attempt == 1 else f"ray{attempt}")),
    )
    address = context.address_info["gcs_address"]
    if not address.startswith("127.0.0.1:"):
        ray.shutdown()
        raise RuntimeError(f"local Ray listens on {address}, not on 127.0.0.1")
    return address


class SessionRay:
    """The session's local Ray, handed to each test with every CPU free.

    A test that leaves an actor or a task holding CPUs (a killed driver whose trials never ended, say)
    fails in its own teardown, saying how many CPUs are still held, and the cluster is replaced by a new
    one, so that the tests after it neither wait for CPUs that never come nor fail for it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.starts = 1
        self.address = start_local_ray(folder)

    def held_cpus(self, timeout_s: float) -> float:
        """CPUs still held once ``timeout_s`` has passed, or 0 as soon as all are free (a finished job's
        actors take a few seconds to go)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)
            if held <= 0 or time.monotonic() > deadline:
                return max(held, 0.0)
            time.sleep(0.5)

    def give_back_or_replace(self, timeout_s: float = 60.0) -> None:
        """After a test: all CPUs free within ``timeout_s``, or a new cluster and an error saying why."""
        held = self.held_cpus(timeout_s)
        if held:
            self.replace()
            raise RuntimeError(
                f"the test left {held:g} of the session Ray's CPUs held {timeout_s:.0f} s after it ended: "
                "an actor or task of a job it ran in or against that Ray has not ended (the cluster has "
                "been replaced for the tests after it)"
            )

    def replace(self) -> None:
        ray.shutdown()
        self.starts += 1
        self.address = start_local_ray(self.folder, attempt=self.starts)

    def stop(self) -> None:
        ray.shutdown()
