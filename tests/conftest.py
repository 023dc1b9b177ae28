"""Fixtures shared by all tests: the real reference data, and small real video files.

``sample_videos`` writes real encoded files (H.264 in MP4 through ``timerefine.video.write_video``, plus
a few made with PyAV directly for what that helper does not write) and some broken files. Every frame of
a decodable sample video carries its own index as a row of black and white cells, which
``frame_index_code.read`` reads back from a decoded frame at any size, so a test can tell exactly which
frame a decoder returned. ``sample_video_truth`` states what each decodable file holds, as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import raycluster  # sets Ray's environment before any test module imports ray
from processes import NormalScheduling

from timerefine.video import write_video

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


_SCHEDULING = NormalScheduling()


def pytest_sessionstart(session: pytest.Session) -> None:
    _SCHEDULING.start()


def pytest_terminal_summary(terminalreporter) -> None:
    """Say so when the suite's processes had to be taken off a real-time policy: the run was disturbed."""
    if _SCHEDULING.reset:
        names = sorted(set(_SCHEDULING.reset.values()))[:10]
        terminalreporter.write_line(
            f"{len(_SCHEDULING.reset)} process(es) of the suite were found under a real-time scheduling "
            f"policy (set from outside) and put back under SCHED_OTHER: {names}"
        )


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[raycluster.SessionRay]:
    session = raycluster.SessionRay(tmp_path_factory.mktemp("ray"))
    yield session
    session.stop()


@pytest.fixture
def ray_cluster(ray_session: raycluster.SessionRay) -> Iterator[str]:
    """The address of a local Ray cluster (2 CPUs, 127.0.0.1) that this test process is connected to; one
    for the whole session, shared by every test folder (tests/pipelines, tests/tune), with every CPU
    free when the test starts. A test that does not give them back fails in its teardown and the
    cluster is replaced (``raycluster.SessionRay``)."""
    yield ray_session.address
    ray_session.give_back_or_replace()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data in the repository's sibling ``../shared/data``; skips when it is absent."""
    path = SHARED_DATA.resolve()
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path}")
    return path


@dataclass(frozen=True)
class VideoTruth:
    """A sample video's contents as written; width and height are the displayed (rotated) frame's."""

    num_frames: int
    fps: float
    width: int
    height: int
    frame_times_s: tuple[float, ...]  # each frame's presentation time, seconds from the stream's start
    duration_s: float  # the end of the last frame
    rotation: int = 0  # display rotation, degrees counter-clockwise


@dataclass(frozen=True)
class FrameIndexCode:
    """Frames that carry their own index, so a test can tell which frame a decoder returned.

    The index's bits are white / black cells across the top quarter of the frame, most significant
    first, above a colour gradient that shifts from frame to frame like real content. The cells survive
    H.264 compression and scaling to any size with the aspect ratio kept.
    """

    bits: int = 10  # indices up to 1023 are told apart; beyond that they wrap around

    def draw(self, index: int, height: int, width: int) -> np.ndarray:
        """An (height, width, 3) uint8 RGB frame carrying ``index``."""
        rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[..., 0] = columns
        frame[..., 1] = rows
        frame[..., 2] = (rows + columns + 8 * index) % 256
        edges = np.linspace(0, width, self.bits + 1).round().astype(int)
        for bit in range(self.bits):
            is_set = (index >> (self.bits - 1 - bit)) & 1
            frame[: height // 4, edges[bit] : edges[bit + 1]] = 255 if is_set else 0
        return frame

    def read(self, frame: np.ndarray) -> int:
        """The index in a decoded (H, W, 3) RGB frame, upright (undo a display rotation first)."""
        height, width = frame.shape[:2]
        band_rows = slice(height // 16, max(height // 16 + 1, 3 * height // 16))
        index = 0
        for bit in range(self.bits):
            left = round((bit + 0.25) * width / self.bits)
            right = max(left + 1, round((bit + 0.75) * width / self.bits))
            index = index * 2 + int(frame[band_rows, left:right].mean() > 127)
        return index


FRAME_INDEX_CODE = FrameIndexCode()


@pytest.fixture(scope="session")
def frame_index_code() -> FrameIndexCode:
    """Draws frames that carry their index and reads the index back (see ``FrameIndexCode``)."""
    return FRAME_INDEX_CODE


# Constant-frame-rate H.264 / MP4 files from write_video: name -> (frames, fps, width, height).
_COUNTERS = {
    "counter_10fps": (50, 10.0, 160, 120),
    "counter_short": (30, 10.0, 160, 120),  # fewer frames than the usual 100 samples
    "counter_wide_ntsc": (150, 30000 / 1001, 192, 108),  # 16:9 at 29.97 fps
}
# Variable frame rate in Matroska (no frame count in its header), starting 0.5 s into the stream.
_VFR_DURATIONS_MS = (50, 100, 300, 100)
_VFR_FRAMES = 40
_VFR_START_MS = 500
_VFR_DECLARED_FPS = 10


def _cfr_truth(num_frames: int, fps: float, width: int, height: int, rotation: int = 0) -> VideoTruth:
    rate = Fraction(fps).limit_denominator(1001)
    return VideoTruth(
        num_frames=num_frames,
        fps=float(rate),
        width=width,
        height=height,
        frame_times_s=tuple(float(index / rate) for index in range(num_frames)),
        duration_s=float(num_frames / rate),
        rotation=rotation,
    )


def _vfr_truth() -> VideoTruth:
    durations = [_VFR_DURATIONS_MS[i % len(_VFR_DURATIONS_MS)] for i in range(_VFR_FRAMES)]
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]])
    return VideoTruth(
        num_frames=_VFR_FRAMES,
        fps=float(_VFR_DECLARED_FPS),  # the stream's declared rate; its frames average fewer per second
        width=160,
        height=120,
        frame_times_s=tuple(float(start) / 1000 for start in starts),
        duration_s=sum(durations) / 1000,
    )


