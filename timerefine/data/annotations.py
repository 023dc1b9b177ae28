"""Annotation readers: Charades-STA, ActivityNet Captions, QVHighlights and our own JSONL.

Every reader turns its file into :class:`Query` objects, the rows of our JSONL contract
(DESIGN.md section 3), and applies the same three rules. Each rule is counted in the
:class:`ReadSummary`, so a row is never dropped without the user being told:

1. Duration. A row keeps the duration its file gives. Where the file has none (Charades-STA always,
   our JSONL optionally) it comes from ``durations`` (a mapping, or the Charades metadata CSV whose
   ``length`` column is the video duration). A row whose duration is still unknown is an error:
   guessing one would silently shift every normalised time of that video.
2. Clamping. Every window is clamped to ``[0, duration]``. Ends past the duration are common
   (Charades action ends were annotated up to ~32 s whatever the real length) and are counted as
   ``clamped_end``; starts below 0 are counted as ``clamped_start``.
3. Rejection. After clamping, a window with ``start >= end`` covers no time and is dropped. A query
   left with no window is rejected (``rejected``, its line and qid kept in ``rejected_lines`` and
   ``rejected_qids``); a window
   dropped from a query that keeps others is counted as ``rejected_windows``.

A malformed file (broken JSON, a missing field, a value that is not a number, a duplicate qid)
raises :class:`AnnotationError`, whose message names the file, the 1-based line and what to fix.

Every file (annotations and durations) may be a local path or an ``s3://`` URI, read through a
:class:`~timerefine.data.storage.Storage`: on a Ray cluster the uploaded working directory leaves out
git-ignored data folders, so annotations live in S3 beside the features.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timerefine.data.storage import Storage, is_s3_uri

FORMATS = ("charades-sta", "activitynet", "qvhighlights", "jsonl")

_CHARADES_HINT = "pass durations='Charades_v1_test.csv' (CLI: --durations Charades_v1_test.csv)"


class AnnotationError(ValueError):
    """A problem in an annotation file, reported as ``file:line: reason``."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        location = source if line is None else f"{source}:{line}"
        super().__init__(f"{location}: {reason}")

    def __reduce__(self) -> tuple[type[AnnotationError], tuple[str, int | None, str]]:
        # The default pickling replays ValueError's single message argument into our three-argument
        # __init__, which fails; Ray pickles exceptions raised inside tasks, so rebuild from the parts.
        return type(self), (self.source, self.line, self.reason)


@dataclass(frozen=True, slots=True)
class Query:
    """One sentence to ground in one video; times in seconds, every window inside [0, duration]."""

    qid: str
    video_id: str
    duration: float
    query: str
    windows: tuple[tuple[float, float], ...]
    split: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"query {self.qid!r}: duration must be a positive number, got {self.duration}")
        if not self.windows:
            raise ValueError(f"query {self.qid!r}: needs at least one window")
        for start, end in self.windows:
            if not 0 <= start < end <= self.duration:
                raise ValueError(
                    f"query {self.qid!r}: window [{start}, {end}] must satisfy "
                    f"0 <= start < end <= duration ({self.duration})"
                )

    def to_dict(self) -> dict[str, Any]:
        """The row of our JSONL contract; ``split`` is left out when unknown."""
        row: dict[str, Any] = {
            "qid": self.qid,
            "video_id": self.video_id,
            "duration": self.duration,
            "query": self.query,
            "windows": [[start, end] for start, end in self.windows],
        }
        if self.split is not None:
            row["split"] = self.split
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], *, source: str = "<dict>", line: int | None = None) -> Query:
        """Build a Query from a row of our JSONL contract, strictly.

        Unlike :func:`read_annotations`, no rule is applied here: a row needs its ``qid`` and
        ``duration``, and a window outside ``[0, duration]`` is an error rather than clamped, because a
        single row has no summary in which a repair could be reported.
        """
        raw = _parse_jsonl_row(row, source, line)
        if raw.qid is None:
            raise AnnotationError(source, line, "missing field 'qid'")
        if raw.duration is None:
            raise AnnotationError(source, line, "missing field 'duration'")
        try:
            return cls(raw.qid, raw.video_id, raw.duration, raw.query, tuple(raw.windows), raw.split)
        except ValueError as error:
            raise AnnotationError(
                source, line, f"{error}; read the file with read_annotations() to clamp windows"
            ) from None


