"""Frame sampling and decoding.

A video is seen as ``num_samples`` frames picked uniformly by index (VTimeLLM's scheme, see
``sample_indices``), each stamped with its own presentation time: on variable-frame-rate video,
``index / fps`` is off by seconds, and every time the model sees or predicts derives from these stamps.

Two decoders sit behind one function. decord reads a batch of frames fast, but it cannot open AV1 and
fails on some MPEG-TS files and on streams without timing metadata; PyAV (FFmpeg) opens nearly
everything. ``backend="auto"``
tries decord and falls back to PyAV, so a collection of mixed files still yields one frame per sample.
On one thread PyAV is the cheaper of the two (a real Charades clip to 100 frames at 224 px: 286 ms of
CPU against decord's 384), but the frames differ slightly (0.17 grey levels on average after the
resize), and feature tables and checkpoints made so far hold decord's: "auto" keeps decord first (a
table records its decoder, ``primary_decoder``, and each row's; a checkpoint records its features').
Both backends return the same thing for the same file: the frame at each index, in display orientation
(decord applies rotation metadata, so the PyAV path does too), times relative to the stream's start,
resized inside the decoder when ``short_side`` is given, so full-size frames are never held in memory
nor resized in a second pass.

Whatever goes wrong with a file surfaces as ``VideoDecodeError`` naming it, never as a decoder's own
exception type, so callers can turn it into an error row. What this module cannot guard against is a
decoder that crashes or hangs in native code; run untrusted files in a child process with a timeout.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

try:
    import decord
except ImportError:  # decord ships wheels for x86-64 only; PyAV serves everywhere else
    decord = None

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "decord", "pyav")


def primary_decoder(backend: str) -> str:
    """The decoder that ``backend`` reads every file with that it can: what a feature table records, since
    two decoders' frames of one file differ slightly. "auto" is decord where it is installed; the files
    decord cannot read fall back to PyAV, and a table's ``decoder`` column names each row's."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "pyav" if backend == "pyav" or (backend == "auto" and decord is None) else "decord"


NO_VIDEO_STREAM = "the file has no video stream"

VideoSource = str | os.PathLike | bytes

# x264 settings for write_video: visually clean at small sizes, and B-frames included, so files written
# here exercise frame reordering like real video. Callers write many files in parallel processes, and at
# these sizes x264's own threads made encoding no faster (measured), so each file uses one thread.
_X264_OPTIONS = {"crf": "23", "preset": "veryfast"}
# x264's AVX-512 kernels read memory they never wrote when the frame height is not a multiple of 16 (the
# synthetic benchmark's 160 x 120): on an AVX-512 CPU, encoding the same frames 6 times in one process gave
# more than one file for 3 of 10 videos (pixels off by up to 3 on 44 of a video's frames), so one seed gave
# different benchmarks and, through training's sensitivity to its data, test mIoU several points apart.
# With the kernels held to AVX2: 0 of 10, and no slower. Every AVX-512 CPU has each of these extensions.
_X264_KERNELS_WITHOUT_AVX512 = "asm=MMX2,SSE,SSE2,SSE3,SSSE3,SSE4,SSE4.2,LZCNT,AVX,FMA3,BMI1,BMI2,AVX2"


class VideoDecodeError(RuntimeError):
    """The one exception type for any video that cannot be opened or sampled; names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode video {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Ray and multiprocessing pickle exceptions to move them between processes; the default
        # reduction would call __init__ with the formatted message only.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's shape in time and space; width and height are those of the frames as displayed."""

    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


@dataclass
class SampledFrames:
    """Frames sampled from one video, with the presentation time of each (seconds from the stream start)."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    times_s: np.ndarray  # (T,) float32
    info: VideoInfo
    backend: str  # "decord" or "pyav"


def sample_indices(num_frames: int, num_samples: int = 100) -> np.ndarray:
    """Frame indices spread evenly from the first frame to the last, truncated as VTimeLLM's sampler does
    (``linspace(..., dtype=int)``), so features match the ones its checkpoints were trained on.

    A video shorter than ``num_samples`` frames repeats frames, so every video yields the same number of
    samples and a sample's position always maps to the same fraction of the video.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return np.linspace(0, num_frames - 1, num_samples).astype(np.int64)


