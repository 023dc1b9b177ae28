"""Feature extraction on Ray Data: a video folder, S3 prefix or list of URIs into a CLIP feature table.

Two doors, one job: ``timerefine extract ...`` and
``ray job submit --working-dir . -- python pipelines/extract_features.py ...``.

The stream: list (driver) -> decode (CPU tasks of many videos, each decoded in a child process with a
timeout) -> encode (actor pool, the encoder loaded once per actor) -> write (a Parquet part a batch of
videos) -> the driver, which counts what was written and prints progress. Videos already in the output
are skipped; failed ones are retried with ``--retry-errors`` (their error rows are removed first, so that
every reader sees one row a video). The driver holds the output's writer lock (``timerefine.data.lock``)
while it writes: a second job into the same output is refused, naming the first. The stages are library
functions (``timerefine.decoder``, ``timerefine.encoders``, ``timerefine.features``); resources are chosen
in ``pipelines.compute``; this file wires them, and holds the Arrow batches that cross Ray's object store.

Exit status: 0 when at least one video is in the table, 1 when nothing succeeded, 2 when the input or
output cannot be used (storage errors, a table written with another encoder) or the pipeline failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if not __package__:  # `python pipelines/extract_features.py` (ray job submit): run it inside its package
    import _script  # noqa: F401

import numpy as np
import pyarrow as pa

from timerefine.data.lock import OutputLock
from timerefine.data.storage import VIDEO_EXTENSIONS, Storage, StorageError, VideoListing, video_id_from_uri
from timerefine.decoder import DecodedVideo, DecodeSettings, IsolatedDecoder, decode_video, shared_decoder
from timerefine.encoders import ClipImageEncoder, ClipPreprocessing, EncoderRef, resolve_encoder
from timerefine.features import (
    STATUS_ERROR,
    STATUS_OK,
    CommittedRows,
    committed_rows,
    feature_rows_to_table,
    remove_rows,
    write_feature_part,
)
from timerefine.video import BACKENDS, primary_decoder

from . import jobs
from .compute import DECODE_BLOCK_BYTES, ClusterResources, ExtractionCompute, plan_extraction, ray_connection

if TYPE_CHECKING:
    from ray.data import Dataset

NAME = "extract"
logger = logging.getLogger("timerefine.extract")

# What crosses Ray's object store between decoding and encoding. Frames travel as raw bytes, not as a
# tensor column: an error row has no frames, and a tensor column cannot hold a missing tensor.
DECODED_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("frame_times_s", pa.list_(pa.float32())),
        ("decoder", pa.string()),
        ("frames", pa.large_binary()),  # (T, crop, crop, 3) uint8, C order; empty for errors
    ]
)

# What the driver reads back from the write stage: enough for progress, resume and the summary.
WRITTEN_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("part", pa.string())]
)


@dataclass
class ExtractConfig:
    input: str  # video folder, s3:// prefix, or text file of URIs
    output: str  # feature table folder or s3://bucket/prefix
    encoder: str | None = None  # CLIP hub id or local dir (None: the built-in random-weight CLIP)
    num_frames: int = 100  # frames sampled per video
    batch_size: int = 256  # frames per encoder forward pass
    encoders: int | None = None  # encoder actors (default: per GPU or CPU)
    gpus_per_encoder: float | None = None  # 0 forces CPU encoders
    retry_errors: bool = False  # retry videos that failed before
    decode_timeout: float = 120.0  # seconds per video
    decode_memory_mb: int = 4096  # decoder memory cap per video
    decoder: str = "auto"  # auto (decord, PyAV for files decord cannot read), decord or pyav
    videos_per_file: int = 64  # videos per Parquet part file
    progress_every: int = 50  # print a progress line per N videos
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)

    def __post_init__(self) -> None:
        for name in ("num_frames", "batch_size", "videos_per_file", "progress_every", "decode_memory_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.decode_timeout > 0:
            raise ValueError(
                f"--decode-timeout must be a positive number of seconds, got {self.decode_timeout}"
            )
        if self.decoder not in BACKENDS:
            raise ValueError(f"--decoder must be one of {', '.join(BACKENDS)}, got {self.decoder!r}")


@dataclass
class ExtractResult:
    """What the table holds for the listed videos after this run."""

    output: str
    ok: int  # videos with features (extracted now or before)
    failed: int  # videos with an error row
    extracted_now: int
    failures: list[tuple[str, str]]  # (video_id, reason) of this run's failures
    frames_per_s: float
    skipped_inputs: int = 0  # entries under the input that are not videos (named in the summary)

    @property
    def exit_code(self) -> int:
        return jobs.EXIT_OK if self.ok else jobs.EXIT_INCOMPLETE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="video folder, s3:// prefix, or text file of URIs")
    parser.add_argument("--output", required=True, help="feature table folder or s3://bucket/prefix")
    parser.add_argument("--encoder", default=None, help="CLIP hub id or local dir (default: built-in)")
    parser.add_argument("--num-frames", type=int, default=100, help="frames sampled per video")
    parser.add_argument("--batch-size", type=int, default=256, help="frames per encoder forward pass")
    parser.add_argument("--encoders", type=int, default=None, help="encoder actors (default: per GPU or CPU)")
    parser.add_argument("--gpus-per-encoder", type=float, default=None, help="0 forces CPU encoders")
    parser.add_argument("--retry-errors", action="store_true", help="retry videos that failed before")
    parser.add_argument("--decode-timeout", type=float, default=120.0, help="seconds per video")
    parser.add_argument("--decode-memory-mb", type=int, default=4096, help="decoder memory cap per video")
    parser.add_argument(
        "--decoder",
        choices=BACKENDS,
        default="auto",
        help="auto: decord, and PyAV for files decord cannot read (PyAV alone where decord is not installed)",
    )
    parser.add_argument("--videos-per-file", type=int, default=64, help="videos per Parquet part file")
    parser.add_argument("--progress-every", type=int, default=50, help="print a progress line per N videos")
    jobs.add_cluster_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    cluster = jobs.cluster_from_args(args)
    storage = cluster.storage()
    return ExtractConfig(
        input=storage.canonical(args.input),
        output=storage.canonical(args.output),
        encoder=args.encoder,
        num_frames=args.num_frames,
        batch_size=args.batch_size,
        encoders=args.encoders,
        gpus_per_encoder=args.gpus_per_encoder,
        retry_errors=args.retry_errors,
        decode_timeout=args.decode_timeout,
        decode_memory_mb=args.decode_memory_mb,
        decoder=args.decoder,
        videos_per_file=args.videos_per_file,
        progress_every=args.progress_every,
        cluster=cluster,
    )


@dataclass
class Progress:
    """Counts written videos and prints a line per ``every`` videos with throughput and ETA."""

    total: int
    every: int
    num_frames: int
    started: float = field(default_factory=time.monotonic)
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    _next_report: int = 0

    def __post_init__(self) -> None:
        self._next_report = self.every

    @property
    def done(self) -> int:
        return self.counts[STATUS_OK] + self.counts[STATUS_ERROR]

    def update(self, written: pa.Table) -> None:
        for row in written.to_pylist():
            self.counts[row["status"]] += 1
            if row["status"] == STATUS_ERROR:
                self.failures.append((row["video_id"], row["error"]))
        if self.done >= self._next_report or self.done == self.total:
            self._next_report = (self.done // self.every + 1) * self.every
            elapsed = time.monotonic() - self.started
            rate = self.done / elapsed if elapsed else 0.0
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(
                f"[extract] {self.done}/{self.total} videos ({self.counts[STATUS_OK]} ok, "
                f"{self.counts[STATUS_ERROR]} failed), {rate:.2f} videos/s, "
                f"{self.frames_per_s():.0f} frames/s, ETA {_duration(eta)}",
                flush=True,
            )

    def frames_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.counts[STATUS_OK] * self.num_frames / elapsed if elapsed else 0.0


@dataclass
class WorkPlan:
    """What a run does, decided from the input's videos and the rows the output already holds."""

    todo: dict[str, str]  # video_id -> URI, to extract now
    done_before: Counter  # status -> videos left as they are
    removals: dict[str, set[str]]  # part URI -> videos whose row there goes first (retried or doubled)

    @property
    def writes(self) -> bool:
        return bool(self.todo or self.removals)


