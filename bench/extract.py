"""Feature-extraction throughput against the work it does: in-process rates, each Ray stage alone, the
pipeline, ``timerefine extract`` end to end and a user's plain loop, side by side on the same videos.

In one run on the same synthetic videos (built-in encoder unless ``--encoder``), for each ``--videos``:

- in process, pinned to one core: decoding (the decoder's own sampling, resize and crop) and encoding
  (``ClipImageEncoder``, one torch thread) per video, on an even sample of up to 64 of the videos; and
  the same on every core at once, one pinned process a core, each phase started together (what the cores
  do together: they share caches, memory bandwidth and the processor's power budget); once a repeat,
  right before its Ray stages, with no Ray running;
- the work bound: cores / (decode s + encode s per video), what the cores could do with no overhead, from
  the one-core rates (the issue's targets) and from the rates at once;
- each Ray stage alone: decode tasks, a CPU each on every CPU (frames into the object store, each block
  let go as it arrives, as the encoders let go of it), and encoder actors fed frames decoded beforehand,
  as a GPU cluster runs them; on a Ray that has run a small dataset first (a fresh one each repeat), and
  where the decode stage's cores went (by process: decoders, task workers, driver, Ray's own);
- the pipeline: the job's Ray Data dataset as this machine's plan builds it (on CPUs, decoding and
  encoding in one actor a core), writing Parquet;
- ``timerefine extract`` end to end (a fresh process: Python, Ray's start, workers, writing), and in one
  more run the peak memory of its process tree (PSS: shared object-store pages counted once);
- the plain loop (bench/plain_loop.py: decord, linspace, centre crop, transformers at 2 torch threads,
  one process), end to end the same way;

then the ratios issue 13 sets targets for. Stage rates are steady rates, videos between the 10% and 90%
marks of their outputs over the time between them (workers' start and the last stragglers left out, as
the in-process rates leave out imports); wall times include everything. Each Ray stage starts once the
one before it has let go of the cores (``settle``). Each measurement is repeated
(``--repeats``) in alternating order and the median kept; each ratio is the median of one ratio a repeat,
its Ray run against the in-process rates measured seconds before it (this machine's speed moves by a
fifth from one minute to the next, which a ratio of medians taken minutes apart moves with). Only
meaningful on a quiet machine: the run prints the load average it saw.

    python bench/extract.py --videos 96 400
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.jobs import QUIET_ENV, ClusterOptions

os.environ.update(QUIET_ENV)  # before Ray Data reads its log level: the tables, not its progress lines

from pipelines.compute import ClusterResources, plan_extraction, ray_connection, usable_cpus
from pipelines.extract_features import (
    add_decoding,
    add_encoding,
    add_extraction,
    add_writing,
    video_dataset,
)
from timerefine.data.storage import Storage, video_id_from_uri
from timerefine.data.synthetic import SynthConfig, generate_benchmark
from timerefine.decoder import DecodeSettings
from timerefine.encoders import ClipImageEncoder, ClipPreprocessing, resolve_encoder
from timerefine.video import BACKENDS, primary_decoder, sample_frames

REPO = Path(__file__).resolve().parents[1]
DECODE, ENCODE = "Ray decode stage alone (tasks)", "Ray encode stage alone (actors)"
PIPELINE, EXTRACT, LOOP = (
    "Ray Data pipeline (the job's dataset)",
    "timerefine extract, end to end",
    "plain loop, end to end",
)


@dataclass
class Measure:
    """One measurement's runs: wall seconds, steady videos/s, peak memory (bytes) where taken."""

    walls: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)  # CPU-seconds by role (``cpu_by_role``)

    def wall(self) -> float:
        return statistics.median(self.walls)

    def steady_rate(self) -> float | None:
        return statistics.median(self.steady) if self.steady else None

    def peak(self) -> int | None:
        return statistics.median(self.peaks) if self.peaks else None


# ---------------------------------------------------------------------------------------------------
# In process, one core


def _pin_to_one_core(core: int | None = None) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0)) if core is None else core})