@dataclass
class ReadSummary:
    """What one read did: how many queries came out and how often each rule fired."""

    path: str
    format: str
    queries: int = 0
    videos: int = 0
    windows: int = 0
    clamped_end: int = 0
    clamped_start: int = 0
    rejected: int = 0
    rejected_windows: int = 0
    rejected_lines: list[int] = field(default_factory=list)
    rejected_qids: list[str] = field(default_factory=list)
    durations_from_table: int = 0

    def describe(self) -> str:
        """One or two human lines for stderr."""
        counted = f"{self.queries} queries"
        if self.windows != self.queries:
            counted += f" ({self.windows} windows)"
        parts = [f"{Path(self.path).name} ({self.format}): {counted} over {self.videos} videos"]
        parts.append(f"{self.clamped_end} ends clamped to the duration")
        if self.clamped_start:
            parts.append(f"{self.clamped_start} starts clamped to 0")
        rejected = f"{self.rejected} rows rejected (start >= end)"
        if self.rejected:
            # An ActivityNet file is one JSON line, where only the qid tells the rows apart.
            if self.format == "activitynet":
                where, names = "qids", self.rejected_qids
            else:
                where, names = "lines", self.rejected_lines
            rejected += f" at {where} {', '.join(map(str, names[:5]))}" + (", ..." if len(names) > 5 else "")
        parts.append(rejected)
        if self.rejected_windows:
            parts.append(f"{self.rejected_windows} windows dropped from kept queries (start >= end)")
        if self.durations_from_table and self.format != "charades-sta":
            parts.append(f"{self.durations_from_table} durations taken from the durations table")
        return "; ".join(parts)


def detect_format(path: str | Path, storage: Storage | None = None) -> str:
    """The format of an annotation file, one of :data:`FORMATS`, judged from its content."""
    source = str(path)
    return _detect(_read_text(source, storage), source)


def read_durations(path: str | Path, storage: Storage | None = None) -> dict[str, float]:
    """Video durations in seconds from a Charades metadata CSV (columns ``id`` and ``length``)."""
    source = str(path)
    reader = csv.reader(io.StringIO(_read_text(source, storage), newline=""))
    header = next(reader, None)
    if header is None:
        raise AnnotationError(source, 1, "file is empty; expected a CSV with columns id and length")
    header = [name.strip() for name in header]
    missing = [name for name in ("id", "length") if name not in header]
    if missing:
        raise AnnotationError(
            source,
            1,
            f"missing column(s) {', '.join(missing)}; found {', '.join(header)} (Charades_v1_*.csv)",
        )
    id_column, length_column = header.index("id"), header.index("length")
    durations: dict[str, float] = {}
    # A quoted field may span lines, so a record starts just after the previous record ended.
    record_line = reader.line_num + 1
    for record in reader:
        if any(value.strip() for value in record):
            if len(record) != len(header):
                raise AnnotationError(
                    source,
                    record_line,
                    f"expected {len(header)} fields as in the header, found {len(record)}",
                )
            video_id = record[id_column].strip()
            duration = _number_from_text(record[length_column], "length", source, record_line)
            if duration <= 0:
                raise AnnotationError(source, record_line, f"length of video {video_id!r} must be positive")
            if durations.get(video_id, duration) != duration:
                raise AnnotationError(
                    source, record_line, f"video {video_id!r} listed twice with different lengths"
                )
            durations[video_id] = duration
        record_line = reader.line_num + 1
    return durations


def read_annotations(
    path: str | Path,
    format: str | None = None,
    durations: Mapping[str, float] | str | Path | None = None,
    storage: Storage | None = None,
) -> tuple[list[Query], ReadSummary]:
    """Read an annotation file into Queries, applying the module's rules; ``format`` None detects it.

    ``durations`` (a mapping or a Charades metadata CSV) supplies the duration of rows that carry none.
    ``storage`` reads ``s3://`` URIs (default: one configured from the environment's AWS variables).
    """
    source = str(path)
    text = _read_text(source, storage)
    if format is None:
        format = _detect(text, source)
    elif format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(durations, (str, Path)):
        durations = read_durations(durations, storage)
    parse = {
        "charades-sta": _parse_charades,
        "activitynet": _parse_activitynet,
        "qvhighlights": _parse_qvhighlights,
        "jsonl": _parse_jsonl,
    }[format]
    return _apply_rules(parse(text, source), source, format, durations)