def plan_work(videos: dict[str, str], committed: CommittedRows, retry_errors: bool) -> WorkPlan:
    """Videos without a row, and with ``retry_errors`` those with an error row, are extracted; the error
    rows of retried videos and any row beyond one a video are removed before anything is written."""
    statuses = committed.status_by_video()
    retry = {STATUS_ERROR} if retry_errors else set()
    todo = {
        video_id: uri
        for video_id, uri in videos.items()
        if video_id not in statuses or statuses[video_id] in retry
    }
    done_before = Counter(statuses[video_id] for video_id in videos if video_id not in todo)
    removals = committed.extra_rows()
    for part, video_ids in committed.rows_of(set(todo)).items():
        removals.setdefault(part, set()).update(video_ids)
    return WorkPlan(todo, done_before, removals)


def run(config: ExtractConfig) -> ExtractResult:
    """Run the extraction; raises ``jobs.JobError`` when the input or output cannot be used or the pipeline
    failed (what it wrote stays: a rerun resumes)."""
    storage = config.cluster.storage()
    encoder = resolve_encoder(config.encoder)
    preprocessing = ClipPreprocessing.from_pretrained(*encoder.pretrained_source())
    listing = storage.list_videos(config.input)
    videos = _video_ids(config.input, listing)
    committed = committed_rows(config.output, storage)
    _check_same_extraction(config, committed.metadata, encoder)
    plan = plan_work(videos, committed, config.retry_errors)
    progress = Progress(total=0, every=config.progress_every, num_frames=config.num_frames)
    if not plan.writes and not _tolerating(lambda: len(storage.incomplete_writes(config.output))):
        _print_plan(config, listing, videos, plan)
    else:
        with OutputLock(config.output, storage):
            # Read again, now that no other writer can change the output: a run that held it until a
            # moment ago may have written rows since.
            plan = plan_work(videos, committed_rows(config.output, storage), config.retry_errors)
            _tidy_output(config.output, storage, plan)
            _print_plan(config, listing, videos, plan)
            progress.total = len(plan.todo)
            if plan.todo:
                settings = DecodeSettings.for_encoder(
                    preprocessing,
                    num_frames=config.num_frames,
                    timeout_s=config.decode_timeout,
                    memory_limit_mb=config.decode_memory_mb,
                    decoder=config.decoder,
                )
                try:
                    _extract(plan.todo, config, storage, encoder, settings, progress)
                except Exception as error:  # a failed Ray job: what is written stays, a rerun resumes
                    logger.exception("extraction failed")
                    raise jobs.JobError(f"the pipeline failed ({error}); rerun to resume") from error
                finally:  # uploads of write tasks that Ray killed and retried
                    _tolerating(lambda: storage.abort_incomplete_writes(config.output))

    skipped = plan.done_before
    _print_summary(progress, skipped, config)
    missing = len(plan.todo) - progress.done
    if missing:
        raise jobs.JobError(f"{missing} videos produced no row; rerun to extract them")
    return ExtractResult(
        output=config.output,
        ok=progress.counts[STATUS_OK] + skipped[STATUS_OK],
        failed=progress.counts[STATUS_ERROR] + skipped[STATUS_ERROR],
        extracted_now=progress.counts[STATUS_OK],
        failures=list(progress.failures),
        frames_per_s=progress.frames_per_s(),
        skipped_inputs=len(listing.skipped),
    )


