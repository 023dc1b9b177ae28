"""CLIP feature tables: the extraction stages that fill them and the readers that load them.

A feature table is a folder (local or ``s3://``) of Parquet files, one row a video, with the schema of
DESIGN.md section 3 (``feature_schema``). Plain pyarrow and pandas read it; no Ray types are stored.

The extraction stages are plain functions, so they run and are tested without Ray; the Ray job only
wires them (pipelines/extract_features.py):

1. ``decode_video`` (a CPU task a video): sample frames, resize and crop them for the encoder, inside
   a child process (``IsolatedDecoder``) so that a decoder crash, hang or memory blow-up costs one
   video, which becomes an error row;
2. ``encode_videos`` (an actor holding the encoder): frames -> features, in the table's schema;
3. ``write_feature_part`` (a task): one Parquet file per batch of videos, named by a hash of their ids,
   written atomically, so a retried write replaces the same file and readers never see half a file.

Resuming reads which videos are done (``committed_statuses``); ``read_feature_table`` keeps one row per
video, an ok row over an error row from an earlier attempt.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from timerefine.data.storage import Storage, StorageError
from timerefine.encoders import ClipImageEncoder, ClipPreprocessing
from timerefine.video import SampledFrames, VideoDecodeError, VideoInfo, sample_frames

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = b"timerefine.features"
PART_SUFFIX = ".parquet"
STATUS_OK = "ok"
STATUS_ERROR = "error"

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
        ("frames", pa.large_binary()),  # (T, crop, crop, 3) uint8, C order; empty for errors
    ]
)

# What the driver reads back from the write stage: enough for progress, resume and the summary.
WRITTEN_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("part", pa.string())]
)


def feature_schema(num_frames: int, dim: int, encoder: str) -> pa.Schema:
    """The feature table's schema; ``features`` is Arrow's canonical fixed-shape tensor (T, dim) float16.

    Readers without tensor support see its storage type, a fixed-size list of T * dim float16; the
    schema metadata repeats the shape and the encoder.
    """
    metadata = {"version": FORMAT_VERSION, "encoder": encoder, "num_frames": num_frames, "dim": dim}
    return pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            ("uri", pa.string()),
            ("duration_s", pa.float64()),
            ("fps", pa.float64()),
            ("num_frames", pa.int64()),  # frames in the source video; T is the tensor's first dimension
            ("frame_times_s", pa.list_(pa.float32())),
            ("features", pa.fixed_shape_tensor(pa.float16(), (num_frames, dim))),
            ("encoder", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
        ],
        metadata={METADATA_KEY: json.dumps(metadata)},
    )


def table_metadata(schema: pa.Schema) -> dict:
    """The ``timerefine.features`` metadata of a feature table's schema (encoder, num_frames, dim)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a timerefine feature table: its schema has no timerefine.features metadata")
    return json.loads(raw)


# ---------------------------------------------------------------------------------------------------
# Stage 1: decoding, isolated in a child process


@dataclass(frozen=True)
class DecodeSettings:
    """How each video is sampled and bounded; ``resize_short`` / ``crop_size`` follow the encoder."""

    num_frames: int = 100
    resize_short: int = 224
    crop_size: int = 224
    timeout_s: float = 120.0
    memory_limit_mb: int = 4096  # address space the decoder may add to its idle size, per video
    backend: str = "auto"

    @classmethod
    def for_encoder(cls, preprocessing: ClipPreprocessing, **overrides) -> DecodeSettings:
        return cls(resize_short=preprocessing.resize_short, crop_size=preprocessing.crop_size, **overrides)


