"""Annotation readers, on the real public files and on small files written for each rule."""

import json
import pickle
from pathlib import Path

import pytest

from timerefine.data.annotations import (
    FORMATS,
    AnnotationError,
    Query,
    detect_format,
    read_annotations,
    read_durations,
    write_jsonl,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- the real files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annotations(shared_data: Path) -> Path:
    return shared_data / "annotations"


def raw_charades_row(line: str) -> tuple[str, float, float]:
    video_id, start, end = line.split("##")[0].split()
    return video_id, float(start), float(end)


def test_charades_sta_test_clamps_ends_past_the_real_duration(annotations: Path) -> None:
    csv_path = annotations / "charades_sta" / "Charades_v1_test.csv"
    queries, summary = read_annotations(
        annotations / "charades_sta" / "charades_sta_test.txt", durations=csv_path
    )

    assert (summary.format, summary.queries, summary.videos) == ("charades-sta", 3720, 1334)
    assert (summary.clamped_end, summary.clamped_start, summary.rejected) == (562, 0, 0)
    assert summary.describe() == (
        "charades_sta_test.txt (charades-sta): 3720 queries over 1334 videos; "
        "562 ends clamped to the duration; 0 rows rejected (start >= end)"
    )
    assert len(queries) == 3720 and len({query.qid for query in queries}) == 3720
    assert all(0 <= start < end <= query.duration for query in queries for start, end in query.windows)

    # The README's two real queries for videos/charades_Y1HGC.mp4 (30.62 s long).
    by_sentence = {(query.video_id, query.query): query for query in queries}
    coffee = by_sentence["Y1HGC", "a person walks in a doorway drinking some coffee."]
    water = by_sentence["Y1HGC", "person drinking a glass of water."]
    assert (coffee.duration, coffee.windows, water.windows) == (30.62, ((0.2, 9.8),), ((1.7, 12.1),))

    # Every clamped end now sits exactly on its video's duration.
    durations = read_durations(csv_path)
    text = (annotations / "charades_sta" / "charades_sta_test.txt").read_text()
    past_the_end = [row for row in map(raw_charades_row, text.splitlines()) if row[2] > durations[row[0]]]
    assert len(past_the_end) == 562
    ends_at_duration = sum(query.windows[0][1] == query.duration for query in queries)
    assert ends_at_duration >= 562


def test_charades_sta_train_rejects_the_four_empty_moments(annotations: Path) -> None:
    path = annotations / "charades_sta" / "charades_sta_train.txt"
    queries, summary = read_annotations(
        path, durations=annotations / "charades_sta" / "Charades_v1_train.csv"
    )

    assert (summary.queries, summary.rejected, len(summary.rejected_lines)) == (12404, 4, 4)
    assert len(queries) == 12404
    lines = path.read_text().splitlines()
    for line_number in summary.rejected_lines:
        _, start, end = raw_charades_row(lines[line_number - 1])
        assert start >= end
    assert "4 rows rejected (start >= end) at lines " in summary.describe()


def test_activitynet_val_2_gives_one_query_per_stripped_sentence(annotations: Path) -> None:
    path = annotations / "activitynet_captions" / "val_2.json"
    queries, summary = read_annotations(path)

    assert (summary.format, summary.queries, summary.videos, summary.rejected) == (
        "activitynet",
        17031,
        4885,
        0,
    )
    document = json.loads(path.read_text())
    video_id = next(iter(document))
    first_video = [query for query in queries if query.video_id == video_id]
    entry = document[video_id]
    assert [query.query for query in first_video] == [sentence.strip() for sentence in entry["sentences"]]
    assert [query.qid for query in first_video] == [f"{video_id}_{i}" for i in range(len(entry["sentences"]))]
    assert [query.windows[0] for query in first_video] == [
        (float(start), min(float(end), entry["duration"])) for start, end in entry["timestamps"]
    ]
    ends_past_duration = sum(
        end > video["duration"] for video in document.values() for _, end in video["timestamps"]
    )
    assert summary.clamped_end == ends_past_duration


def test_qvhighlights_val_keeps_every_window(annotations: Path) -> None:
    path = annotations / "qvhighlights" / "highlight_val_release.jsonl"
    queries, summary = read_annotations(path)

    assert (summary.format, summary.queries, summary.windows, summary.rejected) == (
        "qvhighlights",
        1550,
        2803,
        0,
    )
    assert sum(len(query.windows) for query in queries) == 2803
    first_row = json.loads(path.read_text().splitlines()[0])
    first = queries[0]
    assert (first.qid, first.video_id, first.duration) == (str(first_row["qid"]), first_row["vid"], 150.0)
    assert first.windows == tuple(tuple(map(float, window)) for window in first_row["relevant_windows"])
    assert any(len(query.windows) > 1 for query in queries)


@pytest.mark.parametrize(
    ("relative_path", "expected"),
    [
        ("charades_sta/charades_sta_test.txt", "charades-sta"),
        ("charades_sta/charades_sta_train.txt", "charades-sta"),
        ("activitynet_captions/val_2.json", "activitynet"),
        ("qvhighlights/highlight_val_release.jsonl", "qvhighlights"),
    ],
)
def test_detect_format_on_the_real_files(annotations: Path, relative_path: str, expected: str) -> None:
    assert detect_format(annotations / relative_path) == expected


def test_real_files_round_trip_through_our_jsonl(annotations: Path, tmp_path: Path) -> None:
    queries, _ = read_annotations(annotations / "qvhighlights" / "highlight_val_release.jsonl")
    out = tmp_path / "qvhighlights_val.jsonl"

    assert write_jsonl(queries, out) == 1550
    assert detect_format(out) == "jsonl"
    again, summary = read_annotations(out)
    assert again == queries
    assert (summary.clamped_end, summary.rejected, summary.windows) == (0, 0, 2803)


def test_read_durations_of_the_charades_test_metadata(annotations: Path) -> None:
    durations = read_durations(annotations / "charades_sta" / "Charades_v1_test.csv")
    assert len(durations) == 1863
    assert durations["Y1HGC"] == 30.62


# --- the rules, on small files ----------------------------------------------------------------------


def test_rules_clamp_reject_and_count(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rules.jsonl",
        jsonl(
            {"qid": "past_end", "video_id": "v", "duration": 10, "query": "a", "windows": [[2, 12.5]]},
            {"qid": "before_0", "video_id": "v", "duration": 10, "query": "b", "windows": [[-1, 3]]},
            {"qid": "empty", "video_id": "w", "duration": 10, "query": "c", "windows": [[5, 5]]},
            {"qid": "outside", "video_id": "w", "duration": 10, "query": "d", "windows": [[11, 12]]},
            {
                "qid": "one_of_two",
                "video_id": "w",
                "duration": 10,
                "query": "e",
                "windows": [[1, 2], [12, 15]],
            },
        ),
    )
    queries, summary = read_annotations(path)

    assert {query.qid: query.windows for query in queries} == {
        "past_end": ((2.0, 10.0),),
        "before_0": ((0.0, 3.0),),
        "one_of_two": ((1.0, 2.0),),
    }
    assert (summary.queries, summary.videos, summary.windows) == (3, 2, 3)
    assert (summary.clamped_end, summary.clamped_start) == (3, 1)
    assert (summary.rejected, summary.rejected_lines) == (2, [3, 4])
    assert summary.rejected_qids == ["empty", "outside"]
    assert summary.rejected_windows == 1
    assert summary.describe() == (
        "rules.jsonl (jsonl): 3 queries over 2 videos; 3 ends clamped to the duration; "
        "1 starts clamped to 0; 2 rows rejected (start >= end) at lines 3, 4; "
        "1 windows dropped from kept queries (start >= end)"
    )


def test_activitynet_rejections_are_named_by_qid(tmp_path: Path) -> None:
    document = {
        "v_a": {
            "duration": 9.57,
            "timestamps": [[4.97, 4.97], [0, 9.6]],
            "sentences": [" empty.", " whole."],
        },
    }
    queries, summary = read_annotations(write(tmp_path, "anet.json", json.dumps(document)))

    assert [(query.qid, query.query, query.windows) for query in queries] == [
        ("v_a_1", "whole.", ((0.0, 9.57),))
    ]
    assert (summary.rejected, summary.rejected_qids, summary.clamped_end) == (1, ["v_a_0"], 1)
    assert "1 rows rejected (start >= end) at qids v_a_0" in summary.describe()


def test_durations_fill_only_rows_without_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mixed.jsonl",
        jsonl(
            {"video_id": "a", "query": "no duration", "windows": [[1, 2]]},
            {"video_id": "b", "duration": 8.0, "query": "own duration", "windows": [[1, 2]]},
        ),
    )
    queries, summary = read_annotations(path, durations={"a": 5.0, "b": 99.0})

    assert [query.duration for query in queries] == [5.0, 8.0]
    assert summary.durations_from_table == 1
    assert "1 durations taken from the durations table" in summary.describe()


