import os
import pickle
import re
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from timerefine import video
from timerefine.video import (
    VideoDecodeError,
    probe_video,
    sample_frames,
    sample_indices,
    write_video,
)

needs_decord = pytest.mark.skipif(video.decord is None, reason="decord is not installed")
DECODERS = [pytest.param("decord", marks=needs_decord), "pyav"]
DECODABLE = ["counter_10fps", "counter_short", "counter_wide_ntsc", "vfr_offset", "rotated_90"]

# Each broken sample video, and what PyAV's side of the error says about it.
BROKEN = {
    "zero_byte": "empty (0 bytes)",
    "truncated": "Invalid data",
    "truncated_faststart": "decoding stopped before frame",
    "not_video": "Invalid data",
    "audio_only": "no video stream",
    "empty_video_stream": "has no frames",
    "raw_h264_no_timestamps": "no timestamps",
}
CHARADES_CLIP = "videos/charades_Y1HGC.mp4"


def upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Undo a display rotation, so the index cells are back on top."""
    return np.rot90(frames, -round(rotation / 90), axes=(1, 2))


def frame_indices(frames: np.ndarray, frame_index_code, rotation: int = 0) -> list[int]:
    return [frame_index_code.read(frame) for frame in upright(frames, rotation)]


def expected_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to short_side, aspect ratio kept."""
    scale = short_side / min(width, height)
    return round(height * scale), round(width * scale)


# --- sample_indices ----------------------------------------------------------------------------------


@given(num_frames=st.integers(1, 20_000), num_samples=st.integers(1, 400))
def test_indices_run_evenly_from_first_to_last_frame(num_frames, num_samples):
    indices = sample_indices(num_frames, num_samples)
    exact = np.linspace(0, num_frames - 1, num_samples)
    assert indices.shape == (num_samples,)
    assert indices.dtype == np.int64
    assert indices[0] == 0
    assert indices[-1] == (num_frames - 1 if num_samples > 1 else 0)
    assert np.all(np.diff(indices) >= 0)
    assert np.all((indices <= exact + 1e-9) & (indices > exact - 1))  # truncated, as VTimeLLM


def test_short_videos_repeat_every_frame_evenly():
    num_frames, num_samples = 30, 100
    counts = np.bincount(sample_indices(num_frames, num_samples), minlength=num_frames)
    # Truncation gives each frame the samples that fall in [i, i + 1): one frame's width of the sample
    # grid; the last frame gets only the end point.
    samples_per_frame = (num_samples - 1) / (num_frames - 1)
    assert set(counts[:-1]) <= {np.floor(samples_per_frame), np.ceil(samples_per_frame)}
    assert counts[-1] == 1


def test_indices_need_a_frame_and_a_sample():
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(0)
    with pytest.raises(ValueError, match="num_samples"):
        sample_indices(10, 0)


# --- probing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODABLE)
def test_probe_reports_what_was_written(name, sample_videos, sample_video_truth):
    truth = sample_video_truth[name]
    info = probe_video(sample_videos[name])
    assert info.num_frames == truth.num_frames
    assert info.fps == pytest.approx(truth.fps, rel=1e-6)
    assert info.duration_s == pytest.approx(truth.duration_s, abs=1e-3)
    assert (info.width, info.height) == (truth.width, truth.height)


def test_probe_reads_bytes_like_a_file(sample_videos):
    path = sample_videos["vfr_offset"]
    assert probe_video(path.read_bytes(), name="s3://bucket/vfr.mkv") == probe_video(path)


@pytest.mark.parametrize("name", sorted(set(BROKEN) - {"truncated_faststart"}))
def test_probe_rejects_broken_files_by_name(name, sample_videos):
    path = sample_videos[name]
    with pytest.raises(VideoDecodeError, match=re.escape(BROKEN[name])) as caught:
        probe_video(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)


# --- sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("name", DECODABLE)
def test_each_sample_is_the_indexed_frame_at_its_own_time(
    name, backend, sample_videos, sample_video_truth, frame_index_code
):
    truth = sample_video_truth[name]
    sampled = sample_frames(sample_videos[name], 100, backend=backend)
    indices = sample_indices(truth.num_frames, 100)
    assert sampled.backend == backend
    assert sampled.frames.shape == (100, truth.height, truth.width, 3)
    assert sampled.frames.dtype == np.uint8
    assert frame_indices(sampled.frames, frame_index_code, truth.rotation) == indices.tolist()
    assert sampled.times_s.dtype == np.float32
    np.testing.assert_allclose(sampled.times_s, np.asarray(truth.frame_times_s)[indices], atol=1e-4)
    assert (sampled.info.num_frames, sampled.info.width, sampled.info.height) == (
        truth.num_frames,
        truth.width,
        truth.height,
    )
    assert sampled.info.duration_s == pytest.approx(truth.duration_s, abs=1e-3)