def in_process_rates(
    paths: list[str], encoder_name: str | None, num_frames: int, batch_size: int, decoder: str, barrier=None
) -> dict:
    """Seconds per video of decoding and of encoding, one thread on one core (runs in a pinned child);
    with a ``barrier``, each phase starts when every core's child is ready for it."""
    import torch

    encoder = ClipImageEncoder(resolve_encoder(encoder_name), threads=1)
    torch.set_num_threads(1)
    preprocessing = encoder.preprocessing
    sample_frames(paths[0], num_frames, short_side=preprocessing.resize_short, backend=decoder)  # warm-up
    if barrier is not None:
        barrier.wait()
    started = time.perf_counter()
    decoded = [
        preprocessing.resize_and_crop(
            sample_frames(
                path, num_frames, short_side=preprocessing.resize_short, threads=1, backend=decoder
            ).frames
        )
        for path in paths
    ]
    decode_s = (time.perf_counter() - started) / len(paths)
    encoder.encode(decoded[0], batch_size)  # warm-up
    if barrier is not None:
        barrier.wait()
    started = time.perf_counter()
    for frames in decoded:
        encoder.encode(frames, batch_size)
    return {"decode_s": decode_s, "encode_s": (time.perf_counter() - started) / len(paths)}


def measure_in_process(
    paths: list[str], encoder: str | None, num_frames: int, batch_size: int, decoder: str
) -> dict:
    """The in-process rates of one core alone, and of every core at once (one pinned child a core, each
    phase started together): what the issue's ratios assume is the first times the cores; what the cores
    can do is the second, where they share caches, memory bandwidth and the processor's power budget."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_pin_to_one_core) as pool:
        alone = pool.submit(in_process_rates, paths, encoder, num_frames, batch_size, decoder).result()
    cores = sorted(os.sched_getaffinity(0))
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(len(cores))
        pools = [
            concurrent.futures.ProcessPoolExecutor(
                1, mp_context=context, initializer=_pin_to_one_core, initargs=(core,)
            )
            for core in cores
        ]
        try:
            jobs = [
                pool.submit(in_process_rates, paths, encoder, num_frames, batch_size, decoder, barrier)
                for pool in pools
            ]
            together = [job.result() for job in jobs]
        finally:
            for pool in pools:
                pool.shutdown()
    return alone | {
        "decode_s_together": statistics.mean(rates["decode_s"] for rates in together),
        "encode_s_together": statistics.mean(rates["encode_s"] for rates in together),
    }


# ---------------------------------------------------------------------------------------------------
# Ray stages, in this process's Ray


def settle(cpus: float, busy_below: float = 30.0, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Wait until the stage before has let go: every CPU free in Ray and the machine below ``busy_below``
    percent busy for ``quiet_s`` (at most ``limit_s``). A Ray Data stage's actors and blocks take about a
    second to go once its last output is in (both cores 98-100% busy, then 22% and less); measured in that
    tail, the decode stage after the encode stage took longer (docs/extraction-performance.md)."""
    import ray

    deadline = time.monotonic() + limit_s
    quiet_since = None
    while time.monotonic() < deadline:
        free = ray.available_resources().get("CPU", 0) >= cpus
        if free and psutil.cpu_percent(interval=0.25) < busy_below:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= quiet_s:
                return
        else:
            quiet_since = None
            time.sleep(0.05)


def stream(dataset, keep: list | None = None) -> tuple[float, float]:
    """Run ``dataset`` to its end: (wall seconds, steady videos/s between its 10% and 90% outputs)."""
    started = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    done = 0
    for bundle in dataset.iter_internal_ref_bundles():
        done += bundle.num_rows()
        arrivals.append((time.perf_counter(), done))
        if keep is not None:
            keep.extend(entry.ref for entry in bundle.blocks)
    wall = time.perf_counter() - started
    low = next(point for point in arrivals if point[1] >= 0.1 * done)
    high = [point for point in arrivals if low[1] < point[1] <= 0.9 * done] or [arrivals[-1]]
    span = high[-1][0] - low[0]
    # A window of a few near-simultaneous outputs (a handful of videos) says nothing: the whole run's rate.
    steady = (high[-1][1] - low[1]) / span if span > 0.1 * wall else done / wall
    return wall, steady


