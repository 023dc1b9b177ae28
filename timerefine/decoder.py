"""Sampling a video's frames in an isolated child process, one video at a time.

``decode_video`` is the extraction's first stage (and ``predict``'s): it reads a video (local path or
``s3://``), samples ``num_frames`` frames, resizes and crops them for the encoder, all inside a
long-lived child process (``IsolatedDecoder``), so that a decoder crash, hang or memory blow-up costs that
one video, which comes back as an error with its reason instead of taking the job down.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import mmap
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from timerefine.data.storage import Storage, StorageError
from timerefine.encoders import ClipPreprocessing, copy_frames_into
from timerefine.video import SampledFrames, VideoDecodeError, VideoInfo, primary_decoder, sample_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    """How each video is sampled and bounded; ``resize_short`` / ``crop_size`` follow the encoder."""

    num_frames: int = 100
    resize_short: int = 224
    crop_size: int = 224
    timeout_s: float = 120.0
    memory_limit_mb: int = 4096  # address space the decoder may add to its idle size, per video
    decoder: str = "auto"  # "auto" (decord, PyAV for what decord cannot read), "decord" or "pyav"
    threads: int = 1  # decoder threads: a task or actor decodes one video a core, and more cost CPU

    def __post_init__(self) -> None:
        primary_decoder(self.decoder)  # a name it does not know is an error here, not in the child

    @property
    def frame_bytes(self) -> int:
        """The size of one video's sampled, cropped frames (uint8 RGB)."""
        return self.num_frames * self.crop_size * self.crop_size * 3

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

    The child starts once (about a second of imports, begun by ``start`` while the caller loads other
    things) and serves video after video. Requests and answers are small JSON headers on a pipe (no
    pickle); the frames themselves come back through a buffer the two processes share (an anonymous
    memory file), written once by the child and copied out once by the parent. Through the pipe they cost
    the parent as much CPU as the child's decoding: 4.9 MB a video arrive 64 KB at a time.
    """

    crash_attempts = 2
    startup_timeout_s = 120.0

    def __init__(self, settings: DecodeSettings) -> None:
        self.settings = settings
        self._process: subprocess.Popen | None = None
        self._buffer: SharedBuffer | None = None
        self._lock = threading.Lock()  # one request at a time on the pipe

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (for monitoring), else None."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self) -> None:
        """Start the child now rather than at the first video (its imports overlap the caller's)."""
        with self._lock:
            self._running_process()

    def decode(self, source: str | bytes, name: str, out: np.ndarray | None = None) -> SampledFrames:
        """Frames of ``source`` (a local path or a file's bytes) resized and cropped for the encoder.

        ``out``, a ``(num_frames, crop_size, crop_size, 3)`` uint8 array, receives the frames in place of a
        new array: a caller gathering several videos in one buffer then copies each video once, not twice.
        """
        payload = source if isinstance(source, bytes) else b""
        request = {
            "path": None if isinstance(source, bytes) else os.fspath(source),
            "name": name,
            "num_frames": self.settings.num_frames,
            "resize_short": self.settings.resize_short,
            "crop_size": self.settings.crop_size,
            "decoder": self.settings.decoder,
            "threads": self.settings.threads,
        }
        with self._lock:
            for attempt in range(1, self.crash_attempts + 1):
                try:
                    header = self._request(request, payload)
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
            # A copy: the buffer holds the next video's frames once the lock is released.
            shared = self._buffer.array(header["shape"])
            if out is None:
                frames = shared.copy()
            else:
                copy_frames_into(out, shared)
                frames = out
        return SampledFrames(
            frames=frames,
            times_s=np.asarray(header["times_s"], dtype=np.float32),
            info=VideoInfo(**header["info"]),
            backend=header["backend"],
        )

    def close(self) -> None:
        with self._lock:
            self._stop()
            if self._buffer is not None:
                self._buffer.close()
                self._buffer = None

    def _request(self, request: dict, payload: bytes) -> dict:
        process = self._running_process()
        _send_message(process.stdin, request, payload)
        header, _ = _receive_message(process.stdout, time.monotonic() + self.settings.timeout_s)
        return header

    def _running_process(self) -> subprocess.Popen:
        """The child, started if needed (or restarted with a larger buffer when the settings grew); the
        timeout of a video starts once the child is ready."""
        settings = self.settings
        frame_bytes = settings.frame_bytes
        if self._process is not None and self._process.poll() is None:
            if self._buffer.size >= frame_bytes:
                return self._process
            self._stop()
        if self._buffer is None or self._buffer.size < frame_bytes:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = SharedBuffer(frame_bytes)
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, TIMEREFINE_DECODE_MEMORY_MB=str(settings.memory_limit_mb))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env["TIMEREFINE_DECODE_BUFFER"] = f"{self._buffer.fileno()}:{self._buffer.size}"
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from timerefine.decoder import serve_decoding; serve_decoding()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=(self._buffer.fileno(),),
        )
        _widen_pipe(self._process.stdin)  # S3 videos travel over it as bytes
        try:  # a child that dies while starting raises EOFError: a crash, as during a video
            _receive_message(self._process.stdout, time.monotonic() + self.startup_timeout_s)
        except TimeoutError as error:
            self._stop()
            raise RuntimeError(
                f"the decoder process did not start within {self.startup_timeout_s:g} s (see its stderr): "
                "check that this Python environment imports timerefine.decoder"
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


class SharedBuffer:
    """An anonymous memory file both processes map: the child writes a video's frames, the parent reads.

    ``os.memfd_create`` on Linux (no name, gone with its last descriptor); elsewhere an unlinked
    temporary file, which the page cache holds just the same.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        if hasattr(os, "memfd_create"):
            self._file = os.fdopen(os.memfd_create("timerefine-frames"), "r+b")
        else:  # pragma: no cover - macOS
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the buffer lives
        os.ftruncate(self._file.fileno(), size)
        self._map = mmap.mmap(self._file.fileno(), size)

    @classmethod
    def inherited(cls, spec: str) -> SharedBuffer:
        """The parent's buffer in the child, from ``"<descriptor>:<size>"``."""
        descriptor, size = (int(part) for part in spec.split(":"))
        buffer = cls.__new__(cls)
        buffer.size, buffer._file = size, os.fdopen(descriptor, "r+b")
        buffer._map = mmap.mmap(descriptor, size)
        return buffer

    def fileno(self) -> int:
        return self._file.fileno()

    def array(self, shape) -> np.ndarray:
        """A uint8 view of the buffer's start with ``shape``."""
        return np.ndarray(tuple(shape), dtype=np.uint8, buffer=self._map)

    def close(self) -> None:
        self._map.close()
        self._file.close()


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
    buffer = SharedBuffer.inherited(os.environ["TIMEREFINE_DECODE_BUFFER"])
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
                backend=request["decoder"],
                name=request["name"],
                threads=request["threads"],
            )
            # The preprocessing's mean and std play no part in the crop.
            crop = ClipPreprocessing(request["resize_short"], request["crop_size"], (0, 0, 0), (1, 1, 1))
            shape = (len(sampled.frames), crop.crop_size, crop.crop_size, 3)
            frames = crop.resize_and_crop(sampled.frames, out=buffer.array(shape))
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
            _send_message(answers, header, b"")
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