def test_variable_frame_rate_times_are_not_index_over_fps(sample_videos, sample_video_truth):
    truth = sample_video_truth["vfr_offset"]
    sampled = sample_frames(sample_videos["vfr_offset"], truth.num_frames, backend="pyav")
    naive = np.arange(truth.num_frames) / sampled.info.fps
    np.testing.assert_allclose(sampled.times_s, truth.frame_times_s, atol=1e-4)
    assert np.abs(sampled.times_s - naive).max() > 1.0


@needs_decord
@pytest.mark.parametrize("short_side", [None, 64])
@pytest.mark.parametrize("name", DECODABLE)
def test_backends_agree_on_times_and_pixels(name, short_side, sample_videos):
    by_decord = sample_frames(sample_videos[name], 50, short_side=short_side, backend="decord")
    by_pyav = sample_frames(sample_videos[name], 50, short_side=short_side, backend="pyav")
    assert by_decord.frames.shape == by_pyav.frames.shape
    np.testing.assert_allclose(by_decord.times_s, by_pyav.times_s, atol=1e-4)
    assert by_decord.info.num_frames == by_pyav.info.num_frames
    assert by_decord.info.duration_s == pytest.approx(by_pyav.info.duration_s, abs=1e-3)
    difference = np.abs(by_decord.frames.astype(np.int16) - by_pyav.frames).mean()
    # Same decoded pixels at native size; the two libraries' bicubic scalers differ by about a level.
    assert difference < (0.5 if short_side is None else 3.0)


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("name", ["counter_wide_ntsc", "rotated_90"])
def test_short_side_scales_in_the_decoder_keeping_aspect(
    name, backend, sample_videos, sample_video_truth, frame_index_code
):
    truth = sample_video_truth[name]
    sampled = sample_frames(sample_videos[name], 20, short_side=64, backend=backend)
    assert sampled.frames.shape[1:3] == expected_size(truth.width, truth.height, 64)
    assert min(sampled.frames.shape[1:3]) == 64
    assert (sampled.info.width, sampled.info.height) == (truth.width, truth.height)
    indices = sample_indices(truth.num_frames, 20)
    assert frame_indices(sampled.frames, frame_index_code, truth.rotation) == indices.tolist()


@pytest.mark.parametrize("backend", DECODERS)
def test_bytes_decode_like_the_file(backend, sample_videos):
    path = sample_videos["counter_wide_ntsc"]
    from_path = sample_frames(path, 30, short_side=54, backend=backend)
    from_bytes = sample_frames(path.read_bytes(), 30, short_side=54, backend=backend, name="s3://b/k.mp4")
    np.testing.assert_array_equal(from_bytes.frames, from_path.frames)
    np.testing.assert_array_equal(from_bytes.times_s, from_path.times_s)
    assert from_bytes.info == from_path.info


def test_auto_falls_back_to_pyav_where_decord_cannot_read(sample_videos, frame_index_code):
    if "av1" not in sample_videos:
        pytest.skip("this PyAV build cannot write and read AV1")
    sampled = sample_frames(sample_videos["av1"], 10)
    assert sampled.backend == "pyav"
    assert frame_indices(sampled.frames, frame_index_code) == sample_indices(30, 10).tolist()
    if video.decord is not None:
        with pytest.raises(VideoDecodeError, match="decord") as caught:
            sample_frames(sample_videos["av1"], 10, backend="decord")
        assert str(sample_videos["av1"]) in str(caught.value)


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("num_frames", [1, 2])
def test_videos_of_one_or_two_frames(num_frames, backend, tmp_path, frame_index_code):
    # The decoder holds back B-frames; with this few packets every frame only comes out when flushed.
    frames = np.stack([frame_index_code.draw(i, 48, 64) for i in range(num_frames)])
    path = tmp_path / "tiny.mp4"
    write_video(path, frames, 5.0)
    sampled = sample_frames(path, 7, backend=backend)
    assert frame_indices(sampled.frames, frame_index_code) == sample_indices(num_frames, 7).tolist()
    np.testing.assert_allclose(sampled.times_s, sample_indices(num_frames, 7) / 5.0, atol=1e-4)
    assert sampled.info.duration_s == pytest.approx(num_frames / 5.0)


def test_auto_decodes_with_pyav_where_decord_is_not_installed(sample_videos, monkeypatch):
    monkeypatch.setattr(video, "decord", None)
    assert sample_frames(sample_videos["counter_short"], 5).backend == "pyav"
    with pytest.raises(VideoDecodeError, match="decord is not installed"):
        sample_frames(sample_videos["counter_short"], 5, backend="decord")