_AV1_ENCODERS = ("libsvtav1", "libaom-av1")


def _can_decode_av1() -> bool:
    try:
        av.codec.Codec("av1", "r")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


def _av1_encoder() -> str | None:
    if not _can_decode_av1():
        return None
    return next((name for name in _AV1_ENCODERS if name in av.codecs_available), None)


@pytest.fixture(scope="session")
def sample_video_truth() -> dict[str, VideoTruth]:
    """What each decodable file of ``sample_videos`` holds (the AV1 one only where PyAV can write it)."""
    truth = {name: _cfr_truth(*spec) for name, spec in _COUNTERS.items()}
    truth["vfr_offset"] = _vfr_truth()
    truth["rotated_90"] = _cfr_truth(30, 10.0, width=120, height=160, rotation=90)
    if _av1_encoder() is not None:
        truth["av1"] = _cfr_truth(30, 10.0, 160, 120)
    return truth


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real video files, name -> path, written once per test session.

    Decodable (see ``sample_video_truth``): counter_10fps, counter_short, counter_wide_ntsc (H.264 MP4
    with B-frames), vfr_offset (.mkv, variable frame rate, stream starting at 0.5 s), rotated_90 (coded
    160x120 with a 90-degree display rotation), av1 (AV1 in MP4, which decord cannot open; present only
    where this PyAV build has an AV1 encoder and decoder).

    Broken: zero_byte, truncated (the first half of counter_10fps, whose index sits at the end),
    truncated_faststart (the same cut of a copy with its index first, so it opens and fails while
    decoding), not_video (text named .mp4), audio_only (.wav), empty_video_stream (.mkv with a video
    stream holding no frames), raw_h264_no_timestamps (an H.264 elementary stream: no container, no
    timestamps).
    """
    folder = tmp_path_factory.mktemp("sample_videos")
    videos: dict[str, Path] = {}

    for name, (num_frames, fps, width, height) in _COUNTERS.items():
        frames = np.stack([FRAME_INDEX_CODE.draw(i, height, width) for i in range(num_frames)])
        videos[name] = folder / f"{name}.mp4"
        write_video(videos[name], frames, fps)
    videos["vfr_offset"] = _write_vfr(folder / "vfr_offset.mkv")
    videos["rotated_90"] = _write_with_pyav(folder / "rotated_90.mp4", "libx264", 30, rotation=90)
    encoder = _av1_encoder()
    if encoder is not None:
        videos["av1"] = _write_with_pyav(folder / "av1.mp4", encoder, 30)

    videos["zero_byte"] = folder / "zero_byte.mp4"
    videos["zero_byte"].write_bytes(b"")
    whole = videos["counter_10fps"].read_bytes()
    videos["truncated"] = folder / "truncated.mp4"
    videos["truncated"].write_bytes(whole[: len(whole) // 2])
    faststart = _remux_faststart(videos["counter_10fps"], folder / "faststart.mp4").read_bytes()
    videos["truncated_faststart"] = folder / "truncated_faststart.mp4"
    videos["truncated_faststart"].write_bytes(faststart[: len(faststart) // 2])
    videos["not_video"] = folder / "not_video.mp4"
    videos["not_video"].write_text("this is a text file, not a video\n")
    videos["audio_only"] = _write_audio_only(folder / "audio_only.wav")
    videos["empty_video_stream"] = _write_empty_video_stream(folder / "empty_video_stream.mkv")
    videos["raw_h264_no_timestamps"] = _write_with_pyav(folder / "raw.h264", "libx264", 20)
    return videos


def _encode_all(container: av.container.OutputContainer, stream, frames) -> None:
    for frame in frames:
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _write_with_pyav(path: Path, codec: str, num_frames: int, *, rotation: int = 0) -> Path:
    """160x120 index frames at 10 fps, in the codec and container (from the suffix) given."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        frames = []
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(FRAME_INDEX_CODE.draw(index, 120, 160), format="rgb24")
            frame.pts = index
            frames.append(frame)
        _encode_all(container, stream, frames)
    return path


def _write_vfr(path: Path) -> Path:
    truth = _vfr_truth()
    millisecond = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=_VFR_DECLARED_FPS)
        stream.width, stream.height, stream.pix_fmt = truth.width, truth.height, "yuv420p"
        stream.codec_context.time_base = millisecond
        frames = []
        for index, start_s in enumerate(truth.frame_times_s):
            frame = av.VideoFrame.from_ndarray(
                FRAME_INDEX_CODE.draw(index, truth.height, truth.width), "rgb24"
            )
            frame.pts = _VFR_START_MS + round(start_s * 1000)
            frame.time_base = millisecond
            frames.append(frame)
        _encode_all(container, stream, frames)
    return path


def _remux_faststart(source: Path, path: Path) -> Path:
    """A copy of an MP4 with its index (moov) moved to the front, as streaming-ready files have it."""
    faststart = {"movflags": "+faststart"}
    with av.open(str(source)) as reader, av.open(str(path), "w", options=faststart) as writer:
        stream_in = reader.streams.video[0]
        stream_out = writer.add_stream_from_template(stream_in)
        for packet in reader.demux(stream_in):
            if packet.size:
                packet.stream = stream_out
                writer.mux(packet)
    return path


def _write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        _encode_all(container, stream, [frame])
    return path


def _write_empty_video_stream(path: Path) -> Path:
    """A video stream declared in the header but never given a frame (beside one second of audio)."""
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        audio = container.add_stream("aac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        _encode_all(container, audio, [frame])
    return path