def _widen_pipe(stream) -> None:
    """A 1 MB pipe buffer where Linux allows it: a 10 MB video then crosses in 10 writes, not 160."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)


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


@dataclass
class DecodedVideo:
    """One video after decoding: its cropped frames and timing, or the reason it failed (``error``)."""

    video_id: str
    uri: str
    error: str | None = None
    duration_s: float | None = None
    fps: float | None = None
    num_frames: int | None = None  # frames in the source video
    frame_times_s: list[float] | None = None  # presentation time of each sampled frame
    decoder: str | None = None  # "decord" or "pyav": which one read this file
    frames: np.ndarray | None = field(default=None, repr=False)  # (T, crop, crop, 3) uint8

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_video(
    video_id: str, uri: str, storage: Storage, decoder: IsolatedDecoder, out: np.ndarray | None = None
) -> DecodedVideo:
    """Sample one video for the encoder; a video that cannot be read or decoded gives its reason. Its
    frames go into ``out`` where given (``IsolatedDecoder.decode``), which an error leaves untouched."""
    try:
        source = storage.local_path(uri) or storage.read_bytes(uri)
        sampled = decoder.decode(source, name=uri, out=out)
    except (StorageError, VideoDecodeError) as error:
        reason = error.reason if isinstance(error, VideoDecodeError) else str(error)
        return DecodedVideo(video_id, uri, error=reason)
    return DecodedVideo(
        video_id,
        uri,
        duration_s=sampled.info.duration_s,
        fps=sampled.info.fps,
        num_frames=sampled.info.num_frames,
        frame_times_s=sampled.times_s.tolist(),
        decoder=sampled.backend,
        frames=sampled.frames,
    )
