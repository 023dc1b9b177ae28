"""A corpus of bad and tricky video files, written with PyAV (its FFmpeg encoders) in a few seconds.

What a real bucket holds besides clean H.264 MP4s: empty and random files, truncations before and after
the index, bit rot, audio without video, cover art, containers without frames, one frame, variable frame
rate, rotation, tiny and odd sizes, fragmented MP4, a two-hour file, alpha, 8K, many codecs and
containers, wrong extensions and awkward names. ``build_corpus`` writes them; ``Expected`` says what a
decoder must make of each, for a test to check every file gets exactly its one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ANY = "any"  # ok or error are both right (bit rot may or may not hit a frame that matters)


@dataclass(frozen=True)
class Expected:
    status: str  # "ok", "error" or ANY
    num_frames: int | None = None  # frames in the source, for ok rows
    duration_s: float | None = None
    error: str | None = None  # a fragment of the reason, for error rows


def _frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Frames that differ from each other (a moving gradient), as real content does."""
    columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    frames = []
    for index in range(count):
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[..., 0] = (columns + 7 * index + seed) % 256
        frame[..., 1] = rows
        frame[..., 2] = (rows + columns + 13 * index) % 256
        frames.append(frame)
    return frames


def write(
    path: Path,
    codec: str,
    *,
    frames: int = 20,
    size: tuple[int, int] = (160, 120),
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    container_format: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: int = 0,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
) -> Path:
    """``frames`` frames of ``size`` in ``codec``, in the container the suffix (or ``container_format``)
    names; ``pts`` / ``time_base`` give each frame's own timestamp (variable frame rate)."""
    width, height = size
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        rgb_format = "rgba" if "a" in pix_fmt.removeprefix("yuv").removesuffix("p") else "rgb24"
        for index, pixels in enumerate(_frames(frames, width, height)):
            if rgb_format == "rgba":
                pixels = np.concatenate([pixels, np.full((height, width, 1), 128, np.uint8)], axis=2)
            frame = av.VideoFrame.from_ndarray(pixels, format=rgb_format)
            frame.pts = index if pts is None else pts[index]
            if time_base is not None:
                frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_audio(path: Path, codec: str = "aac", *, cover_art: bool = False) -> Path:
    """One second of silence; with ``cover_art``, an attached picture stream, as music files carry."""
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream(codec, rate=8000, layout="mono")
        picture = None
        if cover_art:
            picture = container.add_stream("mjpeg", rate=1)
            picture.width, picture.height, picture.pix_fmt = 64, 64, "yuvj420p"
            picture.disposition = av.stream.Disposition.attached_pic
        if picture is not None:
            image = av.VideoFrame.from_ndarray(_frames(1, 64, 64)[0], format="rgb24")
            image.pts = 0
            container.mux(picture.encode(image))
            container.mux(picture.encode())
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        container.mux(audio.encode(samples))
        container.mux(audio.encode())
    return path


