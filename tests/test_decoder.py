"""Isolated decoding, one video at a time: frames and timing, or the failure's reason, whatever the file
does to the decoder (breaks it, hangs it, crashes it, blows its memory)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from timerefine.data.storage import Storage
from timerefine.decoder import DecodedVideo, DecodeSettings, IsolatedDecoder, decode_video
from timerefine.video import primary_decoder, sample_indices

NUM_FRAMES = 12
SETTINGS = DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128, timeout_s=60)


@pytest.fixture(scope="module")
def decoder():
    decoder = IsolatedDecoder(SETTINGS)
    yield decoder
    decoder.close()


def decode(decoder: IsolatedDecoder, path) -> DecodedVideo:
    return decode_video(path.stem, str(path), Storage(), decoder)


def test_a_video_decodes_into_a_row_of_cropped_frames(decoder, sample_videos, sample_video_truth):
    path = sample_videos["counter_10fps"]
    truth = sample_video_truth["counter_10fps"]

    video = decode(decoder, path)

    assert (video.ok, video.error) == (True, None)
    assert (video.video_id, video.uri) == ("counter_10fps", str(path))
    assert video.decoder == primary_decoder("auto")
    assert video.num_frames == truth.num_frames
    assert video.fps == pytest.approx(truth.fps)
    assert video.duration_s == pytest.approx(truth.duration_s, abs=0.01)
    assert video.frames.shape == (NUM_FRAMES, 128, 128, 3) and video.frames.dtype == np.uint8
    times = np.asarray(video.frame_times_s)
    expected = np.asarray(truth.frame_times_s)[sample_indices(truth.num_frames, NUM_FRAMES)]
    np.testing.assert_allclose(times, expected, atol=1e-3)


def test_settings_name_a_decoder_it_knows():
    with pytest.raises(ValueError, match="backend must be one of"):
        DecodeSettings(decoder="ffmpeg")


def test_frames_stay_as_decoded_when_the_next_video_comes_through_the_shared_buffer(decoder, sample_videos):
    first = decoder.decode(str(sample_videos["counter_10fps"]), name="first")
    kept = first.frames.copy()

    second = decoder.decode(str(sample_videos["rotated_90"]), name="second")

    np.testing.assert_array_equal(first.frames, kept)  # a copy, not a view of the buffer
    assert not np.array_equal(second.frames, kept)


def test_frames_can_go_into_a_callers_array_which_a_failure_leaves_untouched(decoder, sample_videos):
    out = np.zeros((NUM_FRAMES, 128, 128, 3), dtype=np.uint8)
    expected = decoder.decode(str(sample_videos["counter_10fps"]), name="expected").frames

    sampled = decoder.decode(str(sample_videos["counter_10fps"]), name="into", out=out)

    assert sampled.frames is out
    np.testing.assert_array_equal(out, expected)
    out[...] = 7
    failed = decode_video("not_video", str(sample_videos["not_video"]), Storage(), decoder, out=out)
    assert not failed.ok and (out == 7).all()
    with pytest.raises(ValueError, match="out must have the frames' shape"):
        decoder.decode(str(sample_videos["counter_10fps"]), name="small", out=out[:, :64])


def test_bytes_decode_like_the_file(decoder, sample_videos):
    path = sample_videos["vfr_offset"]

    from_file = decoder.decode(str(path), name="vfr_offset")
    from_bytes = decoder.decode(path.read_bytes(), name="vfr_offset")

    np.testing.assert_array_equal(from_file.frames, from_bytes.frames)
    np.testing.assert_array_equal(from_file.times_s, from_bytes.times_s)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero_byte", "empty (0 bytes)"),
        ("truncated", ""),
        ("truncated_faststart", ""),
        ("not_video", "Invalid data"),
        ("audio_only", ""),
        ("empty_video_stream", ""),
    ],
)
def test_a_broken_video_becomes_an_error_row_with_the_reason(decoder, sample_videos, name, reason):
    video = decode(decoder, sample_videos[name])

    assert not video.ok
    assert reason in video.error and len(video.error) > 10
    assert (video.frames, video.frame_times_s, video.duration_s) == (None, None, None)


def test_a_missing_file_becomes_an_error_row(decoder, tmp_path):
    video = decode_video("gone", str(tmp_path / "gone.mp4"), Storage(), decoder)
    assert (video.ok, video.error) == (False, "no such file")


def test_a_decoder_past_its_timeout_is_stopped_and_the_next_video_decodes(sample_videos, shared_data):
    decoder = IsolatedDecoder(DecodeSettings(num_frames=100, timeout_s=0.05))
    try:
        started = time.monotonic()
        hung = decode_video(
            "charades", str(shared_data / "videos" / "charades_Y1HGC.mp4"), Storage(), decoder
        )
        assert time.monotonic() - started < 5
        assert not hung.ok
        assert hung.error == "decoding took longer than 0.05 s; stopped"
        assert decoder.pid is None  # killed, not left running

        decoder.settings = DecodeSettings(num_frames=100, timeout_s=60)
        assert decode(decoder, sample_videos["counter_short"]).ok
    finally:
        decoder.close()


def kill_decoder_during_decode(decoder: IsolatedDecoder, times: int) -> threading.Thread:
    """Kill the decoder's child ``times`` times, each soon after a (re)started child shows up."""

    def killer() -> None:
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while len(killed) < times and time.monotonic() < deadline:
            pid = decoder.pid
            if pid is not None and pid not in killed:
                time.sleep(0.05)  # let the request reach it
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread


def test_a_decoder_crash_is_retried_once_in_a_fresh_process(shared_data):
    decoder = IsolatedDecoder(DecodeSettings(num_frames=100))
    video = shared_data / "videos" / "charades_Y1HGC.mp4"
    try:
        decoder.decode(str(video), name="warm-up")  # the child is up before the killer looks for it
        killer = kill_decoder_during_decode(decoder, times=1)
        decoded = decode_video("charades", str(video), Storage(), decoder)
        killer.join()
        assert decoded.ok

        killer = kill_decoder_during_decode(decoder, times=2)
        decoded = decode_video("charades", str(video), Storage(), decoder)
        killer.join()
        assert not decoded.ok
        assert decoded.error == "the decoder process died with SIGKILL (out of memory?), 2 times"
    finally:
        decoder.close()


def test_a_decoder_over_its_memory_cap_fails_that_video_only(sample_videos):
    # 100 frames at 224 px: 27 MB of frames before the crop, more than the 8 MB the decoder may add.
    decoder = IsolatedDecoder(DecodeSettings(num_frames=100, memory_limit_mb=8))
    try:
        video = decode(decoder, sample_videos["counter_wide_ntsc"])
    finally:
        decoder.close()
    assert not video.ok
    assert "memory" in video.error.lower()