class IsolatedDecoder:
    """Samples videos in a long-lived child process, restarted after a crash, a timeout or a memory cap.

    decord can hang in native code holding the GIL, where no in-process timeout fires, and one small file
    drove it past 2 GB (DESIGN.md section 7). In a child process, a hang is a kill after ``timeout_s``, a
    blow-up is an allocation failure under ``RLIMIT_AS``, a crash is an exit status: each one a
    ``VideoDecodeError`` for that video alone. A crash is retried once in a fresh child (the kernel's OOM
    killer may have picked the child for another process's sake); a timeout is not, as a hang repeats.

    The child starts once (about a second of imports) and serves video after video; frames come back as
    raw bytes over a pipe behind a small JSON header (no pickle). Isolation costs nothing measurable per
    video: 0.10-0.16 s a 30 s 160x120 clip either way, in the child or in-process (2 busy cores).
    """

    crash_attempts = 2
    startup_timeout_s = 120.0

    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one request at a time on the pipe

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (for monitoring), else None."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def decode(self, source: str | bytes, name: str) -> SampledFrames:
        """Frames of ``source`` (a local path or a file's bytes) resized and cropped for the encoder."""
        payload = source if isinstance(source, bytes) else b""
        request = {
            "path": None if isinstance(source, bytes) else os.fspath(source),
            "name": name,
            "num_frames": self.settings.num_frames,
            "resize_short": self.settings.resize_short,
            "crop_size": self.settings.crop_size,
            "backend": self.settings.backend,
        }
        with self._lock:
            for attempt in range(1, self.crash_attempts + 1):
                try:
                    header, frames = self._request(request, payload)
                    break
                except TimeoutError:
                    self._stop()
                    reason = f"decoding took longer than {self.settings.timeout_s:g} s; stopped"
                    raise VideoDecodeError(name, reason) from None
                except (EOFError, BrokenPipeError):
                    reason = self._death_reason()
                    if attempt == self.crash_attempts:
                        raise VideoDecodeError(name, f"{reason}, {attempt} times") from None
                    logger.warning("decoding %s: %s; retrying in a fresh decoder process", name, reason)
        if not header["ok"]:
            raise VideoDecodeError(name, header["error"])
        return SampledFrames(
            frames=np.frombuffer(frames, dtype=np.uint8).reshape(header["shape"]),
            times_s=np.asarray(header["times_s"], dtype=np.float32),
            info=VideoInfo(**header["info"]),
            backend=header["backend"],
        )

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _request(self, request: dict, payload: bytes) -> tuple[dict, bytearray]:
        process = self._running_process()
        _send_message(process.stdin, request, payload)
        return _receive_message(process.stdout, time.monotonic() + self.settings.timeout_s)

    def _running_process(self) -> subprocess.Popen:
        """The child, started if needed; the timeout of a video starts once the child is ready."""
        if self._process is not None and self._process.poll() is None:
            return self._process
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, TIMEREFINE_DECODE_MEMORY_MB=str(self.settings.memory_limit_mb))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from timerefine.features import serve_decoding; serve_decoding()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:  # a child that dies while starting raises EOFError: a crash, as during a video
            _receive_message(self._process.stdout, time.monotonic() + self.startup_timeout_s)
        except TimeoutError as error:
            self._stop()
            raise RuntimeError(
                f"the decoder process did not start within {self.startup_timeout_s:g} s (see its stderr): "
                "check that this Python environment imports timerefine.features"
            ) from error
        return self._process

    def _death_reason(self) -> str:
        process, self._process = self._process, None
        code = process.wait(timeout=10) if process is not None else None
        if code is not None and code < 0:
            signal_name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the decoder process died with {signal_name}{hint}"
        return f"the decoder process exited with status {code}"

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stdout.close()

    def __del__(self) -> None:
        self._stop()


@functools.cache
def shared_decoder(settings: DecodeSettings) -> IsolatedDecoder:
    """One decoder child per process and settings, reused by every video that process decodes."""
    return IsolatedDecoder(settings)