def probe_video(source: VideoSource, *, name: str | None = None) -> VideoInfo:
    """Read a video's frame count, frame rate, duration and display size without decoding it all.

    The counts come from the container's metadata where it has them (MP4, MOV); otherwise (Matroska,
    WebM, MPEG-TS) from one pass over the packets, which reads the file but decodes only its first
    frame, the one that tells the display orientation.
    """
    label = _label(source, name)
    _check_not_empty(source, label)
    return _pyav_guard(label, lambda: _probe_pyav(source, label)[0])


def sample_frames(
    source: VideoSource,
    num_samples: int = 100,
    *,
    short_side: int | None = None,
    backend: str = "auto",
    name: str | None = None,
    threads: int = 0,
) -> SampledFrames:
    """Decode the frames at ``sample_indices(num_frames, num_samples)`` and their presentation times.

    ``source`` is a local path or a whole file's bytes (an object fetched from S3); ``name`` labels the
    bytes in errors and logs. ``short_side`` resizes (bicubic, aspect kept, no crop) so the shorter side
    has that many pixels. ``backend`` is "auto" (decord, then PyAV if decord cannot read the file),
    "decord" or "pyav". ``threads`` is the decoder's thread count, for decoding and for PyAV's scaling
    alike (0: FFmpeg's choice, about one a core); a pipeline that decodes one video a core asks for 1.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels or None, got {short_side}")
    label = _label(source, name)
    _check_not_empty(source, label)

    def with_pyav() -> SampledFrames:
        return _pyav_guard(label, lambda: _sample_pyav(source, num_samples, short_side, label, threads))

    if backend == "pyav" or (backend == "auto" and decord is None):
        return with_pyav()
    if backend == "decord":
        return _sample_decord(source, num_samples, short_side, label, threads)
    try:
        return _sample_decord(source, num_samples, short_side, label, threads)
    except VideoDecodeError as decord_error:
        logger.info("decord cannot read %s (%s); decoding it with PyAV", label, decord_error.reason)
        try:
            return with_pyav()
        except VideoDecodeError as pyav_error:
            if pyav_error.reason == NO_VIDEO_STREAM:  # the file's own fault; decord's words add nothing
                raise
            reasons = f"{decord_error.reason}; PyAV: {pyav_error.reason}"
            raise VideoDecodeError(label, reasons) from pyav_error


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write RGB frames as an H.264 (yuv420p) MP4, atomically: the file appears complete or not at all.

    ``frames`` is (N, H, W, 3) uint8 with even H and W (yuv420p halves the chroma resolution).
    """
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"{path}: frames must be a non-empty (N, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even frame sizes, got {width}x{height}; pad or crop")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")

    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        with av.open(str(partial), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.options = x264_options()
            stream.codec_context.thread_count = 1
            for index, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def x264_options() -> dict[str, str]:
    """The encoder options of ``write_video``: the same frames always make the same file on one machine."""
    options = dict(_X264_OPTIONS)
    if _cpu_has_avx512():
        options["x264-params"] = _X264_KERNELS_WITHOUT_AVX512
    return options


@functools.cache
def _cpu_has_avx512() -> bool:
    """Read once a process: a benchmark writes hundreds of videos on the same CPU."""
    try:
        return _flags_have_avx512(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: x264's own choice of kernels
        return False


def _flags_have_avx512(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text's flags list AVX-512 Foundation."""
    return re.search(r"^flags\s*:.*\bavx512f\b", cpuinfo, re.MULTILINE) is not None


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def _label(source: VideoSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _check_not_empty(source: VideoSource, label: str) -> None:
    """Reject missing and empty files up front, where the decoders' own messages would be cryptic."""
    if isinstance(source, bytes | bytearray):
        if not source:
            raise VideoDecodeError(label, "the data is empty (0 bytes)")
        return
    path = Path(source)
    if not path.is_file():
        raise VideoDecodeError(label, "no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(label, "the file is empty (0 bytes)")


def _output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``short_side`` pixels, aspect ratio kept."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


# decord prefixes its messages with native log noise: "[07:24:47] /github/workspace/src/...cc:151: ".
_NATIVE_LOG_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (Check failed: .*? )?")


def _first_line(error: BaseException) -> str:
    """An exception's message, cut to its first line (decord appends a native stack trace) and without
    decord's log prefix."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {_NATIVE_LOG_PREFIX.sub('', lines[0]) if lines else ''}"


# ---------------------------------------------------------------------------------------------------
# decord


def _sample_decord(
    source: VideoSource, num_samples: int, short_side: int | None, label: str, threads: int
) -> SampledFrames:
    if decord is None:
        raise VideoDecodeError(label, "decord is not installed (use backend='pyav' or 'auto')")
    try:
        reader = _decord_reader(source, threads)
        num_frames = len(reader)
        # decord reports no frame size before decoding; its first frame is already rotated for display.
        native_height, native_width = reader[0].shape[:2]
        width, height = _output_size(native_width, native_height, short_side)
        if (width, height) != (native_width, native_height):
            reader = _decord_reader(source, threads, width=width, height=height)
        indices = sample_indices(num_frames, num_samples)
        frames = _decord_to_numpy(reader.get_batch(indices))
        stamps = reader.get_frame_timestamp(indices)
        last_start, last_end = (float(value) for value in reader.get_frame_timestamp([num_frames - 1])[0])
        fps = float(reader.get_avg_fps())
    except Exception as error:  # decord raises DECORDError, RuntimeError, AssertionError, IndexError...
        raise VideoDecodeError(label, f"decord: {_first_line(error)}") from error
    starts = stamps[:, 0]
    if not (np.isfinite(starts).all() and starts[0] >= 0 and (np.diff(starts) >= 0).all()):
        # Seen on MPEG-PS (.mpg, .vob): frames without a pts get -1e14; PyAV reads their real times.
        raise VideoDecodeError(label, "decord: its frame timestamps are missing or out of order")
    # Containers that state no frame durations (fragmented MP4, ASF, FLV) give the last frame none:
    # it lasts a frame period, as PyAV's path counts it.
    duration_s = last_end if last_end > last_start or not fps else last_start + 1 / fps
    info = VideoInfo(num_frames, fps, duration_s, native_width, native_height)
    return SampledFrames(np.ascontiguousarray(frames), stamps[:, 0].astype(np.float32), info, "decord")


def _decord_reader(source: VideoSource, threads: int, *, width: int = -1, height: int = -1):
    uri = io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    return decord.VideoReader(uri, width=width, height=height, num_threads=threads)


def _decord_to_numpy(batch) -> np.ndarray:
    # decord converts its output with the bridge chosen in the calling thread; a caller who picked the
    # torch bridge gets a tensor, which numpy reads without a copy.
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


# ---------------------------------------------------------------------------------------------------
# PyAV


def _pyav_guard(label: str, decode):
    """Run ``decode`` and turn PyAV's exceptions into VideoDecodeError."""
    try:
        return decode()
    except av.error.FFmpegError as error:
        raise VideoDecodeError(label, _first_line(error)) from error


def _open_pyav(source: VideoSource) -> av.container.InputContainer:
    # A non-UTF-8 title or comment must not make an otherwise fine video unreadable.
    uri = io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    return av.open(uri, metadata_errors="ignore")


def _video_stream(container: av.container.InputContainer, label: str) -> av.video.stream.VideoStream:
    """The first video stream that is a video: cover art (an attached picture) is not."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise VideoDecodeError(label, NO_VIDEO_STREAM)


def _probe_pyav(source: VideoSource, label: str) -> tuple[VideoInfo, int]:
    """The video's info and its rotation (degrees counter-clockwise), in one pass over the packets.

    The pass stops after the first decoded frame when the container states frame count and duration.
    """
    with _open_pyav(source) as container:
        stream = _video_stream(container, label)
        stream.codec_context.thread_count = 1  # one frame to decode: decoder threads would only add latency
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        needs_scan = not (stream.frames > 0 and stream.duration)
        rotation = None
        num_packets = 0
        last_pts = last_packet_duration = None
        for packet in container.demux(stream):
            if packet.size == 0:  # the empty packet that flushes the decoder
                continue
            num_packets += 1
            if packet.pts is not None and (last_pts is None or packet.pts > last_pts):
                last_pts, last_packet_duration = packet.pts, packet.duration
            if rotation is None:
                rotation = next((frame.rotation for frame in packet.decode()), None)
            if rotation is not None and not needs_scan:
                break
        if rotation is None:  # a decoder that buffers frames hands them over when flushed
            rotation = next((frame.rotation for frame in stream.codec_context.decode(None)), None)

        fps_rate = stream.average_rate or stream.guessed_rate
        if not needs_scan:
            num_frames = stream.frames
            duration_s = float(stream.duration * time_base)
        elif num_packets == 0:
            raise VideoDecodeError(label, "the video stream has no frames")
        elif last_pts is None:
            raise VideoDecodeError(label, "the video stream has no timestamps (remux it into MP4 or MKV)")
        else:
            num_frames = num_packets
            # The last frame lasts its packet's duration where the container states one, else a frame
            # period: the same end decord reports for its last frame.
            if last_packet_duration:
                last_frame_s = float(last_packet_duration * time_base)
            else:
                last_frame_s = float(1 / fps_rate) if fps_rate else 0.0
            duration_s = float((last_pts - start_pts) * time_base) + last_frame_s
        if rotation is None:
            raise VideoDecodeError(label, f"none of its {num_frames} frames could be decoded")
        if not fps_rate and duration_s <= 0:
            raise VideoDecodeError(label, "the video stream states neither a frame rate nor a duration")
        fps = float(fps_rate) if fps_rate else num_frames / duration_s

        width, height = stream.codec_context.width, stream.codec_context.height
        if _quarter_turns(rotation) % 2:
            width, height = height, width
        return VideoInfo(num_frames, fps, duration_s, width, height), rotation


def _sample_pyav(
    source: VideoSource, num_samples: int, short_side: int | None, label: str, threads: int
) -> SampledFrames:
    info, _ = _probe_pyav(source, label)
    indices = sample_indices(info.num_frames, num_samples)
    wanted, positions = np.unique(indices, return_inverse=True)
    width, height = _output_size(info.width, info.height, short_side)
    # Filled in place: a list of frames stacked at the end would hold every frame twice at its peak.
    frames = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
    times = np.empty(len(wanted), dtype=np.float32)
    num_decoded = 0
    with _open_pyav(source) as container:
        stream = _video_stream(container, label)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        # Frames come out in presentation order, so the n-th frame decoded is frame index n.
        for index, frame in enumerate(container.decode(stream)):
            if index < wanted[num_decoded]:
                continue
            if frame.pts is None:
                raise VideoDecodeError(label, f"frame {index} has no presentation timestamp")
            frames[num_decoded] = _pyav_to_rgb(frame, width, height, threads)
            times[num_decoded] = float((frame.pts - start_pts) * time_base)
            num_decoded += 1
            if num_decoded == len(wanted):
                break
    if num_decoded < len(wanted):
        raise VideoDecodeError(
            label,
            f"decoding stopped before frame {wanted[num_decoded]} of the {info.num_frames} its container "
            "lists (a truncated or damaged file)",
        )
    if len(wanted) < num_samples:  # a video with fewer frames than samples repeats some
        frames, times = frames[positions], times[positions]
    return SampledFrames(frames, times, info, "pyav")


def _pyav_to_rgb(frame: av.VideoFrame, width: int, height: int, threads: int) -> np.ndarray:
    """An RGB array of ``frame`` at (width, height) in display orientation, scaled before rotating."""
    quarter_turns = _quarter_turns(frame.rotation)
    coded_width, coded_height = (height, width) if quarter_turns % 2 else (width, height)
    pixels = frame.to_ndarray(
        format="rgb24",
        width=coded_width,
        height=coded_height,
        interpolation="BICUBIC",
        # PyAV's scaler otherwise starts a thread a core: converting one synthetic benchmark video's frames
        # took 110 ms of CPU on 2 cores that way, 25 ms on one thread.
        threads=threads,
    )
    return np.rot90(pixels, quarter_turns) if quarter_turns else pixels


def _quarter_turns(rotation_degrees: float) -> int:
    """Counter-clockwise quarter turns (0-3) for a display rotation, the direction np.rot90 turns."""
    return round(rotation_degrees / 90) % 4
