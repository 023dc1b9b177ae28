"""Where and how each job runs on Ray: the local cluster, strategies, pools, CPUs and GPUs. Decided here.

A job that starts its own Ray (no ``--address``) starts it on 127.0.0.1 only (``ray_connection``): every
socket of GCS, raylet, workers, agents and dashboard binds the loopback interface, so a laptop running
``timerefine extract`` serves nothing to its network.

Feature extraction has three stages with different needs. Decoding is CPU tasks of many videos each,
lasting seconds. Encoding is an actor pool, because an encoder is slow to load and should load once per
actor; on GPUs, one actor a GPU. Writing is a light task a batch of videos. The numbers below are chosen
for two situations:

- GPU clusters: one encoder per ``gpus_per_encoder`` GPUs, each with a CPU to feed it; every other
  CPU decodes.
- CPU-only machines (laptops, CI, 2-core boxes): decoding and encoding run in one actor per core
  (``fused``), each with one torch thread and its own isolated decoder process, which decodes while the
  actor's encoder waits and the other way round; so every core works on one video at a time and no
  frames cross the object store (as separate stages on 2 cores, decode tasks and encoder actors competed
  for the same cores, and each video's 4.9 MB of frames went through Arrow and the object store: the
  pipeline reached 36% of what the cores' work allows). Write tasks must still get scheduled: on 2 CPUs
  an actor pool that takes every logical CPU starves the other stages and hangs forever (DESIGN.md
  section 7), so the actors reserve half a logical CPU each and the operating system shares the cores.

On GPUs the stages stay apart: the decode tasks' CPUs feed the GPU actors. Ray Data fuses a task stage
into the actor stage after it when their resources are equal, which would run decoding inside the GPU
actors one video after another; decode tasks therefore also reserve memory (``DECODE_TASK_MEMORY``, a
Ray worker plus its decoder process), which the encoder actors do not, so their resources never match.

Ray Data retries a crashed task (and restarts a crashed actor) without limit, so a video that crashes
its decoder every time would run a job forever (DESIGN.md section 7). Decoding therefore never crashes a
Ray worker: it runs in a child process (``timerefine.decoder.IsolatedDecoder``) whose crash, hang or
memory blow-up becomes an error row. What Ray still retries is the loss of a worker or a node, where
retrying is right. (Bounding those retries would need ``ray_remote_args``, deprecated in Ray 2.60.)

An autoscaling cluster (cluster.yaml) starts with no workers and a head that advertises no CPUs, so there
is nothing to size a pool from. Given both the pool size and the GPUs per actor, the plan is exactly that
whatever is up now: Ray Data then starts the actors, their pending resource requests make the autoscaler
add nodes, and the job waits for them (``describe`` says so). Without both, the plan is sized from what is
up, and a cluster with nothing up is an error that says what to pass.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .jobs import ClusterOptions, interrupt_on_sigterm, job_env

# A decode task's Ray worker (pyarrow, no torch: 190 MB) and its decoder process (210 MB) hold about 400 MB
# together while decoding a 480x270 clip to 224 px (measured); the rest is headroom for larger videos.
DECODE_TASK_MEMORY = 512 * 1024 * 1024

# Videos one decode task takes, at most. Ray Data's cost of a task (the driver's scheduling, the worker's
# Arrow block and object-store put) is paid once for several: decoding 400 videos on 2 cores went from
# 852-905 to 1298-1311 frames/s with 8 a task instead of 1. And a CPU stays idle between one task's end and
# the next one's start (Ray Data's executor looks for finished tasks every 0.1 s, then dispatches): timed
# inside the workers, 0.03-0.46 s a time, median about 0.15 s. A task therefore decodes for seconds, handing
# its frames on a block at a time as it goes (``decode_stage`` is a generator), so that it never holds more
# than about one block however long it runs. Decoding 400 videos in 1-CPU tasks on 2 cores: 62% -> 80% of
# one core's in-process rate x 2 with 48 a task instead of 8 (median of 3), and 3233 -> 3492 steady
# frames/s, 12.45 -> 11.36 s with 100 instead of 48 (median of 4 alternating rounds, every round faster).
# The videos are dealt out in whole rounds of the decode CPUs (``videos_per_decode_task``), so that no CPU
# is left decoding a last task alone while the others wait.
DECODE_VIDEOS_PER_TASK = 100
# What a decode task hands on at once: at most 8 videos or DECODE_BLOCK_BYTES of frames (6 videos at 128 px,
# 2 at 224 px). Ray Data joins what a task hands on until it passes its target block size, which the
# extraction's datasets set to the same bytes, so blocks stay under twice that (8-12 videos at 128 px),
# about the size of the 8-video tasks' blocks before, and a task's memory inside DECODE_TASK_MEMORY's
# headroom.
DECODE_VIDEOS_PER_BLOCK = 8
DECODE_BLOCK_BYTES = 32 * 1024 * 1024

# Nodes carrying this label (cluster.yaml's CPU-only decode nodes) take every decode task, so that the CPUs
# of GPU nodes stay free to feed their encoders. Clusters without such nodes decode wherever CPUs are free.
DECODE_NODE_LABEL = {"timerefine.io/role": "decode"}


# Read by Ray when it is first imported: with it off, a Ray started here takes 127.0.0.1 as its node's
# address, and binds its servers there (DESIGN.md section 7). Ray's name for it is about firewall popups.
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prepare_local_ray(cluster: ClusterOptions) -> None:
    """Before Ray is imported: keep a Ray this process will start on 127.0.0.1 (a no-op with --address).
    ``jobs.main`` calls it first thing; ``ray_connection`` again, for jobs called from other code."""
    if cluster.address is None:
        for name, value in _LOOPBACK_ENV.items():
            os.environ.setdefault(name, value)


@contextmanager
def ray_connection(
    cluster: ClusterOptions, enabled: bool = True, num_cpus: int | None = None, state_api: bool = False
) -> Iterator[str | None]:
    """Connect to the Ray cluster at ``cluster.address`` for the duration of a job, or start a local one
    on 127.0.0.1 (``num_cpus``: how many CPUs it advertises; default all).

    A local Ray serves Ray's dashboard (its address printed, and yielded; otherwise None) where
    ``cluster.dashboard`` asks for it or the job needs Ray's state API, which the dashboard serves
    (``state_api``): Ray Train does, its placement-group cleaner asking it whether the run's controller
    still lives. Without it the cleaner, a detached actor, never learns that the run ended: under Tune a
    finished trial's workers then stay reserved until the sweep's driver ends (bench/sweep_reservations.py:
    a three-trial sweep on 2 CPUs never started its third), and each run leaves the cleaner polling every
    second (200 MB, 1% of a core). A cluster the job connects to without a dashboard gets a warning.
    Ray Data jobs start without it: its server and its modules' processes cost extracting 96 videos on 2
    cores 1-2 s of 22 (docs/extraction-performance.md, "A lean local Ray").

    A job called from a process already connected (the demo, a test, a notebook) uses that connection and
    leaves it open; a job that connected itself disconnects at the end, failed or interrupted, which for a
    local Ray stops its processes. ``ray.init`` installs Ray's own SIGTERM handler, which exits at once; it is
    replaced by the job protocol's, so that SIGTERM unwinds through here like Ctrl-C. ``enabled=False``
    (Ray Train's local mode) connects to nothing.
    """
    prepare_local_ray(cluster)
    import ray

    started = enabled and not ray.is_initialized()
    dashboard: str | None = None
    try:  # an interrupt while Ray starts shuts down what had started, too
        if started:
            if cluster.address is not None:
                context = ray.init(address=cluster.address, runtime_env={"env_vars": job_env(cluster)})
                if state_api and not context.dashboard_url:
                    print(
                        f"[ray] warning: the cluster at {cluster.address} serves no dashboard, so no state "
                        "API: Ray Train cannot tell when a run has ended, so a sweep's finished trials keep "
                        "their workers' resources reserved and each run leaves a cleaner process polling; "
                        "start the cluster's head with --include-dashboard=true",
                        file=sys.stderr,
                        flush=True,
                    )
            else:
                dashboard = _init_local_ray(job_env(cluster), num_cpus, cluster.dashboard or state_api)
                if dashboard:
                    print(f"[ray] local Ray on 127.0.0.1; its dashboard: http://{dashboard}", flush=True)
            interrupt_on_sigterm()
        if enabled:
            start_ray_data_on_every_cpu_at_once()
        yield dashboard
    finally:
        if started:
            _shutdown()


# How long Ray Data's executor may keep asking for the cluster's size at every loop while it has no answer
# (``start_ray_data_on_every_cpu_at_once``): in a fresh Ray the coordinator actor that answers has to start
# first, a Python process of its own (on 2 cores its answer came 0.7 s after the first task started).
RAY_DATA_SIZE_WAIT_S = 10.0


def start_ray_data_on_every_cpu_at_once() -> None:
    """Let Ray Data's executor use every CPU from its first second, not one task for a second or more.

    Its executor learns the cluster's size from its autoscaling coordinator actor without waiting for the
    answer: the first read finds nothing, and it reads again only after
    ``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s). Until then it runs one task, the least it
    always allows, so every dataset began with one CPU working (on 2 CPUs the second of two tasks started
    1.07-1.12 s after the first, and 0.9-1.7 s after it in a fresh Ray, whose coordinator has to start;
    two plain Ray tasks 0.01 s apart: bench/task_starts.py). Here the executor reads again at each of its
    loops (0.1 s) until it has an answer with CPUs or GPUs in it, for at most ``RAY_DATA_SIZE_WAIT_S``; a
    read with a call to the coordinator still in flight only looks at it, so this asks no more often than
    the coordinator answers. The decode stage of 96 videos on 2 cores went from 3.97 to 2.89 s (median of 5
    alternating runs in one Ray; docs/extraction-performance.md). Reading every 0.1 s throughout instead
    cost more than it saved.

    In the driver, where the executor runs; once a process. Where Ray Data's internals have moved
    (this was written against Ray 2.60), it changes nothing.
    """
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    shipped = ResourceManager.get_global_limits
    if hasattr(shipped, "shipped") or "_global_limits_last_update_time" not in shipped.__code__.co_names:
        return  # already done in this process, or Ray Data's internals have moved

    def get_global_limits(self):
        first_read = self.__dict__.setdefault("_first_limits_read", time.monotonic())
        limits = getattr(self, "_global_limits", None)
        unanswered = limits is not None and not limits.cpu and not limits.gpu
        if unanswered and time.monotonic() - first_read < RAY_DATA_SIZE_WAIT_S:
            self._global_limits_last_update_time = 0  # due again now
        return shipped(self)

    get_global_limits.shipped = shipped  # marks it done; bench/task_starts.py runs both side by side
    ResourceManager.get_global_limits = get_global_limits


def _shutdown() -> None:
    """``ray.shutdown()``, without its one-second wait when it stops a Ray this process started.

    Ray stops its GCS before its autoscaler monitor, whose SIGTERM handler then blocks writing to the
    stopped GCS (a stack dump of the monitor: ``_internal_kv_put`` in ``Monitor._handle_failure``) until
    Ray kills it a second later: ``ray.shutdown()`` took 1.4 s, 0.4 s with the monitor killed first. A local
    Ray's monitor has no nodes to add or remove, so it goes first. Connected to a cluster, this process
    started no monitor and the list is empty; where Ray's internals have moved, the plain shutdown runs.
    """
    import ray

    try:
        from ray._private import ray_constants, worker

        monitors = worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
    except AttributeError:
        monitors = []
    for monitor in monitors:
        monitor.process.kill()
    ray.shutdown()


def _init_local_ray(env_vars: dict[str, str], num_cpus: int | None, dashboard: bool) -> str | None:
    """A local Ray on 127.0.0.1 whose workers know its address; its dashboard's address, if it serves one.

    Its GCS port is chosen here so that every worker can be told its cluster's address: Ray Train's
    helpers otherwise look the cluster up by scanning the machine's processes, and fail when another Ray
    runs beside it (a test session, a colleague's cluster).

    The workers' environment variables are set in this process's environment while Ray starts, which its
    processes inherit, rather than given as a runtime environment: workers of a runtime environment cannot be
    the idle ones Ray starts with the node, and starting new ones cost a 2-core job 1.5-2 s before its
    first actor ran. The raylet's own settings travel the same way (``local_raylet_env``).
    """
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # Ray was imported before prepare_local_ray set the variable it reads at import (measured: a job
        # that looked up its run with ray.train first bound every server to every interface). Its own
        # processes read the variable when they start; this process reads the constant, set here as the
        # variable would have set it.
        ray_constants.ENABLE_RAY_CLUSTER = False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    env_vars = {**env_vars, **local_raylet_env(num_cpus or usable_cpus()), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in env_vars}
    os.environ.update(env_vars)
    try:
        context = ray.init(
            address="local",
            num_cpus=num_cpus or usable_cpus(),
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            logging_config=ray.LoggingConfig(log_level="ERROR"),
        )
    finally:  # the started processes keep them; this process must not (a later job's RAY_ADDRESS)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return context.dashboard_url or None  # "" without one


# Idle workers a node keeps, per CPU. Ray's default keeps one a CPU and stops the rest after a second idle,
# and then runs the next tasks in fewer workers or in new ones; but write tasks, actors and decode tasks
# (half-CPU ones in the measurement below) run more workers than CPUs, and a new worker is a Python that
# imports Ray, pyarrow and starts a decoder process. Decoding 96 videos in half-CPU tasks on 2 cores, workers
# already warm: 9.8-10.5 s with Ray's default (7 worker processes seen, a decoder process started anew),
# 7.4-7.7 s with 4 a CPU (no new process), two alternating runs each. Only as many stay as were busy at
# once; the job's end stops them.
IDLE_WORKERS_PER_CPU = 4


def local_raylet_env(num_cpus: float) -> dict[str, str]:
    """The raylet's settings for a Ray this job starts on its own machine (``ray start`` and a local Ray
    read them from their environment); a value the user set is kept.

    - ``RAY_num_workers_soft_limit``: keep the node's workers between tasks (``IDLE_WORKERS_PER_CPU``).
    - ``RAY_worker_niceness``: Ray starts its workers at niceness 15, so that on a node of its own its
      servers stay responsive; on a machine shared with other work that makes the job yield to everything
      else. Extracting 8 videos beside two busy processes on 2 cores took 202 s (the encoder actors got 2%
      of a core while they loaded) where the plain loop took 12.7 s. Ray adds this to the niceness the
      node started with, so with 0 the workers run at the driver's priority, as a plain loop would (and a
      job started with ``nice`` stays niced). cluster.yaml's nodes, which run nothing else, keep Ray's 15.
    """
    defaults = {
        "RAY_num_workers_soft_limit": str(max(1, math.ceil(IDLE_WORKERS_PER_CPU * num_cpus))),
        "RAY_worker_niceness": "0",
    }
    return {name: os.environ.get(name) or value for name, value in defaults.items()}


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset`` and container CPU sets included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterResources:
    """What the cluster has up now; an autoscaling cluster adds nodes only once work asks for them."""

    cpus: float
    gpus: float
    decode_nodes: bool = False  # some alive node carries DECODE_NODE_LABEL

    @classmethod
    def of_running_cluster(cls) -> ClusterResources:
        """The resources of the cluster this process is connected to (``ray.init`` first), as up now."""
        import ray

        total = ray.cluster_resources()
        decode_nodes = any(
            node.get("Alive") and DECODE_NODE_LABEL.items() <= node.get("Labels", {}).items()
            for node in ray.nodes()
        )
        cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        return cls(cpus=cpus, gpus=gpus, decode_nodes=decode_nodes)


def _actor_pool_args(size: int, num_cpus: float, num_gpus: float) -> dict:
    """``map_batches`` arguments of a fixed-size actor pool; ``num_gpus`` only when it asks for GPUs."""
    from ray.data import ActorPoolStrategy

    args = {"compute": ActorPoolStrategy(size=size), "num_cpus": num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    return args


@dataclass(frozen=True)
class _ActorPool:
    size: int
    gpus_each: float
    cpus_each: float
    shortfall: str | None  # what an explicit request needs beyond what is up now; None: it fits


def _plan_actor_pool(
    resources: ClusterResources,
    size: int | None,
    gpus_each: float | None,
    *,
    job: str,
    actors: str,
    size_flag: str,
    gpus_flag: str,
) -> _ActorPool:
    """Size an actor pool: as asked when both ``size`` and ``gpus_each`` are given, else from what is up."""
    if size is not None and size < 1:
        raise ValueError(f"{size_flag} must be at least 1, got {size}")
    if gpus_each is not None and gpus_each < 0:
        raise ValueError(f"{gpus_flag} must be >= 0, got {gpus_each}")

    if size is not None and gpus_each is not None:
        if resources.cpus >= 1 and size * gpus_each <= resources.gpus:
            return _ActorPool(size, gpus_each, min(1.0, resources.cpus / (2 * size)), None)
        # Sized for the nodes to come rather than for those up now: a CPU each, which every node type has.
        need = f"{size:g} CPU" + (f" and {size * gpus_each:g} GPU" if gpus_each else "")
        up = f"{resources.cpus:g} CPU and {resources.gpus:g} GPU are up now"
        return _ActorPool(size, gpus_each, 1.0, f"the {actors} need {need}; {up}")

    explicit = f"{size_flag} N {gpus_flag} G to size the pool yourself and wait for the autoscaler"
    if resources.cpus < 1:
        raise ValueError(
            f"{job} needs at least 1 CPU in the Ray cluster, found {resources.cpus:g}: start worker nodes "
            f"(raise min_workers in cluster.yaml), or pass {explicit}"
        )
    if gpus_each and not resources.gpus:
        raise ValueError(
            f"{gpus_flag} {gpus_each:g} asks for GPUs; the Ray cluster has none: start GPU workers, "
            f"or add {size_flag} N to wait for the autoscaler"
        )
    if resources.gpus > 0 and gpus_each != 0:
        per_actor = gpus_each or 1.0
        count = size or max(1, math.floor(resources.gpus / per_actor))
        if count * per_actor > resources.gpus:
            raise ValueError(
                f"{count} {actors} x {per_actor:g} GPUs exceed the cluster's {resources.gpus:g} GPUs; "
                f"pass {size_flag} {count} {gpus_flag} {per_actor:g} to wait for the autoscaler to add more"
            )
        return _ActorPool(count, per_actor, min(1.0, resources.cpus / (2 * count)), None)
    count = size or max(1, math.floor(resources.cpus))
    return _ActorPool(count, 0.0, min(1.0, resources.cpus / (2 * count)), None)


def _waiting(shortfall: str | None) -> str:
    return f"; the job waits for the autoscaler to add nodes ({shortfall})" if shortfall else ""


@dataclass(frozen=True)
class ExtractionCompute:
    """Resources and strategies of the three extraction stages; pass ``*_args()`` to ``map_batches``."""

    decode_num_cpus: float
    encoders: int
    encoder_num_cpus: float
    encoder_num_gpus: float
    encoder_threads: int | None  # torch intra-op threads of a CPU encoder; None: torch's default
    write_num_cpus: float
    fused: bool = False  # decode inside the encoder actors (CPU encoders), not in tasks of their own
    decode_parallelism: int = 1  # decode tasks the CPUs up now run at once, beside the encoders
    decode_label_selector: dict[str, str] | None = None
    shortfall: str | None = None  # what the encoders need beyond what is up now; None: they fit

    def decode_args(self) -> dict:
        from ray.data import TaskPoolStrategy

        args = {"compute": TaskPoolStrategy(), "num_cpus": self.decode_num_cpus, "memory": DECODE_TASK_MEMORY}
        if self.decode_label_selector:
            args["label_selector"] = dict(self.decode_label_selector)
        return args

    def videos_per_decode_task(self, videos: int) -> int:
        """How many videos each decode task decodes, of ``videos`` to decode in all: at most
        ``DECODE_VIDEOS_PER_TASK``, in as few rounds of ``decode_parallelism`` equal tasks as that allows
        (400 videos on 2 CPUs: 4 tasks of 100; 250 videos: 4 of 63, not 100, 100 and a last 50 alone)."""
        rounds = math.ceil(videos / (self.decode_parallelism * DECODE_VIDEOS_PER_TASK))
        return max(1, math.ceil(videos / (self.decode_parallelism * max(1, rounds))))

    def videos_per_decode_block(self, frame_bytes_per_video: int) -> int:
        """How many videos' frames a decode task hands on at once (one Ray Data block)."""
        return max(1, min(DECODE_VIDEOS_PER_BLOCK, DECODE_BLOCK_BYTES // max(1, frame_bytes_per_video)))

    def encode_args(self) -> dict:
        return _actor_pool_args(self.encoders, self.encoder_num_cpus, self.encoder_num_gpus)

    def write_args(self) -> dict:
        from ray.data import TaskPoolStrategy

        return {"compute": TaskPoolStrategy(), "num_cpus": self.write_num_cpus}

    def describe(self) -> str:
        device = f"{self.encoder_num_gpus:g} GPU" if self.encoder_num_gpus else "CPU"
        threads = f", {self.encoder_threads} thread(s)" if self.encoder_threads else ""
        if self.fused:
            decoding = "each decoding its own videos"
        else:
            decoding = f"decode tasks {self.decode_num_cpus:g} CPU" + (
                " on decode nodes" if self.decode_label_selector else ""
            )
        return (
            f"{self.encoders} encoder actor(s) on {device} ({self.encoder_num_cpus:g} CPU each{threads}), "
            f"{decoding}, write tasks {self.write_num_cpus:g} CPU" + _waiting(self.shortfall)
        )


def plan_extraction(
    resources: ClusterResources, encoders: int | None = None, gpus_per_encoder: float | None = None
) -> ExtractionCompute:
    """Choose the extraction's compute for a cluster; ``gpus_per_encoder=0`` forces CPU encoders.

    Given both ``encoders`` and ``gpus_per_encoder``, the plan is exactly that even where the cluster has
    less up now (see the module docstring)."""
    pool = _plan_actor_pool(
        resources,
        encoders,
        gpus_per_encoder,
        job="feature extraction",
        actors="encoders",
        size_flag="--encoders",
        gpus_flag="--gpus-per-encoder",
    )
    on_cpus = not pool.gpus_each
    decode_num_cpus, write_num_cpus = 1.0, 0.25
    free_cpus = resources.cpus - pool.size * pool.cpus_each - write_num_cpus
    return ExtractionCompute(
        decode_num_cpus=decode_num_cpus,
        encoders=pool.size,
        encoder_num_cpus=pool.cpus_each,
        encoder_num_gpus=pool.gpus_each,
        encoder_threads=1 if on_cpus else None,
        write_num_cpus=write_num_cpus,
        fused=on_cpus,
        decode_parallelism=max(1, math.floor(free_cpus / decode_num_cpus)),
        decode_label_selector=DECODE_NODE_LABEL if resources.decode_nodes and not on_cpus else None,
        shortfall=pool.shortfall,
    )


@dataclass(frozen=True)
class InferenceCompute:
    """Resources of the evaluation's predictor actors (each holds a model); pass ``predict_args()`` to
    ``map_batches``."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int | None  # torch intra-op threads of a CPU actor; None: torch's default
    shortfall: str | None = None  # what the actors need beyond what is up now; None: they fit

    def predict_args(self) -> dict:
        return _actor_pool_args(self.actors, self.num_cpus, self.num_gpus)

    def describe(self) -> str:
        device = f"{self.num_gpus:g} GPU" if self.num_gpus else "CPU"
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return (
            f"{self.actors} predictor actor(s) on {device} ({self.num_cpus:g} CPU each{threads})"
            + _waiting(self.shortfall)
        )


def plan_inference(
    resources: ClusterResources,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
) -> InferenceCompute:
    """Choose the predictors' compute: one a GPU on GPU clusters; on CPUs one single-threaded actor a core,
    reserving half a logical CPU each, as the extraction's encoders do, so the other tasks still run.

    Given both ``actors`` and ``gpus_per_actor``, the plan is exactly that even where the cluster has less
    up now (see the module docstring). ``cpus_per_actor`` replaces the CPU share, for evaluations that
    run beside other jobs on one machine (the demo scores one model while the other trains)."""
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise ValueError(f"--cpus-per-actor must be > 0, got {cpus_per_actor:g}")
    pool = _plan_actor_pool(
        resources,
        actors,
        gpus_per_actor,
        job="inference",
        actors="actors",
        size_flag="--actors",
        gpus_flag="--gpus-per-actor",
    )
    threads = None if pool.gpus_each else 1
    cpus = pool.cpus_each if cpus_per_actor is None else cpus_per_actor
    return InferenceCompute(pool.size, cpus, pool.gpus_each, threads, pool.shortfall)


# ---------------------------------------------------------------------------------------------------------
# Training and sweeps


@dataclass
class TrainResources:
    """What one training run asks Ray Train for. ``workers = 0`` runs the loop in the driver's process
    without Ray workers (Ray Train's local mode)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: in this process), got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be >= 0")

    @property
    def local_mode(self) -> bool:
        return self.workers == 0

    def scaling_config(self):
        """Ray Train's ``ScalingConfig`` for these workers."""
        from ray.train import ScalingConfig

        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(
            num_workers=self.workers, use_gpu=self.gpus_per_worker > 0, resources_per_worker=resources
        )

    def per_run(self) -> dict[str, float]:
        """What the whole run's workers reserve together."""
        need = {"CPU": self.workers * self.cpus_per_worker, "GPU": self.workers * self.gpus_per_worker}
        return {name: amount for name, amount in need.items() if amount > 0}


# A sweep trial's own process only waits for its Train run (the workers reserve the CPUs and GPUs), so it
# reserves memory, not a CPU: on a 2-core machine a CPU per waiting trial would leave none to train with.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 1024**2}


def max_concurrent_runs(
    resources: TrainResources, cluster: dict[str, float], limit: int | None = None
) -> int:
    """How many training runs of ``resources`` fit in the cluster at once (``limit`` when given; at least 1:
    a cluster too small for one still gets one, which waits for an autoscaler or fails with Ray's message)."""
    if limit is not None:
        return limit
    fits = [
        math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in resources.per_run().items()
    ]
    return max(1, min(fits, default=1))