def test_charades_qids_are_unique_and_stable_across_reads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sta.txt",
        "AAA 0.0 3.5##a person opens a door.\nBBB 1.0 2.0##person sits.\n"
        "AAA 4.0 9.0##a person opens a door.\n",
    )
    durations = {"AAA": 30.0, "BBB": 7.5}
    first, summary = read_annotations(path, "charades-sta", durations)
    second, _ = read_annotations(path, durations=durations)

    assert [query.qid for query in first] == ["AAA_0", "BBB_0", "AAA_1"]
    assert first == second
    assert [query.duration for query in first] == [30.0, 7.5, 30.0]
    assert (summary.queries, summary.videos, summary.durations_from_table) == (3, 2, 3)


def test_jsonl_rows_without_qid_get_stable_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ours.jsonl",
        jsonl(
            {"video_id": "v", "duration": 4, "query": "x", "windows": [[0, 1]]},
            {"video_id": "v", "duration": 4, "query": "y", "windows": [[1, 2]], "qid": 7},
            {"video_id": "v", "duration": 4, "query": "z", "windows": [[2, 3]], "split": "val"},
        ),
    )
    queries, _ = read_annotations(path)
    assert [(query.qid, query.split) for query in queries] == [("v_0", None), ("7", None), ("v_1", "val")]