@needs_decord
def test_auto_prefers_decord(sample_videos):
    assert sample_frames(sample_videos["counter_short"], 5).backend == "decord"


def test_pyav_on_one_thread_decodes_and_scales_on_one_thread(sample_videos):
    # Since PyAV 17 its scaler starts a thread a core unless told otherwise, and a decoder opened with
    # FFmpeg's default count starts a thread a core: on 2 cores that cost one thread's work twice over.
    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], os_threads())
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        time.sleep(0.01)
        before = peak[0]
        for _ in range(3):
            sample_frames(sample_videos["counter_wide_ntsc"], 20, short_side=36, backend="pyav", threads=1)
    finally:
        stop.set()
        watcher.join()
    assert peak[0] - before <= 1  # the scaler's one worker at most


@pytest.mark.parametrize("backend", ["auto", *DECODERS])
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_one_error_type_naming_the_file(name, backend, sample_videos):
    path = sample_videos[name]
    with pytest.raises(VideoDecodeError) as caught:
        sample_frames(path, backend=backend)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    if backend != "decord":
        assert BROKEN[name] in caught.value.reason


@pytest.mark.parametrize("backend", ["auto", *DECODERS])
def test_broken_bytes_are_named_by_the_caller(backend, sample_videos):
    data = sample_videos["truncated"].read_bytes()
    with pytest.raises(VideoDecodeError, match=re.escape("s3://bucket/clip.mp4")):
        sample_frames(data, backend=backend, name="s3://bucket/clip.mp4")
    with pytest.raises(VideoDecodeError, match=re.escape(f"<{len(data)} bytes>")):
        sample_frames(data, backend=backend)
    with pytest.raises(VideoDecodeError, match="empty"):
        sample_frames(b"", backend=backend, name="s3://bucket/empty.mp4")


def test_missing_file_is_a_decode_error(tmp_path):
    missing = tmp_path / "absent.mp4"
    with pytest.raises(VideoDecodeError, match="no such file") as caught:
        sample_frames(missing)
    assert caught.value.path == str(missing)


def test_bad_arguments_are_value_errors(sample_videos):
    path = sample_videos["counter_short"]
    with pytest.raises(ValueError, match="backend"):
        sample_frames(path, backend="opencv")
    with pytest.raises(ValueError, match="num_samples"):
        sample_frames(path, 0)
    with pytest.raises(ValueError, match="short_side"):
        sample_frames(path, short_side=0)


def test_decode_error_survives_pickling_between_processes():
    # Ray and multiprocessing move exceptions between processes by pickling them.
    error = VideoDecodeError("s3://bucket/clip.mp4", "the file has no video stream")
    restored = pickle.loads(pickle.dumps(error))
    assert (restored.path, restored.reason, str(restored)) == (error.path, error.reason, str(error))


@pytest.mark.slow  # importing torch takes seconds
@needs_decord
def test_decord_torch_bridge_in_the_calling_thread_still_gives_numpy(sample_videos):
    pytest.importorskip("torch")
    path = sample_videos["counter_short"]
    native = sample_frames(path, 10, backend="decord")
    with video.decord.bridge.use_torch():
        bridged = sample_frames(path, 10, backend="decord")
    assert isinstance(bridged.frames, np.ndarray)
    np.testing.assert_array_equal(bridged.frames, native.frames)


# --- write_video -------------------------------------------------------------------------------------


def test_written_video_reads_back_frame_for_frame(tmp_path, frame_index_code):
    fps, num_frames = 12.5, 25
    frames = np.stack([frame_index_code.draw(i, 96, 128) for i in range(num_frames)])
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no partial file left beside it
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (num_frames, 128, 96)
    assert info.fps == pytest.approx(fps)
    assert info.duration_s == pytest.approx(num_frames / fps)
    sampled = sample_frames(path, num_frames, backend="pyav")
    assert frame_indices(sampled.frames, frame_index_code) == list(range(num_frames))
    np.testing.assert_allclose(sampled.times_s, np.arange(num_frames) / fps, atol=1e-4)
    assert np.abs(sampled.frames.astype(np.int16) - frames).mean() < 3.0


def test_the_same_frames_always_make_the_same_file(tmp_path):
    """A seed's benchmark is the same files every time. Video 66 of the 400-video benchmark (160 x 120,
    a height x264 pads to 128) came out as 3 different files in 6 encodes on an AVX-512 CPU before x264 was
    held to its AVX2 kernels there; on other CPUs this checks that nothing else varies."""
    from timerefine.data.synthetic import SynthConfig, make_video_spec, render_video, video_id_for, video_rng

    config = SynthConfig(videos=400, seed=0)
    frames = render_video(make_video_spec(video_id_for(66), video_rng(0, 66), config), config)
    contents = set()
    for attempt in range(6):
        path = tmp_path / f"attempt{attempt}.mp4"
        write_video(path, frames, config.fps)
        contents.add(path.read_bytes())
    assert len(contents) == 1