def _tolerating(cleanup: Callable[[], int]) -> int:
    """Run a look for, or clean-up of, killed writers' leftovers; a failure is a warning, not the job's end:
    many S3 policies do not grant listing multipart uploads, and a bucket lifecycle rule
    (AbortIncompleteMultipartUpload) reclaims them anyway."""
    try:
        return cleanup()
    except StorageError as error:
        logger.warning("%s; uploads left by killed writers may remain", error)
        return 0


def _tidy_output(output: str, storage: Storage, plan: WorkPlan) -> None:
    """Before writing: remove what killed writers left, the rows to be replaced, and doubled rows."""
    aborted = _tolerating(lambda: storage.abort_incomplete_writes(output))
    if aborted:
        print(f"[extract] removed {aborted} incomplete upload(s) left by an interrupted run", flush=True)
    removed = remove_rows(plan.removals, storage)
    retried = sum(len(ids & plan.todo.keys()) for ids in plan.removals.values())
    if removed > retried:
        print(f"[extract] removed {removed - retried} doubled row(s): now one row a video", flush=True)


# ---------------------------------------------------------------------------------------------------
# The Ray wiring (also used by bench/extract.py to time each stage alone)


class EncodeStage:
    """The encoder actor: loads the encoder once, then turns decoded videos into feature rows."""

    def __init__(
        self, encoder: EncoderRef, threads: int | None, num_frames: int, batch_size: int, decoder: str
    ) -> None:
        self.encoder = ClipImageEncoder(encoder, threads=threads)
        self.num_frames = num_frames
        self.batch_size = batch_size
        self.table_decoder = decoder

    def __call__(self, decoded: pa.Table) -> pa.Table:
        videos, frames = decoded_videos(decoded, self.encoder.preprocessing.crop_size, self.num_frames)
        return encode_videos(
            self.encoder, videos, frames, self.num_frames, self.batch_size, self.table_decoder
        )