def write_jsonl(queries: Iterable[Query], path: str | Path) -> int:
    """Write Queries as our JSONL and return how many; readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    seen: set[str] = set()
    try:
        with partial.open("w", encoding="utf-8", newline="\n") as out:
            for query in queries:
                if query.qid in seen:
                    raise ValueError(f"qid {query.qid!r} appears twice; {path} would not read back")
                seen.add(query.qid)
                out.write(json.dumps(query.to_dict(), ensure_ascii=False) + "\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(seen)


@dataclass(slots=True)
class _RawRow:
    """A row as its file states it, before the rules; ``duration`` None means the file has none."""

    line: int | None  # None only for a lone row given to Query.from_dict
    qid: str | None
    video_id: str
    duration: float | None
    query: str
    windows: list[tuple[float, float]]
    split: str | None = None


def _apply_rules(
    rows: Iterable[_RawRow], source: str, format: str, durations: Mapping[str, float] | None
) -> tuple[list[Query], ReadSummary]:
    summary = ReadSummary(path=source, format=format)
    queries: list[Query] = []
    line_of_qid: dict[str, int] = {}
    rows_per_video: dict[str, int] = {}
    for row in rows:
        qid = row.qid
        if qid is None:
            index_in_video = rows_per_video.get(row.video_id, 0)
            rows_per_video[row.video_id] = index_in_video + 1
            qid = f"{row.video_id}_{index_in_video}"
        if qid in line_of_qid:
            raise AnnotationError(
                source, row.line, f"qid {qid!r} already used on line {line_of_qid[qid]}; qids must be unique"
            )
        line_of_qid[qid] = row.line

        duration = row.duration
        if duration is None:
            duration = _duration_from_table(row, source, format, durations)
            summary.durations_from_table += 1

        windows = []
        for start, end in row.windows:
            if end > duration:
                end = duration
                summary.clamped_end += 1
            if start < 0:
                start = 0.0
                summary.clamped_start += 1
            if start < end:
                windows.append((start, end))
        if not windows:
            summary.rejected += 1
            summary.rejected_lines.append(row.line)
            summary.rejected_qids.append(qid)
            continue
        summary.rejected_windows += len(row.windows) - len(windows)
        queries.append(Query(qid, row.video_id, duration, row.query, tuple(windows), row.split))

    summary.queries = len(queries)
    summary.videos = len({query.video_id for query in queries})
    summary.windows = sum(len(query.windows) for query in queries)
    return queries, summary


def _duration_from_table(
    row: _RawRow, source: str, format: str, durations: Mapping[str, float] | None
) -> float:
    if format == "charades-sta":
        hint = f"Charades-STA files carry no durations: {_CHARADES_HINT}, the metadata CSV of the same split"
    else:
        hint = "give the row a 'duration' field or pass durations= (a mapping or a metadata CSV)"
    if durations is None:
        raise AnnotationError(source, row.line, f"video {row.video_id!r} has no duration; {hint}")
    duration = durations.get(row.video_id)
    if duration is None:
        raise AnnotationError(
            source,
            row.line,
            f"video {row.video_id!r} is not in the durations table ({len(durations)} videos); {hint}",
        )
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise AnnotationError(
            source, row.line, f"durations table gives video {row.video_id!r} an invalid duration {duration!r}"
        )
    return float(duration)


def _parse_charades(text: str, source: str) -> Iterator[_RawRow]:
    """Lines ``VIDEO START END##sentence``."""
    for line_number, line in _numbered_lines(text):
        times, separator, sentence = line.partition("##")
        if not separator:
            raise AnnotationError(
                source,
                line_number,
                "missing '##' between the times and the sentence (VIDEO START END##sentence)",
            )
        fields = times.split()
        if len(fields) != 3:
            raise AnnotationError(
                source,
                line_number,
                f"expected 3 fields before '##' (VIDEO START END), found {len(fields)}: {times.strip()!r}",
            )
        sentence = sentence.strip()
        if not sentence:
            raise AnnotationError(source, line_number, "empty sentence after '##'")
        video_id, start, end = fields
        window = (
            _number_from_text(start, "start time", source, line_number),
            _number_from_text(end, "end time", source, line_number),
        )
        yield _RawRow(line_number, None, video_id, None, sentence, [window])