# What each kind of process on the machine is, for the CPU it used during a stage.
DECODERS, WORKERS, DRIVER, RAY_OWN, OTHER = (
    "decoder processes",
    "Ray task workers (frames to the object store)",
    "the driver (Ray Data's executor)",
    "Ray's own processes",
    "other processes",
)
# Ray Data's own actors (statistics, autoscaling, locations), counted with Ray's processes, not the stage's
_RAY_DATA_ACTORS = ("_StatsActor", "AutoscalingRequester", "AutoscalingCoordinator", "ActorLocation")
_RAY_PROCESSES = ("raylet", "gcs_server", "log_monitor", "monitor.py", "dashboard", "runtime_env")


def _role(process: psutil.Process) -> str:
    if process.pid == os.getpid():
        return DRIVER
    command = " ".join(process.cmdline())
    if "serve_decoding" in command:
        return DECODERS
    if command.startswith("ray::") or "default_worker.py" in command:
        return RAY_OWN if any(actor in command for actor in _RAY_DATA_ACTORS) else WORKERS
    return RAY_OWN if any(name in command for name in _RAY_PROCESSES) else OTHER


def cpu_by_role() -> dict[int, tuple[str, float]]:
    """Every process's role and CPU-seconds so far (user + system): two of these around a stage say where
    its cores went. A process that ends between the two is left out (the stages' processes outlive them)."""
    seen = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seen[process.pid] = (_role(process), times.user + times.system)
    return seen


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    used = dict.fromkeys((DECODERS, WORKERS, DRIVER, RAY_OWN, OTHER), 0.0)
    for pid, (role, seconds) in after.items():
        used[role] += seconds - before.get(pid, (role, 0.0))[1]
    return used


# ---------------------------------------------------------------------------------------------------
# Whole processes: timerefine extract and the plain loop


def peak_memory_of(process: subprocess.Popen, every_s: float = 0.5) -> tuple[float, int]:
    """Wait for ``process``; (wall seconds, peak PSS of it and all its descendants, bytes).

    Reading PSS walks every mapping of every process (/proc/PID/smaps): on 2 cores, sampling a job's
    thirty-odd processes twice a second cost it about 10 s of 45, so the wall time of a run whose memory
    is sampled is not one to compare (``measure`` times other runs)."""
    started = time.perf_counter()
    peak = 0
    root = psutil.Process(process.pid)
    while process.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for member in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += member.memory_full_info().pss
        peak = max(peak, total)
        time.sleep(every_s)
    wall = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"{process.args[:3]} exited with status {process.returncode}")
    return wall, peak


def run_extract(
    videos_dir: Path, encoder: str | None, num_frames: int, decoder: str, memory: bool = False
) -> tuple[float, int]:
    """(wall seconds, peak PSS bytes when ``memory``, else 0) of one ``timerefine extract`` run."""
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "timerefine.cli", "extract", "--input", str(videos_dir)]
        command += ["--output", output, "--num-frames", str(num_frames), "--decoder", decoder]
        command += ["--encoder", encoder] if encoder else []
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
        if memory:
            return peak_memory_of(process)
        started = time.perf_counter()
        if process.wait():
            raise RuntimeError(f"timerefine extract exited with status {process.returncode}")
        return time.perf_counter() - started, 0


def run_plain_loop(videos_dir: Path, encoder_dir: str) -> float:
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, str(REPO / "bench" / "plain_loop.py"), str(videos_dir), encoder_dir]
        command.append(str(Path(output) / "features.npz"))
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------


def benchmark_videos(data: Path, count: int, seed: int) -> Path:
    videos = data / f"videos-{count}" / "videos"
    if len(list(videos.glob("*.mp4"))) != count:
        generate_benchmark(videos.parent, SynthConfig(videos=count, seed=seed), progress=False)
    return videos


def machine() -> str:
    model = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {usable_cpus()} usable logical CPUs, {platform.system()} {platform.release()}"