def test_write_then_read_gives_the_same_queries(tmp_path: Path) -> None:
    queries = [
        Query("q1", "vid_a", 31.25, "a person opens a door.", ((0.0, 4.5),), "test"),
        # U+2028 is a line separator to str.splitlines but plain text inside a JSON string.
        Query("q2", "vid_b", 150.0, "café\u2028 scène", ((2.0, 10.0), (20.0, 150.0))),
    ]
    path = tmp_path / "nested" / "out.jsonl"

    assert write_jsonl(queries, path) == 2
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3
    again, summary = read_annotations(path)
    assert again == queries
    assert (summary.format, summary.windows, summary.clamped_end) == ("jsonl", 3, 0)
    assert [Query.from_dict(query.to_dict()) for query in queries] == queries


def test_write_jsonl_refuses_duplicate_qids_and_leaves_no_file(tmp_path: Path) -> None:
    query = Query("same", "v", 5.0, "x", ((0.0, 1.0),))
    path = tmp_path / "dup.jsonl"
    with pytest.raises(ValueError, match="'same' appears twice"):
        write_jsonl([query, query], path)
    assert list(tmp_path.iterdir()) == []


def test_from_dict_is_strict_about_windows_and_required_fields() -> None:
    row = {"qid": "q", "video_id": "v", "duration": 10.0, "query": "x", "windows": [[2.0, 11.0]]}
    with pytest.raises(AnnotationError, match=r"^rows\.jsonl:7: .*read_annotations\(\) to clamp"):
        Query.from_dict(row, source="rows.jsonl", line=7)
    with pytest.raises(AnnotationError, match="missing field 'qid'"):
        Query.from_dict({key: value for key, value in row.items() if key != "qid"})
    with pytest.raises(ValueError, match=r"0 <= start < end <= duration"):
        Query("q", "v", 10.0, "x", ((3.0, 3.0),))


