"""Annotation and durations files read from ``s3://`` URIs, against a real S3 server (SeaweedFS), give what
the same files give when read from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3server import running_seaweedfs

from timerefine.data.annotations import AnnotationError, detect_format, read_annotations, write_jsonl
from timerefine.data.storage import Storage, StorageError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with running_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"), "AKIDNOTES", "notes-secret-4", ("annotations",)
    ) as server:
        yield server


@pytest.fixture
def storage(s3, monkeypatch) -> Storage:
    """The keys in the environment, the endpoint only in the Storage (as ``--endpoint-url`` gives it)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(name, s3.env()[name])
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return Storage(endpoint_url=s3.endpoint_url)


@pytest.fixture(scope="module")
def charades(shared_data: Path) -> Path:
    return shared_data / "annotations" / "charades_sta"


def test_charades_and_its_durations_csv_read_from_s3_as_from_disk(s3, storage, charades):
    local_txt, local_csv = charades / "charades_sta_test.txt", charades / "Charades_v1_test.csv"
    txt = s3.upload("annotations", "charades/charades_sta_test.txt", local_txt)
    csv = s3.upload("annotations", "charades/Charades_v1_test.csv", local_csv)

    from_disk, disk_summary = read_annotations(local_txt, durations=local_csv)
    from_s3, s3_summary = read_annotations(txt, durations=csv, storage=storage)

    assert from_s3 == from_disk and len(from_s3) == disk_summary.queries > 0
    assert s3_summary.path == txt
    assert (s3_summary.format, s3_summary.clamped_end, s3_summary.videos) == (
        disk_summary.format,
        disk_summary.clamped_end,
        disk_summary.videos,
    )
    assert s3_summary.describe() == disk_summary.describe()
    assert detect_format(txt, storage) == "charades-sta"


def test_our_jsonl_reads_from_s3_as_from_disk(s3, storage, charades, tmp_path):
    queries, _ = read_annotations(
        charades / "charades_sta_test.txt", durations=charades / "Charades_v1_test.csv"
    )
    local = tmp_path / "test.jsonl"
    write_jsonl(queries[:200], local)
    uri = s3.upload("annotations", "ours/test.jsonl", local)

    from_s3, summary = read_annotations(uri, storage=storage)

    assert from_s3 == read_annotations(local)[0] == queries[:200]
    assert (summary.format, summary.queries, summary.durations_from_table) == ("jsonl", 200, 0)


def test_errors_in_an_s3_file_name_its_uri_and_line(s3, storage, tmp_path):
    local = tmp_path / "broken.txt"
    local.write_text("AO8RW 0.0 6.9##a person is putting a book on a shelf.\nAO8RW 0.0 6.9 a person\n")
    uri = s3.upload("annotations", "broken/broken.txt", local)

    with pytest.raises(AnnotationError) as broken:
        read_annotations(uri, durations={"AO8RW": 30.0}, storage=storage)
    with pytest.raises(StorageError, match=r"s3://annotations/broken/missing\.csv: not found"):
        read_annotations(uri, durations="s3://annotations/broken/missing.csv", storage=storage)

    assert (broken.value.source, broken.value.line) == ("s3://annotations/broken/broken.txt", 2)
    assert str(broken.value).startswith("s3://annotations/broken/broken.txt:2: missing '##'")