class ExtractStage:
    """Decoding and encoding in one actor, for encoders on CPUs: no frames cross the object store.

    Each actor keeps its own isolated decoder process (started first, so that its imports overlap the
    encoder's) and decodes a video while its encoder waits, then encodes it while the decoder waits: one
    actor a core keeps every core busy without the frames ever leaving the actor's memory.
    """

    def __init__(
        self,
        encoder: EncoderRef,
        threads: int | None,
        settings: DecodeSettings,
        batch_size: int,
        storage: Storage,
    ) -> None:
        self.decoder = IsolatedDecoder(settings)
        self.decoder.start()
        self.encoder = ClipImageEncoder(encoder, threads=threads)
        self.num_frames = settings.num_frames
        self.batch_size = batch_size
        self.storage = storage
        self.table_decoder = primary_decoder(settings.decoder)

    def __call__(self, videos: pa.Table) -> pa.Table:
        decoded, frames = decode_videos(videos, self.storage, self.decoder)
        return encode_videos(
            self.encoder, decoded, frames, self.num_frames, self.batch_size, self.table_decoder
        )


def decode_stage(
    videos: pa.Table, storage: Storage, settings: DecodeSettings, videos_per_block: int
) -> Iterator[pa.Table]:
    """A task's videos, decoded and handed on ``videos_per_block`` at a time: the task lasts seconds, so the
    idle moment between two tasks is rare, and holds no more than a block's frames while it runs."""
    decoder = shared_decoder(settings)  # one decoder process per Ray worker, reused across tasks
    for start in range(0, videos.num_rows, videos_per_block):
        yield decoded_table(*decode_videos(videos.slice(start, videos_per_block), storage, decoder))