def serve_decoding() -> None:
    """The decoder child's main loop: read a request, decode, answer; exit when the parent goes away."""
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Stray prints from native code go to stderr, where they cannot corrupt the answers.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    memory_cap_mb = int(os.environ.get("TIMEREFINE_DECODE_MEMORY_MB", "0"))
    _cap_address_space(memory_cap_mb)
    _send_message(answers, {"ready": True}, b"")
    while True:
        try:
            request, payload = _receive_message(requests, deadline=None)
        except EOFError:
            return
        source = payload if request["path"] is None else request["path"]
        try:
            sampled = sample_frames(
                source,
                request["num_frames"],
                short_side=request["resize_short"],
                backend=request["backend"],
                name=request["name"],
            )
            # The preprocessing's mean and std play no part in the crop.
            crop = ClipPreprocessing(request["resize_short"], request["crop_size"], (0, 0, 0), (1, 1, 1))
            frames = crop.resize_and_crop(sampled.frames)
        except VideoDecodeError as error:
            reason = error.reason
        except Exception as error:  # any other failure (MemoryError included) is this video's, not the job's
            reason = f"{type(error).__name__}: {error}"
        else:
            header = {
                "ok": True,
                "shape": frames.shape,
                "times_s": sampled.times_s.tolist(),
                "info": asdict(sampled.info),
                "backend": sampled.backend,
            }
            _send_message(answers, header, frames.tobytes())
            continue
        if memory_cap_mb > 0 and any(sign in reason for sign in _ALLOCATION_FAILURES):
            reason += f" (out of memory? the decoder may use {memory_cap_mb} MB a video: --decode-memory-mb)"
        _send_message(answers, {"ok": False, "error": reason}, b"")


# How failed allocations read once decord or FFmpeg have reported them (threads need memory for stacks).
_ALLOCATION_FAILURES = (
    "MemoryError",
    "Cannot allocate memory",
    "bad_alloc",
    "Resource temporarily unavailable",
)


def _cap_address_space(extra_mb: int) -> None:
    """Limit the child's address space to its idle size plus ``extra_mb`` (Linux; elsewhere no cap)."""
    if extra_mb <= 0 or not os.path.exists("/proc/self/statm"):
        return
    with open("/proc/self/statm") as statm:
        idle_bytes = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = idle_bytes + extra_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _send_message(stream, header: dict, payload: bytes) -> None:
    encoded = json.dumps(header).encode()
    stream.write(struct.pack("<QQ", len(encoded), len(payload)))
    stream.write(encoded)
    stream.write(payload)
    stream.flush()


def _receive_message(stream, deadline: float | None) -> tuple[dict, bytearray]:
    header_size, payload_size = struct.unpack("<QQ", _read_exactly(stream, 16, deadline))
    header = json.loads(_read_exactly(stream, header_size, deadline))
    return header, _read_exactly(stream, payload_size, deadline)