# --- malformed files name the file and the line -----------------------------------------------------

QV_ROW = '{"qid": 1, "query": "q", "duration": 150, "vid": "x", "relevant_windows": [[0, 2]]}'
PRETTY_ACTIVITYNET = """{
  "v_a": {"duration": 10, "timestamps": [[0, 1]], "sentences": ["fine."]},
  "v_b": {"duration": 10, "timestamps": [[0, 1], [2, 3]], "sentences": ["only one."]}
}
"""


@pytest.mark.parametrize(
    ("name", "format", "text", "line", "reason"),
    [
        ("sta.txt", "charades-sta", "AAA 1 2##ok.\nAAA 1.0 2.0 a person sits.\n", 2, "missing '##'"),
        ("sta.txt", "charades-sta", "AAA 1 2##ok.\nAAA 1.0 x2##sits.\n", 2, "end time 'x2' is not a number"),
        ("sta.txt", "charades-sta", "AAA 1 2##ok.\n\nAAA 1.0##sits.\n", 3, "expected 3 fields before '##'"),
        ("sta.txt", "charades-sta", "AAA 1 2##ok.\nAAA 1 nan##sits.\n", 2, "must be finite"),
        (
            "sta.txt",
            "charades-sta",
            "AAA 1 2##ok.\nZZZ 1 2##sits.\n",
            2,
            "'ZZZ' is not in the durations table",
        ),
        (
            "an.json",
            "activitynet",
            '{\n  "v_a": {"duration": 10,\n  "timestamps": [[0, 1]],,\n}',
            3,
            "invalid JSON",
        ),
        (
            "an.json",
            "activitynet",
            PRETTY_ACTIVITYNET,
            3,
            "'v_b': 'timestamps' and 'sentences' must be lists",
        ),
        (
            "an.json",
            "activitynet",
            '{"v_a": {"duration": 9, "timestamps": [[0, "1"]], "sentences": ["s."]}}',
            1,
            "video 'v_a', sentence 0: timestamp: end must be a number",
        ),
        (
            "qv.jsonl",
            "qvhighlights",
            '{"qid": 1, "query": "q", "duration": 150, "vid": "x"}\n',
            1,
            "withholds",
        ),
        ("qv.jsonl", "qvhighlights", QV_ROW + '\n{"qid": 2,\n', 2, "invalid JSON at column"),
        (
            "ours.jsonl",
            "jsonl",
            jsonl(*[{"qid": "q", "video_id": "v", "duration": 5, "query": "x", "windows": [[0, 1]]}] * 2),
            2,
            "qid 'q' already used on line 1",
        ),
        (
            "ours.jsonl",
            "jsonl",
            jsonl({"video_id": "v", "duration": 5, "query": "x", "windows": [0, 1]}),
            1,
            "list of [start, end] pairs",
        ),
        (
            "ours.jsonl",
            "jsonl",
            jsonl({"video_id": "v", "query": "x", "windows": [[0, 1]]}),
            1,
            "has no duration",
        ),
        (
            "ours.jsonl",
            "jsonl",
            '{"video_id": "v", "duration": NaN, "query": "x", "windows": [[0, 1]]}',
            1,
            "finite",
        ),
        ("ours.jsonl", "jsonl", "\n\n[1, 2]\n", 3, "expected a JSON object, got list"),
    ],
)
def test_malformed_input_names_file_and_line(
    tmp_path: Path, name: str, format: str, text: str, line: int, reason: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(AnnotationError) as caught:
        read_annotations(path, format, durations={"AAA": 30.0} if format == "charades-sta" else None)
    assert (caught.value.source, caught.value.line) == (str(path), line)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert reason in str(caught.value)


def test_charades_without_durations_tells_the_user_what_to_pass(tmp_path: Path) -> None:
    path = write(tmp_path, "charades_sta_test.txt", "AAA 1 2##a person sits.\n")
    with pytest.raises(AnnotationError, match=r"sta_test\.txt:1: video 'AAA' has no duration") as caught:
        read_annotations(path)
    assert "--durations Charades_v1_test.csv" in str(caught.value)


def test_non_utf8_bytes_are_reported_at_their_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"AAA 1 2##ok.\nAAA 1 2##caf\xe9.\n")
    with pytest.raises(AnnotationError, match=r"latin1\.txt:2: not UTF-8"):
        read_annotations(path, durations={"AAA": 30.0})


