"""CLIP feature tables: their format, how a part is written, and the readers that load them.

A feature table is a folder (local or ``s3://``) of Parquet files, one row a video, with the schema of
DESIGN.md section 3 (``feature_schema``). Plain pyarrow and pandas read it; no Ray types are stored.
``write_feature_part`` writes one Parquet file per batch of videos, named by a hash of their ids and
written atomically, so a retried write replaces the same file and readers never see half a file.

One row a video holds for plain readers too, not only for ours: a video is written again only after its
old row is gone. ``committed_rows`` lists every row as plain pyarrow reads it, and ``remove_rows`` rewrites
parts without some rows, each part replaced in place under its own name (atomic on local disk and S3), so
a retry first takes a failed video's error row out and then extracts it like a new video: a reader sees
the old row, then no row, then the new one, never two (the extraction job holds the output's writer lock,
``timerefine.data.lock``, meanwhile). ``read_feature_table`` still keeps one row per video, an ok row over
an error row, for tables written before this rule. The stages that make the rows are
``timerefine.decoder.decode_video`` and ``timerefine.encoders.ClipImageEncoder.encode``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from timerefine.data.storage import Storage, StorageError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = b"timerefine.features"
PART_SUFFIX = ".parquet"
STATUS_OK = "ok"
STATUS_ERROR = "error"


def feature_schema(num_frames: int, dim: int, encoder: str, decoder: str | None = None) -> pa.Schema:
    """The feature table's schema; ``features`` is Arrow's canonical fixed-shape tensor (T, dim) float16.

    Readers without tensor support see its storage type, a fixed-size list of T * dim float16; the
    schema metadata repeats the shape and the encoder, and names the decoder the extraction read files
    with (``timerefine.video.primary_decoder``): two decoders' frames of one file differ slightly, so a
    resumed extraction must not switch. The ``decoder`` column says which one read each row's file (an
    "auto" extraction reads what decord cannot with PyAV); tables written before it have neither.
    """
    metadata = {"version": FORMAT_VERSION, "encoder": encoder, "num_frames": num_frames, "dim": dim}
    if decoder is not None:
        metadata["decoder"] = decoder
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
            ("decoder", pa.string()),  # null on error rows
        ],
        metadata={METADATA_KEY: json.dumps(metadata)},
    )


def table_metadata(schema: pa.Schema) -> dict:
    """The ``timerefine.features`` metadata of a feature table's schema (encoder, num_frames, dim)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a timerefine feature table: its schema has no timerefine.features metadata")
    return json.loads(raw)


def feature_rows_to_table(
    rows: Sequence[dict],
    features: dict[str, np.ndarray],
    num_frames: int,
    dim: int,
    encoder: str,
    decoder: str | None = None,
) -> pa.Table:
    """Build a feature table from row dicts and a video_id -> (T, dim) array map (absent for errors);
    ``decoder`` is the extraction's (the schema metadata's), each row's own ``decoder`` its column."""
    schema = feature_schema(num_frames, dim, encoder, decoder)
    tensor_type = schema.field("features").type
    # One float16 buffer for the whole column (error rows are null slots of zeros): pa.array over a list of
    # per-video arrays converted element by element, 34 ms a video, about a seventh of encoding it.
    values = np.zeros((len(rows), num_frames * dim), dtype=np.float16)
    missing = np.ones(len(rows), dtype=bool)
    for index, row in enumerate(rows):
        if row["video_id"] in features:
            values[index] = features[row["video_id"]].reshape(-1)
            missing[index] = False
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), num_frames * dim, mask=pa.array(missing)
    )
    columns = {name: [row.get(name) for row in rows] for name in schema.names if name != "features"}
    columns["features"] = pa.ExtensionArray.from_storage(tensor_type, storage)
    columns["encoder"] = [encoder] * len(rows)  # the table's, whatever the rows say
    return pa.table({field.name: columns[field.name] for field in schema}, schema=schema)


# ---------------------------------------------------------------------------------------------------
# Writing