def _parse_activitynet(text: str, source: str) -> Iterator[_RawRow]:
    """``{video_id: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}``, one query a sentence."""
    document = _load_json_document(text, source)
    if not isinstance(document, dict):
        raise AnnotationError(
            source, 1, "expected a JSON object {video_id: {duration, timestamps, sentences}} (ActivityNet)"
        )
    for video_id, line_number in _with_key_lines(document, text):
        entry = document[video_id]
        if not isinstance(entry, dict):
            raise AnnotationError(
                source, line_number, f"video {video_id!r}: expected an object, got {entry!r:.60}"
            )
        for name in ("duration", "timestamps", "sentences"):
            if name not in entry:
                raise AnnotationError(source, line_number, f"video {video_id!r}: missing field {name!r}")
        duration = _number(entry["duration"], f"video {video_id!r}: duration", source, line_number)
        timestamps, sentences = entry["timestamps"], entry["sentences"]
        if not (isinstance(timestamps, list) and isinstance(sentences, list)) or len(timestamps) != len(
            sentences
        ):
            raise AnnotationError(
                source,
                line_number,
                f"video {video_id!r}: 'timestamps' and 'sentences' must be lists of the same length",
            )
        for index, (timestamp, sentence) in enumerate(zip(timestamps, sentences, strict=True)):
            try:
                query = _text(sentence, "sentence", source, line_number)
                window = _window(timestamp, "timestamp", source, line_number)
            except AnnotationError as error:
                # Named here rather than passed down, to keep string building off the 37k-row happy path.
                where = f"video {video_id!r}, sentence {index}"
                raise AnnotationError(source, line_number, f"{where}: {error.reason}") from None
            yield _RawRow(line_number, f"{video_id}_{index}", video_id, duration, query, [window])


def _parse_qvhighlights(text: str, source: str) -> Iterator[_RawRow]:
    """JSONL rows ``{"qid", "query", "duration", "vid", "relevant_windows", ...}``."""
    for line_number, row in _json_lines(text, source):
        for name in ("qid", "query", "duration", "vid"):
            if name not in row:
                raise AnnotationError(source, line_number, f"missing field {name!r}")
        if "relevant_windows" not in row:
            raise AnnotationError(
                source,
                line_number,
                "missing field 'relevant_windows' (the QVHighlights test split withholds them: "
                "only train and val can be read)",
            )
        yield _RawRow(
            line_number,
            _qid(row["qid"], source, line_number),
            _text(row["vid"], "vid", source, line_number),
            _number(row["duration"], "duration", source, line_number),
            _text(row["query"], "query", source, line_number),
            _windows(row["relevant_windows"], "relevant_windows", source, line_number),
        )


def _parse_jsonl(text: str, source: str) -> Iterator[_RawRow]:
    for line_number, row in _json_lines(text, source):
        yield _parse_jsonl_row(row, source, line_number)


def _parse_jsonl_row(row: Mapping[str, Any], source: str, line: int | None) -> _RawRow:
    """A row of our contract, checked for shape and types only."""
    if not isinstance(row, Mapping):
        raise AnnotationError(source, line, f"expected a JSON object, got {type(row).__name__}")
    for name in ("video_id", "query", "windows"):
        if name not in row:
            raise AnnotationError(source, line, f"missing field {name!r}")
    split = row.get("split")
    if split is not None and not isinstance(split, str):
        raise AnnotationError(source, line, f"split must be a string, got {split!r}")
    duration = row.get("duration")
    return _RawRow(
        line,
        None if row.get("qid") is None else _qid(row["qid"], source, line),
        _text(row["video_id"], "video_id", source, line),
        None if duration is None else _number(duration, "duration", source, line),
        _text(row["query"], "query", source, line),
        _windows(row["windows"], "windows", source, line),
        split,
    )