def _read_exactly(stream, size: int, deadline: float | None) -> bytearray:
    """Read ``size`` bytes from a pipe, raising TimeoutError at ``deadline`` and EOFError at its end."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    descriptor = stream.fileno()
    while received < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _wait_readable(descriptor, remaining):
                raise TimeoutError
        chunk = os.read(descriptor, min(size - received, 1 << 20))
        if not chunk:
            raise EOFError
        view[received : received + len(chunk)] = chunk
        received += len(chunk)
    return buffer  # not bytes(buffer): frames are megabytes, and numpy reads a bytearray without a copy


def _wait_readable(descriptor: int, timeout_s: float) -> bool:
    readable, _, _ = select.select([descriptor], [], [], timeout_s)
    return bool(readable)


def decode_video(video_id: str, uri: str, storage: Storage, decoder: IsolatedDecoder) -> dict:
    """One video -> one row of ``DECODED_SCHEMA``: its cropped frames, or status "error" and the reason."""
    row = {
        "video_id": video_id,
        "uri": uri,
        "status": STATUS_OK,
        "error": None,
        "duration_s": None,
        "fps": None,
        "num_frames": None,
        "frame_times_s": None,
        "frames": b"",
    }
    try:
        source = storage.local_path(uri) or storage.read_bytes(uri)
        sampled = decoder.decode(source, name=uri)
    except (StorageError, VideoDecodeError) as error:
        reason = error.reason if isinstance(error, VideoDecodeError) else str(error)
        return row | {"status": STATUS_ERROR, "error": reason}
    return row | {
        "duration_s": sampled.info.duration_s,
        "fps": sampled.info.fps,
        "num_frames": sampled.info.num_frames,
        "frame_times_s": sampled.times_s.tolist(),
        "frames": sampled.frames.tobytes(),
    }


# ---------------------------------------------------------------------------------------------------
# Stage 2: encoding


def encode_videos(encoder: ClipImageEncoder, decoded: pa.Table, num_frames: int, batch_size: int) -> pa.Table:
    """Rows of ``DECODED_SCHEMA`` -> rows of the feature table; error rows pass through without features.

    The frames of all videos in ``decoded`` go through the encoder together, ``batch_size`` at a time.
    If encoding fails, every video of the batch becomes an error row with the reason.
    """
    crop = encoder.preprocessing.crop_size
    rows = decoded.to_pylist()
    ok = [row for row in rows if row["status"] == STATUS_OK]
    features: dict[str, np.ndarray] = {}
    if ok:
        try:
            frames = np.concatenate(
                [
                    np.frombuffer(row["frames"], dtype=np.uint8).reshape(num_frames, crop, crop, 3)
                    for row in ok
                ]
            )
            embeds = encoder.encode(frames, batch_size=batch_size).reshape(len(ok), num_frames, encoder.dim)
            features = {row["video_id"]: embeds[index] for index, row in enumerate(ok)}
        except Exception as error:  # e.g. GPU out of memory: the batch's videos stay retryable error rows
            logger.exception("encoding %d videos failed", len(ok))
            reason = f"encoding failed: {type(error).__name__}: {error}"
            for row in ok:
                row.update(status=STATUS_ERROR, error=reason)
    return feature_rows_to_table(rows, features, num_frames, encoder.dim, encoder.identity)


def feature_rows_to_table(
    rows: Sequence[dict], features: dict[str, np.ndarray], num_frames: int, dim: int, encoder: str
) -> pa.Table:
    """Build a feature table from row dicts and a video_id -> (T, dim) array map (absent for errors)."""
    schema = feature_schema(num_frames, dim, encoder)
    tensor_type = schema.field("features").type
    flat = [
        features[row["video_id"]].astype(np.float16).reshape(-1) if row["video_id"] in features else None
        for row in rows
    ]
    storage = pa.array(flat, type=pa.list_(pa.float16(), num_frames * dim))
    columns = {
        name: [row.get(name) for row in rows]
        for name in ("video_id", "uri", "duration_s", "fps", "num_frames", "frame_times_s", "status", "error")
    }
    columns["features"] = pa.ExtensionArray.from_storage(tensor_type, storage)
    columns["encoder"] = [encoder] * len(rows)
    return pa.table({field.name: columns[field.name] for field in schema}, schema=schema)


# ---------------------------------------------------------------------------------------------------
# Stage 3: writing


def part_name(video_ids: Iterable[str]) -> str:
    """A part file's name, fixed by the videos it holds: a retried write replaces it, never duplicates it."""
    digest = hashlib.sha256("\n".join(sorted(video_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}{PART_SUFFIX}"


def write_feature_part(table: pa.Table, output_uri: str, storage: Storage) -> str:
    """Write one Parquet file of feature rows into ``output_uri``, atomically; returns its URI."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    uri = f"{output_uri.rstrip('/')}/{part_name(table.column('video_id').to_pylist())}"
    storage.write_bytes(uri, sink.getvalue())
    return uri


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass
class FeatureRow:
    """One video's features, ready for training: (T, dim) features and the time of each of the T frames."""

    video_id: str
    features: np.ndarray  # (T, dim)
    frame_times_s: np.ndarray  # (T,) float32
    duration_s: float
    fps: float
    num_frames: int
    uri: str
    encoder: str


def part_uris(uri: str, storage: Storage | None = None) -> list[str]:
    """The committed part files of a feature table (partial writes are hidden names, left out)."""
    storage = storage or Storage()
    return storage.list_files(uri, (PART_SUFFIX,))


def read_feature_table(
    uri: str, storage: Storage | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """Every video of a feature table once: its ok row, or else its latest error row.

    Raises ValueError when the parts disagree on the encoder or shape (two extractions into one folder).
    """
    storage = storage or Storage()
    parts = part_uris(uri, storage)
    if not parts:
        raise FileNotFoundError(f"{uri}: no feature table here (no part-*.parquet files)")
    filesystem, _ = storage.resolve(parts[0])
    paths = [storage.resolve(part)[1] for part in parts]
    wanted = None if columns is None else list(dict.fromkeys(["video_id", "status", *columns]))
    try:
        dataset = pads.dataset(paths, filesystem=filesystem, format="parquet")
        table = dataset.to_table(columns=wanted)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(
            f"{uri}: the part files do not share one schema (mixed extractions?): {error}"
        ) from error
    except OSError as error:
        raise StorageError(f"cannot read the feature table {uri}: {error}") from error
    if "encoder" in table.column_names:
        encoders = {value for value in table.column("encoder").unique().to_pylist() if value is not None}
        if len(encoders) > 1:
            raise ValueError(
                f"{uri}: rows from several encoders ({', '.join(sorted(encoders))}); one per table"
            )
    return _one_row_per_video(table).replace_schema_metadata(dataset.schema.metadata)


def committed_statuses(uri: str, storage: Storage | None = None) -> tuple[dict[str, str], dict | None]:
    """What an earlier run left: video_id -> "ok" / "error", and the table's metadata (None if empty)."""
    storage = storage or Storage()
    if not part_uris(uri, storage):
        return {}, None
    table = read_feature_table(uri, storage, columns=["video_id", "status"])
    statuses = dict(
        zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True)
    )
    return statuses, table_metadata(table.schema)


def load_features(
    uri: str, storage: Storage | None = None, dtype: np.dtype | type = np.float16
) -> dict[str, FeatureRow]:
    """The ok videos of a feature table as numpy arrays, keyed by video id (error rows are left out)."""
    table = read_feature_table(uri, storage)
    metadata = table_metadata(table.schema)
    shape = (metadata["num_frames"], metadata["dim"])
    table = table.filter(pc.equal(table.column("status"), STATUS_OK))
    # The tensor column's storage is one flat float16 buffer: reshape it in one go, without a row loop.
    storage_array = table.column("features").combine_chunks().storage
    flat = storage_array.flatten().to_numpy(zero_copy_only=False)
    features = flat.reshape(len(table), *shape).astype(dtype, copy=False)
    rows = table.drop_columns(["features"]).to_pylist()
    return {
        row["video_id"]: FeatureRow(
            video_id=row["video_id"],
            features=features[index],
            frame_times_s=np.asarray(row["frame_times_s"], dtype=np.float32),
            duration_s=row["duration_s"],
            fps=row["fps"],
            num_frames=row["num_frames"],
            uri=row["uri"],
            encoder=row["encoder"],
        )
        for index, row in enumerate(rows)
    }


def _one_row_per_video(table: pa.Table) -> pa.Table:
    """Keep each video's ok row if it has one, else one of its error rows."""
    statuses = table.column("status").to_pylist()
    chosen: dict[str, int] = {}
    for index, video_id in enumerate(table.column("video_id").to_pylist()):
        previous = chosen.get(video_id)
        if previous is None or statuses[previous] != STATUS_OK:
            chosen[video_id] = index
        elif statuses[index] == STATUS_OK:
            logger.warning("video %s has more than one ok row; keeping one", video_id)
    return table.take(sorted(chosen.values()))