def decode_videos(
    videos: pa.Table, storage: Storage, decoder: IsolatedDecoder
) -> tuple[list[DecodedVideo], np.ndarray]:
    """The rows (``video_id``, ``uri``) of a batch of videos, decoded one after another, and the frames
    of the ok ones, in order, in one (videos x num_frames, crop, crop, 3) array. Each video is decoded
    straight into its place there (its ``frames`` a view of it): joining them afterwards copied every
    frame a second time, 1.4 ms of a 128 px video's 55 ms in a decode task."""
    settings = decoder.settings
    crop = settings.crop_size
    frames = np.empty((videos.num_rows, settings.num_frames, crop, crop, 3), dtype=np.uint8)
    decoded: list[DecodedVideo] = []
    ok = 0
    for video_id, uri in zip(videos["video_id"].to_pylist(), videos["uri"].to_pylist(), strict=True):
        video = decode_video(video_id, uri, storage, decoder, out=frames[ok])
        decoded.append(video)
        ok += video.ok
    return decoded, frames[:ok].reshape(-1, crop, crop, 3)


def decoded_table(videos: list[DecodedVideo], frames: np.ndarray) -> pa.Table:
    """Decoded videos as a ``DECODED_SCHEMA`` table; ``frames``, the ok videos' frames in order in one
    contiguous array, becomes the bytes of their rows without a copy."""
    data = pa.py_buffer(np.ascontiguousarray(frames).reshape(-1))
    sizes = [video.frames.nbytes if video.ok else 0 for video in videos]
    offsets = pa.py_buffer(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    columns = {
        "video_id": [video.video_id for video in videos],
        "uri": [video.uri for video in videos],
        "status": [STATUS_OK if video.ok else STATUS_ERROR for video in videos],
        "error": [video.error for video in videos],
        "duration_s": [video.duration_s for video in videos],
        "fps": [video.fps for video in videos],
        "num_frames": [video.num_frames for video in videos],
        "frame_times_s": [video.frame_times_s for video in videos],
        "decoder": [video.decoder for video in videos],
        "frames": pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(videos), [None, offsets, data]),
    }
    return pa.table(columns, schema=DECODED_SCHEMA)


def decoded_videos(
    table: pa.Table, crop: int, num_frames: int
) -> tuple[list[DecodedVideo], np.ndarray | None]:
    """A ``DECODED_SCHEMA`` table back as videos (without frames) and the frames of its ok videos, in
    order, as one (videos x num_frames, crop, crop, 3) array read from the table's buffer without a copy."""
    columns = table.drop_columns(["frames"]).to_pydict()
    videos = [
        DecodedVideo(
            video_id=columns["video_id"][index],
            uri=columns["uri"][index],
            error=None if columns["status"][index] == STATUS_OK else columns["error"][index],
            duration_s=columns["duration_s"][index],
            fps=columns["fps"][index],
            num_frames=columns["num_frames"][index],
            frame_times_s=columns["frame_times_s"][index],
            decoder=columns["decoder"][index],
        )
        for index in range(table.num_rows)
    ]
    if not any(video.ok for video in videos):
        return videos, None
    column = table.column("frames")
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # combining copies
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    frames = np.frombuffer(array.buffers()[2], dtype=np.uint8, count=end - start, offset=start)
    return videos, frames.reshape(-1, crop, crop, 3)


def encode_videos(
    encoder: ClipImageEncoder,
    videos: list[DecodedVideo],
    frames: np.ndarray | None,
    num_frames: int,
    batch_size: int,
    decoder: str,
) -> pa.Table:
    """Decoded videos -> rows of the feature table; ``frames`` holds the ok videos' frames, in order, and
    ``decoder`` is the extraction's (``timerefine.video.primary_decoder``).

    The frames of all ok videos go through the encoder together, ``batch_size`` at a time; error videos
    pass through without features. If encoding fails, every ok video becomes an error row with the reason.
    """
    rows = [
        {
            "video_id": video.video_id,
            "uri": video.uri,
            "duration_s": video.duration_s,
            "fps": video.fps,
            "num_frames": video.num_frames,
            "frame_times_s": video.frame_times_s,
            "status": STATUS_OK if video.ok else STATUS_ERROR,
            "error": video.error,
            "decoder": video.decoder,
        }
        for video in videos
    ]
    ok = [row for row in rows if row["status"] == STATUS_OK]
    features: dict[str, np.ndarray] = {}
    if ok:
        try:
            embeds = encoder.encode(frames, batch_size=batch_size).reshape(len(ok), num_frames, encoder.dim)
            features = {row["video_id"]: embeds[index] for index, row in enumerate(ok)}
        except Exception as error:  # e.g. GPU out of memory: the batch's videos stay retryable error rows
            logger.exception("encoding %d videos failed", len(ok))
            reason = f"encoding failed: {type(error).__name__}: {error}"
            for row in ok:
                row.update(status=STATUS_ERROR, error=reason, decoder=None)
    return feature_rows_to_table(rows, features, num_frames, encoder.dim, encoder.identity, decoder)


