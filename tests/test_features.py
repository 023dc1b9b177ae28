"""Feature-table stages without Ray: isolated decoding into rows (errors included), encoding, atomic
part files, and the readers (plain pyarrow and pandas, deduplication, numpy loading)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from timerefine.data.storage import Storage
from timerefine.encoders import ClipImageEncoder
from timerefine.features import (
    DECODED_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    DecodeSettings,
    IsolatedDecoder,
    committed_statuses,
    decode_video,
    encode_videos,
    feature_rows_to_table,
    load_features,
    part_name,
    read_feature_table,
    table_metadata,
    write_feature_part,
)
from timerefine.video import sample_indices

NUM_FRAMES = 12
SETTINGS = DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128, timeout_s=60)


@pytest.fixture(scope="module")
def decoder():
    decoder = IsolatedDecoder(SETTINGS)
    yield decoder
    decoder.close()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> ClipImageEncoder:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEREFINE_HOME", str(tmp_path_factory.mktemp("timerefine_home")))
        return ClipImageEncoder(None, threads=1)


def decode(decoder: IsolatedDecoder, path) -> dict:
    return decode_video(path.stem, str(path), Storage(), decoder)


def test_a_video_decodes_into_a_row_of_cropped_frames(decoder, sample_videos, sample_video_truth):
    path = sample_videos["counter_10fps"]
    truth = sample_video_truth["counter_10fps"]

    row = decode(decoder, path)

    assert (row["status"], row["error"]) == (STATUS_OK, None)
    assert (row["video_id"], row["uri"]) == ("counter_10fps", str(path))
    assert row["num_frames"] == truth.num_frames
    assert row["fps"] == pytest.approx(truth.fps)
    assert row["duration_s"] == pytest.approx(truth.duration_s, abs=0.01)
    assert len(row["frames"]) == NUM_FRAMES * 128 * 128 * 3
    times = np.asarray(row["frame_times_s"])
    expected = np.asarray(truth.frame_times_s)[sample_indices(truth.num_frames, NUM_FRAMES)]
    np.testing.assert_allclose(times, expected, atol=1e-3)
    assert pa.Table.from_pylist([row], schema=DECODED_SCHEMA).num_rows == 1


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
    row = decode(decoder, sample_videos[name])

    assert row["status"] == STATUS_ERROR
    assert reason in row["error"] and len(row["error"]) > 10
    assert (row["frames"], row["frame_times_s"], row["duration_s"]) == (b"", None, None)


def test_a_missing_file_becomes_an_error_row(decoder, tmp_path):
    row = decode_video("gone", str(tmp_path / "gone.mp4"), Storage(), decoder)
    assert (row["status"], row["error"]) == (STATUS_ERROR, "no such file")


def test_a_decoder_past_its_timeout_is_stopped_and_the_next_video_decodes(sample_videos, shared_data):
    decoder = IsolatedDecoder(DecodeSettings(num_frames=100, timeout_s=0.05))
    try:
        started = time.monotonic()
        hung = decode_video(
            "charades", str(shared_data / "videos" / "charades_Y1HGC.mp4"), Storage(), decoder
        )
        assert time.monotonic() - started < 5
        assert hung["status"] == STATUS_ERROR
        assert hung["error"] == "decoding took longer than 0.05 s; stopped"
        assert decoder.pid is None  # killed, not left running

        decoder.settings = DecodeSettings(num_frames=100, timeout_s=60)
        assert decode(decoder, sample_videos["counter_short"])["status"] == STATUS_OK
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
        row = decode_video("charades", str(video), Storage(), decoder)
        killer.join()
        assert row["status"] == STATUS_OK

        killer = kill_decoder_during_decode(decoder, times=2)
        row = decode_video("charades", str(video), Storage(), decoder)
        killer.join()
        assert row["status"] == STATUS_ERROR
        assert row["error"] == "the decoder process died with SIGKILL (out of memory?), 2 times"
    finally:
        decoder.close()


def test_a_decoder_over_its_memory_cap_fails_that_video_only(sample_videos):
    decoder = IsolatedDecoder(DecodeSettings(num_frames=NUM_FRAMES, memory_limit_mb=8))
    try:
        row = decode(decoder, sample_videos["counter_wide_ntsc"])
    finally:
        decoder.close()
    assert row["status"] == STATUS_ERROR
    assert "memory" in row["error"].lower()


def decoded_table(decoder: IsolatedDecoder, paths) -> pa.Table:
    return pa.Table.from_pylist([decode(decoder, path) for path in paths], schema=DECODED_SCHEMA)


def test_encoding_fills_the_feature_schema_and_passes_errors_through(decoder, tiny_encoder, sample_videos):
    paths = [sample_videos["counter_10fps"], sample_videos["not_video"], sample_videos["rotated_90"]]
    decoded = decoded_table(decoder, paths)

    table = encode_videos(tiny_encoder, decoded, NUM_FRAMES, batch_size=7)

    assert table.column("video_id").to_pylist() == ["counter_10fps", "not_video", "rotated_90"]
    assert table.column("status").to_pylist() == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert table.column("encoder").to_pylist() == [tiny_encoder.identity] * 3
    metadata = table_metadata(table.schema)
    assert metadata == {"version": 1, "encoder": tiny_encoder.identity, "num_frames": NUM_FRAMES, "dim": 768}
    features = table.column("features").combine_chunks()
    assert features.is_null().to_pylist() == [False, True, False]
    frames = np.frombuffer(decoded.column("frames")[2].as_py(), np.uint8).reshape(NUM_FRAMES, 128, 128, 3)
    expected = tiny_encoder.encode(frames)
    stored = np.asarray(features.storage[2].as_py(), dtype=np.float16).reshape(NUM_FRAMES, 768)
    np.testing.assert_allclose(stored, expected, atol=2e-3 * np.abs(expected).max())  # fp16: batch-size noise


def test_a_feature_part_reads_back_in_plain_pyarrow_and_pandas(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"video_id": "a", "uri": "/v/a.mp4", "duration_s": 3.0, "fps": 10.0, "num_frames": 30,
         "frame_times_s": [0.0, 1.5, 2.9], "status": STATUS_OK, "error": None},
        {"video_id": "b", "uri": "/v/b.mp4", "status": STATUS_ERROR, "error": "no such file"},
    ]  # fmt: skip
    features = {"a": rng.standard_normal((3, 4)).astype(np.float16)}
    part = write_feature_part(feature_rows_to_table(rows, features, 3, 4, "enc@1"), str(tmp_path), Storage())

    assert part == str(tmp_path / part_name(["b", "a"]))
    assert sorted(os.listdir(tmp_path)) == [part_name(["a", "b"])]  # no partial file left behind
    table = pq.read_table(part)
    assert table.schema.field("features").type == pa.fixed_shape_tensor(pa.float16(), (3, 4))
    tensors = table.column("features").combine_chunks()
    assert tensors.is_null().to_pylist() == [False, True]
    np.testing.assert_array_equal(tensors.filter(tensors.is_valid()).to_numpy_ndarray()[0], features["a"])
    frame = pd.read_parquet(part)
    assert frame["video_id"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(frame["features"][0].reshape(3, 4), features["a"])
    assert frame["features"][1] is None and frame["error"][1] == "no such file"


def write_rows(folder, rows: list[dict], encoder: str = "enc@1") -> None:
    features = {
        row["video_id"]: np.full((2, 3), len(row["video_id"]), np.float16)
        for row in rows
        if row["status"] == STATUS_OK
    }
    write_feature_part(feature_rows_to_table(rows, features, 2, 3, encoder), str(folder), Storage())


def row(video_id: str, status: str) -> dict:
    return {"video_id": video_id, "uri": f"/v/{video_id}.mp4", "duration_s": 1.0, "fps": 2.0,
            "num_frames": 2, "frame_times_s": [0.0, 0.5], "status": status,
            "error": None if status == STATUS_OK else "boom"}  # fmt: skip


def test_the_reader_keeps_one_row_per_video_preferring_ok(tmp_path):
    write_rows(tmp_path, [row("a", STATUS_OK), row("bb", STATUS_ERROR), row("ccc", STATUS_ERROR)])
    write_rows(tmp_path, [row("bb", STATUS_OK)])  # a later --retry-errors run
    (tmp_path / ".part-partial.parquet.123.partial").write_bytes(b"half a file")  # an interrupted write

    table = read_feature_table(str(tmp_path))
    statuses, metadata = committed_statuses(str(tmp_path))
    loaded = load_features(str(tmp_path), dtype=np.float32)

    kept = zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True)
    assert sorted(kept) == [("a", STATUS_OK), ("bb", STATUS_OK), ("ccc", STATUS_ERROR)]
    assert statuses == {"a": STATUS_OK, "bb": STATUS_OK, "ccc": STATUS_ERROR}
    assert metadata["encoder"] == "enc@1"
    assert sorted(loaded) == ["a", "bb"]
    assert loaded["bb"].features.dtype == np.float32
    np.testing.assert_array_equal(loaded["bb"].features, np.full((2, 3), 2.0))
    np.testing.assert_array_equal(loaded["a"].frame_times_s, [0.0, 0.5])
    assert (loaded["a"].duration_s, loaded["a"].uri) == (1.0, "/v/a.mp4")


def test_rewriting_the_same_videos_replaces_their_part(tmp_path):
    write_rows(tmp_path, [row("a", STATUS_ERROR), row("b", STATUS_OK)])
    write_rows(tmp_path, [row("b", STATUS_OK), row("a", STATUS_OK)])  # a retried write task

    assert os.listdir(tmp_path) == [part_name(["a", "b"])]
    assert committed_statuses(str(tmp_path))[0] == {"a": STATUS_OK, "b": STATUS_OK}


def test_a_table_mixing_encoders_is_refused(tmp_path):
    write_rows(tmp_path, [row("a", STATUS_OK)], encoder="enc@1")
    write_rows(tmp_path, [row("b", STATUS_OK)], encoder="enc@2")

    with pytest.raises(ValueError, match="several encoders"):
        read_feature_table(str(tmp_path))


def test_an_empty_folder_has_no_committed_videos_and_no_table(tmp_path):
    assert committed_statuses(str(tmp_path / "new")) == ({}, None)
    with pytest.raises(FileNotFoundError, match="no feature table"):
        read_feature_table(str(tmp_path))