def test_x264_is_held_to_avx2_kernels_exactly_where_the_cpu_has_avx512(monkeypatch):
    assert video._flags_have_avx512("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512dq\n")
    assert not video._flags_have_avx512("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma bmi2\n")
    assert not video._flags_have_avx512("model name\t: avx512f in a name\nflags\t\t: fpu sse2\n")
    monkeypatch.setattr(video, "_cpu_has_avx512", lambda: True)
    kernels = video.x264_options()["x264-params"]
    assert kernels.startswith("asm=") and "AVX2" in kernels and "AVX512" not in kernels
    monkeypatch.setattr(video, "_cpu_has_avx512", lambda: False)
    assert video.x264_options() == {"crf": "23", "preset": "veryfast"}


@pytest.mark.parametrize(
    ("frames", "fps", "complaint"),
    [
        (np.zeros((4, 31, 32, 3), np.uint8), 10.0, "even"),
        (np.zeros((4, 32, 32, 3), np.float32), 10.0, "uint8"),
        (np.zeros((32, 32, 3), np.uint8), 10.0, r"\(N, H, W, 3\)"),
        (np.zeros((0, 32, 32, 3), np.uint8), 10.0, "non-empty"),
        (np.zeros((4, 32, 32, 3), np.uint8), 0.0, "fps"),
    ],
)
def test_write_video_rejects_what_h264_cannot_hold(tmp_path, frames, fps, complaint):
    path = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=complaint):
        write_video(path, frames, fps)
    assert list(tmp_path.iterdir()) == []


# --- the real Charades clip --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def charades_samples(shared_data):
    """The clip sampled by each available backend at native size and at short side 224, decoded once."""
    path = shared_data / CHARADES_CLIP
    backends = ["pyav"] if video.decord is None else ["decord", "pyav"]
    return {
        (backend, short_side): sample_frames(path, 100, short_side=short_side, backend=backend)
        for backend in backends
        for short_side in (None, 224)
    }


@pytest.mark.parametrize("backend", DECODERS)
def test_real_charades_clip(backend, charades_samples):
    native = charades_samples[(backend, None)]
    info = native.info
    assert (info.num_frames, info.width, info.height) == (460, 480, 270)
    assert info.duration_s == pytest.approx(30.6, abs=0.1)
    assert info.fps == pytest.approx(15000 / 1001)
    assert native.frames.shape == (100, 270, 480, 3)
    assert np.all(np.diff(native.times_s) > 0)
    assert native.times_s[0] >= 0
    assert native.times_s[-1] <= info.duration_s
    # A constant-rate clip: each sampled frame sits at its index over the frame rate.
    indices = sample_indices(info.num_frames, 100)
    np.testing.assert_allclose(native.times_s, indices / info.fps, atol=1e-3)
    resized = charades_samples[(backend, 224)]
    assert resized.frames.shape == (100, *expected_size(480, 270, 224), 3)
    assert resized.frames.shape[1] == 224
    np.testing.assert_array_equal(resized.times_s, native.times_s)


def test_real_charades_clip_probe_matches_decoding(shared_data, charades_samples):
    assert probe_video(shared_data / CHARADES_CLIP) == charades_samples[("pyav", None)].info


@needs_decord
def test_backends_agree_on_the_real_charades_clip(charades_samples):
    for short_side, tolerance in ((None, 0.5), (224, 3.0)):
        by_decord, by_pyav = charades_samples[("decord", short_side)], charades_samples[("pyav", short_side)]
        np.testing.assert_allclose(by_decord.times_s, by_pyav.times_s, atol=1e-4)
        assert by_decord.info.duration_s == pytest.approx(by_pyav.info.duration_s, abs=1e-3)
        assert np.abs(by_decord.frames.astype(np.int16) - by_pyav.frames).mean() < tolerance


def test_the_primary_decoder_is_what_reads_every_file_it_can(monkeypatch):
    """What a feature table records: "auto" means decord where it is installed, PyAV where it is not."""
    assert video.primary_decoder("pyav") == "pyav"
    assert video.primary_decoder("decord") == "decord"
    assert video.primary_decoder("auto") == ("pyav" if video.decord is None else "decord")
    monkeypatch.setattr(video, "decord", None)
    assert video.primary_decoder("auto") == "pyav"
    with pytest.raises(ValueError, match="backend must be one of"):
        video.primary_decoder("ffmpeg")