def write_stage(features: pa.Table, output: str, storage: Storage) -> pa.Table:
    part = write_feature_part(features, output, storage)
    summary = features.select(["video_id", "status", "error"])
    return summary.append_column("part", pa.array([part] * len(summary), pa.string())).cast(WRITTEN_SCHEMA)


def video_dataset(todo: dict[str, str]) -> Dataset:
    """One block a video: the decode tasks and the actors take them a few at a time. The stages after it
    make blocks under twice ``DECODE_BLOCK_BYTES``: Ray Data joins a task's outputs until they pass it."""
    import ray

    items = [{"video_id": video_id, "uri": uri} for video_id, uri in todo.items()]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset.context.target_max_block_size = DECODE_BLOCK_BYTES  # this dataset's and those made from it
    return dataset


def add_decoding(
    videos: Dataset, storage: Storage, settings: DecodeSettings, compute: ExtractionCompute
) -> Dataset:
    return videos.map_batches(
        decode_stage,
        batch_size=compute.videos_per_decode_task(videos.count()),
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs={
            "storage": storage,
            "settings": settings,
            "videos_per_block": compute.videos_per_decode_block(settings.frame_bytes),
        },
        **compute.decode_args(),
    )


def _videos_per_call(settings: DecodeSettings, batch_size: int) -> int:
    """Each actor call takes as many whole videos as fit in ``batch_size`` frames (at least one)."""
    return max(1, batch_size // settings.num_frames)


def add_encoding(
    decoded: Dataset,
    encoder: EncoderRef,
    settings: DecodeSettings,
    compute: ExtractionCompute,
    batch_size: int,
) -> Dataset:
    return decoded.map_batches(
        EncodeStage,
        batch_size=_videos_per_call(settings, batch_size),
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_constructor_kwargs={
            "encoder": encoder,
            "threads": compute.encoder_threads,
            "num_frames": settings.num_frames,
            "batch_size": batch_size,
            "decoder": primary_decoder(settings.decoder),
        },
        **compute.encode_args(),
    )


def add_extraction(
    videos: Dataset,
    storage: Storage,
    encoder: EncoderRef,
    settings: DecodeSettings,
    compute: ExtractionCompute,
    batch_size: int,
) -> Dataset:
    """Videos -> feature rows: decode tasks feeding encoder actors, or both in one actor where the
    encoders run on CPUs (``compute.fused``)."""
    if not compute.fused:
        return add_encoding(
            add_decoding(videos, storage, settings, compute), encoder, settings, compute, batch_size
        )
    return videos.map_batches(
        ExtractStage,
        batch_size=_videos_per_call(settings, batch_size),
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_constructor_kwargs={
            "encoder": encoder,
            "threads": compute.encoder_threads,
            "settings": settings,
            "batch_size": batch_size,
            "storage": storage,
        },
        **compute.encode_args(),
    )


def add_writing(
    features: Dataset,
    output: str,
    storage: Storage,
    compute: ExtractionCompute,
    videos_per_file: int,
) -> Dataset:
    return features.map_batches(
        write_stage,
        batch_size=videos_per_file,
        batch_format="pyarrow",
        fn_kwargs={"output": output, "storage": storage},
        **compute.write_args(),
    )


def _extract(
    todo: dict[str, str],
    config: ExtractConfig,
    storage: Storage,
    encoder: EncoderRef,
    settings: DecodeSettings,
    progress: Progress,
) -> None:
    with ray_connection(config.cluster):
        compute = plan_extraction(
            ClusterResources.of_running_cluster(), config.encoders, config.gpus_per_encoder
        )
        print(f"[extract] {compute.describe()}", flush=True)
        features = add_extraction(video_dataset(todo), storage, encoder, settings, compute, config.batch_size)
        written = add_writing(features, config.output, storage, compute, config.videos_per_file)
        for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.update(batch)


# ---------------------------------------------------------------------------------------------------
# Driver-side checks and reports


def _video_ids(input_uri: str, listing: VideoListing) -> dict[str, str]:
    """video_id -> URI; two files with one id would overwrite each other's row, so they are an error."""
    videos: dict[str, str] = {}
    for uri in listing.videos:
        video_id = video_id_from_uri(uri)
        if video_id in videos:
            raise ValueError(
                f"{input_uri}: two videos share the id {video_id!r} ({videos[video_id]} and {uri}); "
                "video ids are file names without extension and must be unique: rename one of them"
            )
        videos[video_id] = uri
    if not videos:
        skipped = f" ({listing.summary()})" if listing.skipped else ""
        raise ValueError(
            f"{input_uri}: no videos found{skipped}; video files end in {' '.join(VIDEO_EXTENSIONS)}"
        )
    return videos


def _print_plan(config: ExtractConfig, listing: VideoListing, videos: dict[str, str], plan: WorkPlan) -> None:
    skipped = f" ({listing.summary()})" if listing.skipped else ""
    failed_before = plan.done_before[STATUS_ERROR]
    print(
        f"[extract] {len(videos)} videos in {config.input}{skipped}: {len(plan.todo)} to extract, "
        f"{plan.done_before[STATUS_OK]} already done, {failed_before} failed before"
        + (" (--retry-errors retries them)" if failed_before else ""),
        flush=True,
    )
    for uri, kind in listing.suspicious[:20]:
        print(f"[extract]   skipped {uri}: {kind}", flush=True)
    if len(listing.suspicious) > 20:
        print(f"[extract]   ... and {len(listing.suspicious) - 20} more named like videos", flush=True)


def _check_same_extraction(config: ExtractConfig, metadata: dict | None, encoder: EncoderRef) -> None:
    """Resuming into a table made with another encoder, frame count or decoder would mix features that
    differ for the same video (tables from before the decoder was recorded are not checked for it)."""
    if metadata is None:
        return
    if metadata["encoder"] != encoder.identity or metadata["num_frames"] != config.num_frames:
        raise ValueError(
            f"{config.output} holds features of {metadata['encoder']} with {metadata['num_frames']} frames "
            f"a video; this run asks for {encoder.identity} with {config.num_frames}. Write to another output"
        )
    decoder = primary_decoder(config.decoder)
    if metadata.get("decoder", decoder) != decoder:
        raise ValueError(
            f"{config.output} holds frames decoded by {metadata['decoder']}; this run would decode with "
            f"{decoder} (--decoder {config.decoder}), whose frames differ slightly. "
            f"Pass --decoder {metadata['decoder']} to resume, or write to another output"
        )


def _print_summary(progress: Progress, skipped: Counter, config: ExtractConfig) -> None:
    elapsed = time.monotonic() - progress.started
    print(
        f"[extract] done in {_duration(elapsed)}: {progress.counts[STATUS_OK]} ok, "
        f"{progress.counts[STATUS_ERROR]} failed, {sum(skipped.values())} skipped "
        f"({skipped[STATUS_OK]} already ok, {skipped[STATUS_ERROR]} failed before); "
        f"{progress.frames_per_s():.0f} frames/s. Table: {config.output}",
        flush=True,
    )
    for video_id, reason in progress.failures[:20]:
        print(f"[extract]   failed {video_id}: {reason}", flush=True)
    if len(progress.failures) > 20:
        print(f"[extract]   ... and {len(progress.failures) - 20} more (status = 'error' rows)", flush=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