@dataclass
class LoadWatch:
    """The 1-minute load average, sampled through the run."""

    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> LoadWatch:
        def watch() -> None:
            while not self._stop.wait(5):
                self.samples.append(os.getloadavg()[0])

        self.samples.append(os.getloadavg()[0])
        threading.Thread(target=watch, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()


def measure(count: int, args, encoder_ref, settings: DecodeSettings) -> tuple[dict, dict[str, Measure]]:
    videos_dir = benchmark_videos(args.data, count, args.seed)
    videos = {video_id_from_uri(str(path)): str(path) for path in sorted(videos_dir.glob("*.mp4"))}
    sample = list(videos.values())[:: max(1, len(videos) // 64)][:64]
    results: dict[str, Measure] = {name: Measure() for name in (DECODE, ENCODE, PIPELINE, EXTRACT, LOOP)}
    storage = Storage()
    in_process: list[dict] = []
    plan = ""
    for repeat in range(args.repeats):
        # The in-process rates right before this repeat's Ray stages, with no Ray running (an idle one
        # keeps 2-3% of two cores busy): each ratio is then of two measurements seconds apart, where this
        # machine's speed moves by a fifth from one minute to the next.
        in_process.append(
            measure_in_process(sample, args.encoder, args.num_frames, args.batch_size, args.decoder)
        )
        with ray_connection(ClusterOptions()):
            resources = ClusterResources.of_running_cluster()
            compute = plan_extraction(resources, args.encoders)
            plan = compute.describe()
            # The decode stage alone has every CPU, as decode nodes give it (this machine's plan fuses it).
            decoding = replace(compute, decode_parallelism=max(1, int(resources.cpus)))
            # A job's first dataset starts Ray Data's own actors, the workers' imports and their decoder
            # processes (5 CPU-seconds on 2 cores); a job past its first seconds has them, and the whole
            # job's time, start included, is timerefine extract's row.
            warm_up = dict(list(videos.items())[: 2 * int(resources.cpus)])
            stream(add_decoding(video_dataset(warm_up), storage, settings, decoding))
            settle(resources.cpus)
            before = cpu_by_role()
            # Each block let go as it arrives, as the encoders downstream let go of it: blocks kept for the
            # whole stage fill a fresh Ray's object store with pages never touched before (2 GB at 400
            # videos), whose page faults the task workers pay (22% of the cores in a first kept run, 6-8% on
            # pages already touched; docs/extraction-performance.md).
            wall, steady = stream(add_decoding(video_dataset(videos), storage, settings, decoding))
            results[DECODE].cpu.append(cpu_used(before, cpu_by_role()) | {"wall": wall})
            results[DECODE].walls.append(wall)
            results[DECODE].steady.append(steady)
            decoded: list = []  # the encode stage's input, decoded again and kept (not timed)
            settle(resources.cpus)
            stream(add_decoding(video_dataset(videos), storage, settings, decoding), decoded)
            stages = [ENCODE, PIPELINE] if repeat % 2 == 0 else [PIPELINE, ENCODE]
            for name in stages:
                settle(resources.cpus)
                if name == ENCODE:
                    import ray

                    predecoded = ray.data.from_arrow_refs(decoded)
                    dataset = add_encoding(predecoded, encoder_ref, settings, compute, args.batch_size)
                    wall, steady = stream(dataset)
                else:
                    with tempfile.TemporaryDirectory() as output:
                        features = add_extraction(
                            video_dataset(videos), storage, encoder_ref, settings, compute, args.batch_size
                        )
                        wall, steady = stream(add_writing(features, output, storage, compute, 4))
                results[name].walls.append(wall)
                results[name].steady.append(steady)
            del decoded
        # Whole processes, with no Ray of this process running beside them.
        first, second = (EXTRACT, LOOP) if repeat % 2 == 0 else (LOOP, EXTRACT)
        for name in (first, second):
            if name == EXTRACT:
                results[EXTRACT].walls.append(
                    run_extract(videos_dir, args.encoder, args.num_frames, args.decoder)[0]
                )
            else:
                results[LOOP].walls.append(run_plain_loop(videos_dir, encoder_ref.path or encoder_ref.name))

    results[EXTRACT].peaks.append(
        run_extract(videos_dir, args.encoder, args.num_frames, args.decoder, memory=True)[1]
    )
    rates = {key: statistics.median(run[key] for run in in_process) for key in in_process[0]}
    rates["plan"] = plan
    rates["repeats"] = in_process
    return rates, results


def work_bound(rates: dict, cores: int, suffix: str = "") -> float:
    """Videos/s the cores could do with no overhead: cores / (decode s + encode s per video); ``suffix``
    "_together" takes the rates of every core at once."""
    return cores / (rates["decode_s" + suffix] + rates["encode_s" + suffix])


def repeat_ratios(results: dict[str, Measure], run: dict, repeat: int, cores: int, count: int) -> dict:
    """The issue's ratios in one repeat: its Ray runs against the in-process rates ``run`` measured
    seconds before them (where the machine was as fast as it then was)."""
    bound, bound_together = work_bound(run, cores), work_bound(run, cores, "_together")
    decode, encode = results[DECODE].steady[repeat], results[ENCODE].steady[repeat]
    pipeline = results[PIPELINE].steady[repeat]
    return {
        "decode": decode * run["decode_s"] / cores,
        "encode": encode * run["encode_s"] / cores,
        "pipeline": pipeline / bound,
        "pipeline_wall": count / results[PIPELINE].walls[repeat] / bound,
        "extract": results[LOOP].walls[repeat] / results[EXTRACT].walls[repeat],
        "decode_together": decode * run["decode_s_together"] / cores,
        "encode_together": encode * run["encode_s_together"] / cores,
        "pipeline_together": pipeline / bound_together,
    }


def decode_stage_cores(rates: dict, decode: Measure, cores: int, count: int) -> str:
    """Where the decode stage's cores went, medians of the repeats: each role's share of cores x wall, and
    the stage's ceiling that follows, the decoders' share x (in-process s a video / their CPU s a video):
    what the decode ratio would be if the stage's own processes took no time of the decoders' cores."""
    roles = (DECODERS, WORKERS, DRIVER, RAY_OWN, OTHER)
    shares: dict[str, list[float]] = {role: [] for role in (*roles, "idle")}
    decoder_ms, in_process_ms, ceilings = [], [], []
    for run, used in zip(rates["repeats"], decode.cpu, strict=True):
        available = cores * used["wall"]
        for role in roles:
            shares[role].append(used[role] / available)
        shares["idle"].append(1 - sum(used[role] for role in roles) / available)
        decoder_ms.append(1000 * used[DECODERS] / count)
        in_process_ms.append(1000 * run["decode_s"])
        ceilings.append(shares[DECODERS][-1] * in_process_ms[-1] / decoder_ms[-1])
    where = ", ".join(f"{role} {statistics.median(values):.0%}" for role, values in shares.items())
    decoder, in_process = statistics.median(decoder_ms), statistics.median(in_process_ms)
    return (
        f"- the decode stage's cores: {where}; the decoders' CPU a video {decoder:.1f} ms (in process, "
        f"one core: {in_process:.1f} ms), so at most {statistics.median(ceilings):.0%} of the in-process "
        "rate while the rest takes what it does"
    )


def report(count: int, frames: int, rates: dict, results: dict[str, Measure], cores: int) -> dict:
    decode_rate, encode_rate = 1 / rates["decode_s"], 1 / rates["encode_s"]
    bound, bound_together = work_bound(rates, cores), work_bound(rates, cores, "_together")
    decode_together, encode_together = 1 / rates["decode_s_together"], 1 / rates["encode_s_together"]
    print(f"\n### {count} videos ({frames} frames each)\n")
    print(f"Ray plan: {rates['plan']}\n")
    print("| measurement | wall s (median) | videos/s | frames/s | steady frames/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| in process, 1 core: decode | | {decode_rate:.2f} | {decode_rate * frames:.0f} | |")
    print(f"| in process, 1 core: encode | | {encode_rate:.2f} | {encode_rate * frames:.0f} | |")
    print(f"| work bound: {cores} cores / (decode s + encode s) | | {bound:.2f} | {bound * frames:.0f} | |")
    for stage, rate in (("decode", decode_together), ("encode", encode_together)):
        print(
            f"| in process, {cores} cores at once: {stage}, per core | | {rate:.2f} | {rate * frames:.0f} | |"
        )
    print(f"| work bound, cores at once | | {bound_together:.2f} | {bound_together * frames:.0f} | |")
    for name in (DECODE, ENCODE, PIPELINE, EXTRACT, LOOP):
        measured = results[name]
        rate = count / measured.wall()
        steady = measured.steady_rate()
        steady_cell = f"{steady * frames:.0f}" if steady else ""
        print(f"| {name} | {measured.wall():.1f} | {rate:.2f} | {rate * frames:.0f} | {steady_cell} |")
    each = [repeat_ratios(results, run, repeat, cores, count) for repeat, run in enumerate(rates["repeats"])]
    ratios = {name: statistics.median(one[name] for one in each) for name in each[0]}
    target = 0.75 if count < 400 else 0.9
    print(
        f"\n- Ray decode stage / (in-process decode x {cores} cores): {ratios['decode']:.0%} (target >= 80%)"
    )
    print(f"- Ray encode stage / (in-process encode x {cores} cores): {ratios['encode']:.0%} (target >= 85%)")
    print(
        f"- pipeline / work bound: {ratios['pipeline']:.0%} steady, {ratios['pipeline_wall']:.0%} over its "
        "whole wall time, its actors' start included (target >= 75%)"
    )
    print(f"- timerefine extract / plain loop, end to end: {ratios['extract']:.2f}x (target >= {target}x)")
    print(
        f"- against what the cores do at once: decode stage {ratios['decode_together']:.0%}, encode stage "
        f"{ratios['encode_together']:.0%}, pipeline {ratios['pipeline_together']:.0%} steady"
    )
    shown = {"decode stage": ("decode", "{:.0%}"), "encode stage": ("encode", "{:.0%}")}
    shown |= {"pipeline": ("pipeline", "{:.0%}"), "extract": ("extract", "{:.2f}x")}
    per_repeat = (
        f"{label} " + " / ".join(form.format(one[key]) for one in each)
        for label, (key, form) in shown.items()
    )
    print("- each repeat's: " + ", ".join(per_repeat))
    print(decode_stage_cores(rates, results[DECODE], cores, count))
    peak = results[EXTRACT].peak()
    print(f"- peak memory of timerefine extract (PSS, process tree): {peak / 2**20:.0f} MiB")
    return {"peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[96], help="video counts, one table each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "timerefine-bench-extract")
    parser.add_argument("--num-frames", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encoders", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each, in alternating order; median kept"
    )
    parser.add_argument("--encoder", help="what extract --encoder takes (default: the built-in small one)")
    parser.add_argument(
        "--decoder", choices=BACKENDS, default="auto", help="what extract --decoder takes, in process too"
    )
    args = parser.parse_args()

    encoder_ref = resolve_encoder(args.encoder)
    preprocessing = ClipPreprocessing.from_pretrained(*encoder_ref.pretrained_source())
    settings = DecodeSettings.for_encoder(preprocessing, num_frames=args.num_frames, decoder=args.decoder)
    cores = usable_cpus()
    peaks = {}
    with LoadWatch() as load:
        measured = [(count, *measure(count, args, encoder_ref, settings)) for count in args.videos]
    print(f"Machine: {machine()}; 1-minute load average {min(load.samples):.2f}-{max(load.samples):.2f}")
    print(
        f"Encoder: {encoder_ref.identity}; decoder: {primary_decoder(args.decoder)} "
        f"(the plain loop's: decord); median of {args.repeats} runs each"
    )
    for count, rates, results in measured:
        peaks[count] = report(count, args.num_frames, rates, results, cores)["peak"]
    if len(peaks) > 1:
        low, high = min(peaks), max(peaks)
        print(f"\nPeak memory, {high} vs {low} videos: {peaks[high] / peaks[low]:.2f}x (target: within 20%)")


if __name__ == "__main__":
    main()
