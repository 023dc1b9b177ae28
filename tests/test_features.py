"""The feature table: atomic part files, and the readers (plain pyarrow and pandas, deduplication, numpy
loading)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from timerefine.data.storage import Storage
from timerefine.features import (
    STATUS_ERROR,
    STATUS_OK,
    committed_rows,
    committed_statuses,
    feature_rows_to_table,
    load_features,
    part_name,
    read_feature_table,
    remove_rows,
    write_feature_part,
)


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


def write_rows(folder, rows: list[dict], encoder: str = "enc@1") -> str:
    features = {
        row["video_id"]: np.full((2, 3), len(row["video_id"]), np.float16)
        for row in rows
        if row["status"] == STATUS_OK
    }
    return write_feature_part(feature_rows_to_table(rows, features, 2, 3, encoder), str(folder), Storage())


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


@pytest.mark.parametrize("old_ids", [["s"], ["z"]])  # the old part's name sorts first, then last
def test_a_table_resumed_across_the_decoder_column_reads_as_one(tmp_path, old_ids):
    """Parts written before the ``decoder`` column (and its metadata) existed and parts written after it
    are one table: each reader gets every row, the old rows without a decoder, whichever part Arrow
    happens to read first."""
    old_rows = [row(video_id, STATUS_OK) for video_id in old_ids]
    old = feature_rows_to_table(old_rows, {v: np.ones((2, 3), np.float16) for v in old_ids}, 2, 3, "enc@1")
    old = old.drop_columns(["decoder"]).replace_schema_metadata(
        {b"timerefine.features": b'{"version": 1, "encoder": "enc@1", "num_frames": 2, "dim": 3}'}
    )
    pq.write_table(old, tmp_path / part_name(old_ids))
    new = [row("m", STATUS_OK) | {"decoder": "pyav"}, row("n", STATUS_ERROR)]
    new_table = feature_rows_to_table(new, {"m": np.ones((2, 3), np.float16)}, 2, 3, "enc@1", "decord")
    write_feature_part(new_table, str(tmp_path), Storage())

    table = read_feature_table(str(tmp_path))
    assert sorted(table.column("video_id").to_pylist()) == sorted([*old_ids, "m", "n"])
    assert sorted(load_features(str(tmp_path))) == sorted([*old_ids, "m"])
    assert committed_statuses(str(tmp_path))[0] == {old_ids[0]: STATUS_OK, "m": STATUS_OK, "n": STATUS_ERROR}
    decoders = dict(zip(*(table.column(name).to_pylist() for name in ("video_id", "decoder")), strict=True))
    assert decoders == {old_ids[0]: None, "m": "pyav", "n": None}
    assert committed_rows(str(tmp_path)).metadata["decoder"] == "decord"  # what a resumed run checks


def test_an_empty_folder_has_no_committed_videos_and_no_table(tmp_path):
    assert committed_statuses(str(tmp_path / "new")) == ({}, None)
    with pytest.raises(FileNotFoundError, match="no feature table"):
        read_feature_table(str(tmp_path))


def test_rows_are_removed_by_rewriting_each_part_in_place(tmp_path):
    first = write_rows(tmp_path, [row("a", STATUS_OK), row("bb", STATUS_ERROR)])
    second = write_rows(tmp_path, [row("bb", STATUS_OK)])  # bb doubled, as older versions left it
    third = write_rows(tmp_path, [row("ccc", STATUS_ERROR)])
    committed = committed_rows(str(tmp_path))
    rows = sorted(zip(committed.video_ids, committed.parts, strict=True))
    assert rows == sorted([("a", first), ("bb", first), ("bb", second), ("ccc", third)])
    assert committed.extra_rows() == {first: {"bb"}}
    assert committed.rows_of({"ccc", "zz"}) == {third: {"ccc"}}  # a retried video's error row

    removed = remove_rows({**committed.extra_rows(), **committed.rows_of({"ccc"})}, Storage())

    assert removed == 2
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(first), os.path.basename(second)])
    plain = pd.read_parquet(tmp_path)  # a plain reader: one row a video
    assert sorted(zip(plain.video_id, plain.status, strict=True)) == [("a", STATUS_OK), ("bb", STATUS_OK)]
    rewritten = pq.read_table(first)
    assert rewritten.schema == pq.read_table(second).schema  # the tensor type and metadata survive
    np.testing.assert_array_equal(
        rewritten.column("features").chunk(0).to_numpy_ndarray()[0], np.ones((2, 3))
    )