def part_name(video_ids: Iterable[str]) -> str:
    """A part file's name, fixed by the videos it holds: a retried write replaces it, never duplicates it."""
    digest = hashlib.sha256("\n".join(sorted(video_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}{PART_SUFFIX}"


def write_feature_part(table: pa.Table, output_uri: str, storage: Storage) -> str:
    """Write one Parquet file of feature rows into ``output_uri``, atomically; returns its URI."""
    uri = f"{output_uri.rstrip('/')}/{part_name(table.column('video_id').to_pylist())}"
    _write_part(table, uri, storage)
    return uri


def _write_part(table: pa.Table, uri: str, storage: Storage) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue())


def remove_rows(removals: Mapping[str, set[str]], storage: Storage) -> int:
    """Rewrite each part URI of ``removals`` without the rows of its video ids; returns the rows removed.

    Each part keeps its name and is replaced in one atomic write (or deleted when nothing is left), so a
    reader sees it before or after, and a crash midway leaves every part whole.
    """
    removed = 0
    for uri, video_ids in sorted(removals.items()):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
        keep = pc.invert(pc.is_in(table.column("video_id"), pa.array(sorted(video_ids), pa.string())))
        kept = table.filter(keep)
        removed += table.num_rows - kept.num_rows
        if kept.num_rows == table.num_rows:
            continue
        if kept.num_rows:
            _write_part(kept, uri, storage)
        else:
            storage.delete(uri)
    return removed


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
    decoder: str | None = None  # "decord" or "pyav" (None in tables from before it was recorded)


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
    dataset, table = _read_parts(uri, filesystem, paths, wanted)
    if "encoder" in table.column_names:
        encoders = {value for value in table.column("encoder").unique().to_pylist() if value is not None}
        if len(encoders) > 1:
            raise ValueError(
                f"{uri}: rows from several encoders ({', '.join(sorted(encoders))}); one per table"
            )
    return _one_row_per_video(table).replace_schema_metadata(dataset.schema.metadata)


@dataclass
class CommittedRows:
    """Every row of a table as plain pyarrow reads it (video_id, status, part URI), and its metadata."""

    video_ids: list[str]
    statuses: list[str]
    parts: list[str]
    metadata: dict | None  # the table's timerefine.features metadata; None for an empty output

    def _kept(self) -> dict[str, int]:
        """The row kept for each video: its first ok row, else its last error row."""
        kept: dict[str, int] = {}
        for index, video_id in enumerate(self.video_ids):
            previous = kept.get(video_id)
            if previous is None or self.statuses[previous] != STATUS_OK:
                kept[video_id] = index
        return kept

    def status_by_video(self) -> dict[str, str]:
        return {video_id: self.statuses[index] for video_id, index in self._kept().items()}

    def extra_rows(self) -> dict[str, set[str]]:
        """part URI -> ids of the videos whose row there is one too many (left by older versions)."""
        kept = set(self._kept().values())
        return _by_part(
            (self.parts[i], self.video_ids[i]) for i in range(len(self.video_ids)) if i not in kept
        )

    def rows_of(self, video_ids: set[str]) -> dict[str, set[str]]:
        """part URI -> which of ``video_ids`` have a row there."""
        return _by_part(
            (part, video_id)
            for part, video_id in zip(self.parts, self.video_ids, strict=True)
            if video_id in video_ids
        )


def _by_part(rows: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = defaultdict(set)
    for part, video_id in rows:
        grouped[part].add(video_id)
    return dict(grouped)


def committed_rows(uri: str, storage: Storage | None = None) -> CommittedRows:
    """What an earlier run left, row by row, before any deduplication (empty for a new output)."""
    storage = storage or Storage()
    parts = part_uris(uri, storage)
    if not parts:
        return CommittedRows([], [], [], None)
    filesystem, _ = storage.resolve(parts[0])
    uri_of_path = {storage.resolve(part)[1]: part for part in parts}
    dataset, table = _read_parts(uri, filesystem, list(uri_of_path), ["video_id", "status", "__filename"])
    return CommittedRows(
        table.column("video_id").to_pylist(),
        table.column("status").to_pylist(),
        [uri_of_path[path] for path in table.column("__filename").to_pylist()],
        table_metadata(dataset.schema),
    )


def ok_video_ids(uri: str, storage: Storage | None = None) -> tuple[set[str], int]:
    """The ids of the videos with an ok row, and how many videos the table has in all."""
    table = read_feature_table(uri, storage, columns=["video_id", "status"])
    statuses = zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True)
    return {video_id for video_id, status in statuses if status == STATUS_OK}, table.num_rows


def committed_statuses(uri: str, storage: Storage | None = None) -> tuple[dict[str, str], dict | None]:
    """What an earlier run left: video_id -> "ok" / "error", and the table's metadata (None if empty)."""
    committed = committed_rows(uri, storage)
    return committed.status_by_video(), committed.metadata


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
            decoder=row.get("decoder"),
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


def _read_parts(
    uri: str, filesystem, paths: list[str], columns: list[str] | None
) -> tuple[pads.Dataset, pa.Table]:
    """The part files of the table at ``uri`` as a dataset (its schema holds the table's metadata) and the
    columns asked for, with Arrow's and the storage's errors told as
    bad input (parts of different extractions) or as storage errors, naming the table."""
    try:
        dataset = pads.dataset(paths, filesystem=filesystem, format="parquet")
        dataset = dataset.replace_schema(_table_schema(dataset))
        return dataset, dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(
            f"{uri}: the part files do not share one schema (mixed extractions?): {error}"
        ) from error
    except OSError as error:
        raise StorageError(f"cannot read the feature table {uri}: {error}") from error


def _table_schema(dataset: pads.FileSystemDataset) -> pa.Schema:
    """Every part's columns, not only the first part's (what Arrow would read): a table resumed after a
    column was added (``decoder``) holds parts with and without it. Its metadata is a part's that names the
    decoder, where one does (what a resumed extraction checks)."""
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    recorded = [s for s in schemas if METADATA_KEY in (s.metadata or {}) and "decoder" in table_metadata(s)]
    return pa.unify_schemas(schemas).with_metadata((recorded or schemas)[0].metadata)