def write_without_frames(path: Path, container_format: str | None = None) -> Path:
    """A video stream declared in the header that never gets a frame."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        container.start_encoding()  # the header, with its stream, and nothing after it
    return path


def build_corpus(folder: Path) -> dict[str, Expected]:
    """Write the corpus into ``folder``; returns file name -> what its one row must say."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    def ok(name: str, num_frames: int, duration_s: float) -> None:
        expected[name] = Expected("ok", num_frames, duration_s)

    def error(name: str, reason: str = "") -> None:
        expected[name] = Expected("error", error=reason)

    write(folder / "clean.mp4", "libx264")
    ok("clean.mp4", 20, 2.0)
    clean = (folder / "clean.mp4").read_bytes()

    (folder / "empty.mp4").write_bytes(b"")
    error("empty.mp4", "empty (0 bytes)")
    (folder / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    error("random_bytes.mp4")
    (folder / "truncated_before_moov.mp4").write_bytes(clean[: len(clean) // 2])  # moov is at the end
    error("truncated_before_moov.mp4")
    write(folder / "faststart.mp4", "libx264", frames=60, container_options={"movflags": "+faststart"})
    faststart = (folder / "faststart.mp4").read_bytes()
    (folder / "faststart.mp4").unlink()
    (folder / "truncated_after_moov.mp4").write_bytes(faststart[: len(faststart) * 2 // 3])
    expected["truncated_after_moov.mp4"] = Expected(ANY)  # decoders may return what they could read
    rotten = bytearray(clean)
    for offset in range(len(rotten) // 3, len(rotten) - 2000, 997):
        rotten[offset] ^= 0xFF
    (folder / "bit_rot.mp4").write_bytes(bytes(rotten))
    expected["bit_rot.mp4"] = Expected(ANY)

    write_audio(folder / "audio_only.m4a")
    error("audio_only.m4a", "the file has no video stream")
    write_audio(folder / "cover_art.m4a", cover_art=True)
    error("cover_art.m4a", "the file has no video stream")
    write_without_frames(folder / "zero_frames_avi.avi")
    error("zero_frames_avi.avi")
    write_without_frames(folder / "zero_frames_mkv.mkv")
    error("zero_frames_mkv.mkv")

    write(folder / "one_frame.mp4", "libx264", frames=1)
    ok("one_frame.mp4", 1, 0.1)
    vfr = [0, 50, 150, 450, 550, 600, 900, 1000, 1100, 1500]
    write(folder / "vfr.mkv", "libx264", frames=10, pts=vfr, time_base=Fraction(1, 1000))
    ok("vfr.mkv", 10, 1.6)
    write(folder / "rotated_90.mp4", "libx264", rotation=90)
    ok("rotated_90.mp4", 20, 2.0)
    write(folder / "tiny_2x2.mp4", "libx264", size=(2, 2))
    ok("tiny_2x2.mp4", 20, 2.0)
    write(folder / "odd_161x121.mp4", "libx264", size=(161, 121), pix_fmt="yuv444p")
    ok("odd_161x121.mp4", 20, 2.0)
    fragmented = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
    write(folder / "fragmented.mp4", "libx264", container_options=fragmented)
    ok("fragmented.mp4", 20, 2.0)
    write(
        folder / "two_hours.mp4",
        "libx264",
        frames=7200,
        size=(32, 32),
        fps=1,
        options={"preset": "ultrafast"},
    )
    ok("two_hours.mp4", 7200, 7200.0)
    write(folder / "alpha_vp9.webm", "libvpx-vp9", pix_fmt="yuva420p")
    ok("alpha_vp9.webm", 20, 2.0)
    write(folder / "alpha_qtrle.mov", "qtrle", pix_fmt="argb")
    ok("alpha_qtrle.mov", 20, 2.0)
    write(folder / "8k.mp4", "libx264", frames=2, size=(7680, 4320), options={"preset": "ultrafast"})
    ok("8k.mp4", 2, 0.2)

    write(folder / "vp9.webm", "libvpx-vp9")
    ok("vp9.webm", 20, 2.0)
    write(folder / "vp8.webm", "libvpx")
    ok("vp8.webm", 20, 2.0)
    if "libsvtav1" in av.codecs_available:
        write(folder / "av1.mp4", "libsvtav1", size=(160, 128))
        ok("av1.mp4", 20, 2.0)
    write(folder / "hevc.mp4", "libx265", options={"x265-params": "log-level=none"})
    ok("hevc.mp4", 20, 2.0)
    write(
        folder / "hevc_10bit.mkv", "libx265", pix_fmt="yuv420p10le", options={"x265-params": "log-level=none"}
    )
    ok("hevc_10bit.mkv", 20, 2.0)
    write(folder / "mpeg4.avi", "mpeg4")
    ok("mpeg4.avi", 20, 2.0)
    write(folder / "mjpeg.avi", "mjpeg", pix_fmt="yuvj420p")
    ok("mjpeg.avi", 20, 2.0)
    write(folder / "mpeg2.mpg", "mpeg2video", fps=25, frames=25)
    ok("mpeg2.mpg", 25, 1.0)
    write(folder / "transport.ts", "libx264", fps=25, frames=25)
    ok("transport.ts", 25, 1.0)
    write(folder / "wmv2.wmv", "wmv2")
    ok("wmv2.wmv", 20, 2.0)
    write(folder / "flash.flv", "flv", pix_fmt="yuv420p")
    ok("flash.flv", 20, 2.0)
    write(folder / "ogg_vp8.ogv", "libvpx")
    ok("ogg_vp8.ogv", 20, 2.0)
    write(folder / "h263.3gp", "h263", size=(176, 144))
    ok("h263.3gp", 20, 2.0)
    write(folder / "prores.mov", "prores_ks", pix_fmt="yuv422p10le")
    ok("prores.mov", 20, 2.0)
    write(folder / "mkv_named.mp4", "libx264", container_format="matroska")
    ok("mkv_named.mp4", 20, 2.0)

    for name in ("with spaces.mp4", "unicodé_视频.mp4", "$(touch pwned).mp4"):
        write(folder / name, "libx264")
        ok(name, 20, 2.0)
    assert len({Path(name).stem for name in expected}) == len(expected), "video ids must be unique"
    return expected