def _detect(text: str, source: str) -> str:
    line_number, first = next(_numbered_lines(text), (1, ""))
    if not first:
        raise AnnotationError(source, 1, "file is empty")
    if first.lstrip().startswith("{"):
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            # The first line is not a whole JSON value: a JSON document spread over several lines.
            head = _load_json_document(text, source)
        if isinstance(head, dict):
            if "relevant_windows" in head or "vid" in head:
                return "qvhighlights"
            if "windows" in head or "video_id" in head:
                return "jsonl"
            first_value = next(iter(head.values()), None)
            if isinstance(first_value, dict) and "timestamps" in first_value:
                return "activitynet"
    else:
        times, separator, _ = first.partition("##")
        if separator and len(times.split()) == 3:
            return "charades-sta"
        header = [name.strip() for name in first.split(",")]
        if "id" in header and "length" in header:
            raise AnnotationError(
                source,
                line_number,
                "this is a Charades metadata CSV, not annotations: pass it as durations (--durations)",
            )
    raise AnnotationError(
        source,
        line_number,
        f"cannot tell the annotation format from {first[:80]!r}; expected a Charades-STA line "
        "'VIDEO START END##sentence', an ActivityNet JSON object, or JSONL rows of QVHighlights "
        f"('vid', 'relevant_windows') or ours ('video_id', 'windows'); or pass format= one of {FORMATS}",
    )


def _read_text(source: str, storage: Storage | None) -> str:
    # Local files are read directly, so that a missing one stays a FileNotFoundError; an S3 object that
    # cannot be read raises a StorageError that names its URI.
    if is_s3_uri(source):
        data = (storage or Storage()).read_bytes(source)
    else:
        path = Path(source)
        if path.is_dir():
            raise AnnotationError(source, None, "is a folder, not a file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{source}: no such file") from None
        except OSError as error:
            raise AnnotationError(source, None, f"cannot be read ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise AnnotationError(source, line, f"not UTF-8 text (byte {error.start}): {error.reason}") from None


def _numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers.

    Splits on newlines only: str.splitlines would also split at U+2028 and friends, which JSON
    strings may hold unescaped, and then every later line number would be wrong.
    """
    for index, line in enumerate(text.split("\n")):
        line = line.rstrip("\r")
        if line.strip():
            yield index + 1, line


def _json_lines(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_number, line in _numbered_lines(text):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotationError(
                source, line_number, f"invalid JSON at column {error.colno}: {error.msg}"
            ) from None
        if not isinstance(row, dict):
            raise AnnotationError(source, line_number, f"expected a JSON object, got {type(row).__name__}")
        yield line_number, row


def _load_json_document(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            source, error.lineno, f"invalid JSON at column {error.colno}: {error.msg}"
        ) from None


def _with_key_lines(document: dict[str, Any], text: str) -> Iterator[tuple[str, int]]:
    """Each top-level key with the line it sits on, so errors in a JSON document can name a line.

    json keeps the keys in file order, so one forward scan finds them all in linear time.
    """
    if "\n" not in text.rstrip():
        # The usual case: the whole document on one line.
        yield from ((key, 1) for key in document)
        return
    position, line = 0, 1
    for key in document:
        found = text.find(json.dumps(key, ensure_ascii=False), position)
        if found >= 0:
            line += text.count("\n", position, found)
            position = found
        yield key, line


def _number(value: Any, what: str, source: str, line: int | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(source, line, f"{what} must be a number, got {value!r:.80}")
    if not math.isfinite(value):
        raise AnnotationError(source, line, f"{what} must be finite, got {value!r}")
    return float(value)


def _number_from_text(text: str, what: str, source: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(source, line, f"{what} {text.strip()!r} is not a number") from None
    return _number(value, what, source, line)


def _text(value: Any, what: str, source: str, line: int | None) -> str:
    if not (isinstance(value, str) and value.strip()):
        raise AnnotationError(source, line, f"{what} must be a non-empty string, got {value!r:.80}")
    return value.strip()


def _qid(value: Any, source: str, line: int | None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AnnotationError(source, line, f"qid must be a string or an integer, got {value!r}")
    return _text(str(value), "qid", source, line)


def _window(value: Any, what: str, source: str, line: int | None) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise AnnotationError(source, line, f"{what}: a window must be [start, end], got {value!r:.80}")
    return _number(value[0], f"{what}: start", source, line), _number(value[1], f"{what}: end", source, line)


def _windows(value: Any, what: str, source: str, line: int | None) -> list[tuple[float, float]]:
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(w, (list, tuple)) for w in value)):
        raise AnnotationError(
            source,
            line,
            f"{what} must be a non-empty list of [start, end] pairs, e.g. [[2.5, 7.0]]; got {value!r:.80}",
        )
    return [_window(window, what, source, line) for window in value]