def test_unknown_format_argument_lists_the_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", "")
    with pytest.raises(ValueError, match="expected one of charades-sta, activitynet, qvhighlights, jsonl"):
        read_annotations(path, "moment-detr")


def test_annotation_error_survives_pickling() -> None:
    # Ray ships an exception raised in a task to the driver pickled.
    error = pickle.loads(pickle.dumps(AnnotationError("a.txt", 3, "bad row")))
    assert (str(error), error.source, error.line, error.reason) == ("a.txt:3: bad row", "a.txt", 3, "bad row")


# --- format detection on tiny examples --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\nAB12C 0.0 6.1##a person laughs.\n", "charades-sta"),
        ('{"v_x": {"duration": 5.5, "timestamps": [[0, 2]], "sentences": ["s."]}}', "activitynet"),
        (PRETTY_ACTIVITYNET, "activitynet"),
        (
            '{"qid": 3, "query": "q", "duration": 150, "vid": "x_0.0_150.0", "relevant_windows": [[0, 2]]}\n',
            "qvhighlights",
        ),
        (jsonl({"video_id": "v", "duration": 3.0, "query": "q", "windows": [[0, 1]]}), "jsonl"),
    ],
)
def test_detect_format_on_tiny_files(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in FORMATS
    assert detect_format(write(tmp_path, "annotations.data", text)) == expected


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("id,subject,length\nY1HGC,X,30.62\n", 1, "Charades metadata CSV, not annotations"),
        ("\n\nvideo start end sentence\n", 3, "cannot tell the annotation format"),
        ('{"something": "else"}\n', 1, "cannot tell the annotation format"),
        ("\n  \n", 1, "file is empty"),
    ],
)
def test_detect_format_explains_what_it_expected(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, "unknown.txt", text)
    with pytest.raises(AnnotationError, match=reason) as caught:
        detect_format(path)
    assert caught.value.line == line


# --- the durations CSV ------------------------------------------------------------------------------


def test_read_durations_follows_quoted_fields_across_lines(tmp_path: Path) -> None:
    text = 'id,descriptions,length\nAAA,"two\nlines",12.5\nBBB,plain,7\n'
    assert read_durations(write(tmp_path, "meta.csv", text)) == {"AAA": 12.5, "BBB": 7.0}

    bad = write(tmp_path, "bad.csv", 'id,descriptions,length\nAAA,"two\nlines",12.5\nBBB,plain,long\n')
    with pytest.raises(AnnotationError, match=r"bad\.csv:4: length 'long' is not a number"):
        read_durations(bad)
    no_length = write(tmp_path, "no_length.csv", "id,subject\nAAA,X\n")
    with pytest.raises(AnnotationError, match=r"no_length\.csv:1: missing column\(s\) length"):
        read_durations(no_length)
