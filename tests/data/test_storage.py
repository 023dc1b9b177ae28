"""Local folders and S3 prefixes through one Storage, against a real S3 server (SeaweedFS) that checks
credentials the way S3 does."""

from __future__ import annotations

import os
import pickle

import pytest
from s3server import running_seaweedfs

from timerefine.data.storage import Storage, StorageAccessError, StorageError, video_id_from_uri


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with running_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"), "AKIDSTORAGETEST", "storage-secret-123", ("videos",)
    ) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The driver's environment: credentials and endpoint in the standard AWS variables."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def touch(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_folder_lists_its_videos_recursively_and_sorted(tmp_path):
    for name in ["b.mp4", "a.MKV", "deep/er/c.webm", "d.avi", "e.mov", "f.ts", "g.m2ts", "h.mpg", "i.m4a"]:
        touch(tmp_path / name)

    listing = Storage().list_videos(str(tmp_path))

    expected = ["a.MKV", "b.mp4", "d.avi", "deep/er/c.webm", "e.mov", "f.ts", "g.m2ts", "h.mpg", "i.m4a"]
    assert listing.videos == [str(tmp_path / name) for name in expected]
    assert (listing.skipped, listing.summary()) == ([], "")


def test_everything_else_in_a_folder_is_counted_and_the_odd_ones_named(tmp_path):
    for name in ["clip.mp4", "notes.txt", "more/notes.txt", "cover.png", ".hidden.mp4", "README"]:
        touch(tmp_path / name)
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (tmp_path / "folder.mp4").mkdir()
    touch(tmp_path / "folder.mp4" / "inner.mkv")  # a folder named like a video is still walked
    (tmp_path / "linked").symlink_to(tmp_path / "more")  # a symlinked folder is followed
    (tmp_path / "more" / "loop").symlink_to(tmp_path)  # ... and a link loop ends

    listing = Storage().list_videos(str(tmp_path))

    assert listing.videos == [str(tmp_path / "clip.mp4"), str(tmp_path / "folder.mp4" / "inner.mkv")]
    assert listing.summary() == (
        "skipped 8: 2 .txt, 1 .png, 1 a folder named like a video, 1 a symlink to nothing, 1 hidden, "
        "1 no extension, 1 not a regular file (a pipe, socket or device)"
    )
    assert listing.suspicious == [
        (str(tmp_path / "folder.mp4"), "a folder named like a video"),
        (str(tmp_path / "gone.mp4"), "a symlink to nothing"),
        (str(tmp_path / "pipe.mp4"), "not a regular file (a pipe, socket or device)"),
    ]


def test_a_transport_stream_named_directly_or_in_a_list_is_a_video(tmp_path):
    stream = touch(tmp_path / "broadcast.ts")
    (tmp_path / "list.txt").write_text("broadcast.ts\n")

    assert Storage().list_videos(str(stream)).videos == [str(stream)]
    assert Storage().list_videos(str(tmp_path / "list.txt")).videos == [str(stream)]
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(StorageError, match="not a regular file"):
        Storage().list_videos(str(tmp_path / "pipe.mp4"))


def test_a_text_file_lists_videos_relative_to_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # the S3 line must not send boto3 off this host
    touch(tmp_path / "clips" / "one.mp4")
    listing = tmp_path / "clips" / "list.txt"
    listing.write_text(f"# my videos\none.mp4\n\n  {tmp_path}/elsewhere/two.mkv  \ns3://bucket/three.mp4\n")

    videos = Storage().list_videos(str(listing)).videos

    assert videos == [
        str(tmp_path / "clips" / "one.mp4"),
        str(tmp_path / "elsewhere" / "two.mkv"),
        "s3://bucket/three.mp4",
    ]


def test_a_bad_line_in_a_list_names_the_file_and_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("one.mp4\ntwo.jpg\n")

    with pytest.raises(
        StorageError, match=r"list\.txt, line 2: 'two\.jpg' does not end in a video extension"
    ):
        Storage().list_videos(str(listing))


def test_a_missing_input_and_an_unknown_scheme_are_clear_errors(tmp_path):
    with pytest.raises(StorageError, match="no such file, folder or S3 prefix"):
        Storage().list_videos(str(tmp_path / "nowhere"))
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        Storage().list_videos("gs://bucket/videos")


def test_video_ids_are_file_names_without_extension():
    assert video_id_from_uri("s3://bucket/a/b/clip_01.mp4") == "clip_01"
    assert video_id_from_uri("/data/v.2024.mkv") == "v.2024"
    assert video_id_from_uri("/data/noextension") == "noextension"


def test_a_local_write_is_atomic_and_creates_folders(tmp_path):
    target = tmp_path / "out" / "deeper" / "part.parquet"

    Storage().write_bytes(str(target), b"complete")
    Storage().write_bytes(str(target), b"replaced")

    assert target.read_bytes() == b"replaced"
    assert os.listdir(target.parent) == ["part.parquet"]  # no partial file left behind
    Storage().check_writable(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["deeper"]


def test_s3_lists_reads_and_writes_through_the_endpoint(s3_env, tmp_path):
    client = s3_env.client()
    for key in ["set1/a.mp4", "set1/sub/b.MOV", "set1/readme.txt", "set2/c.mp4"]:
        client.put_object(Bucket="videos", Key=key, Body=key.encode())
    storage = Storage()  # endpoint and keys from the environment

    listing = storage.list_videos("s3://videos/set1/")
    assert listing.videos == ["s3://videos/set1/a.mp4", "s3://videos/set1/sub/b.MOV"]
    assert listing.summary() == "skipped 1: 1 .txt"
    assert storage.read_bytes("s3://videos/set1/sub/b.MOV") == b"set1/sub/b.MOV"
    storage.write_bytes("s3://videos/out/part-1.parquet", b"table")
    assert client.get_object(Bucket="videos", Key="out/part-1.parquet")["Body"].read() == b"table"
    storage.check_writable("s3://videos/out")
    assert storage.list_files("s3://videos/out", (".parquet",)) == ["s3://videos/out/part-1.parquet"]
    assert storage.list_videos("s3://videos/set1/a.mp4").videos == ["s3://videos/set1/a.mp4"]


def test_wrong_credentials_get_a_clear_access_error_without_the_secret(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-456")

    with pytest.raises(StorageAccessError) as refused:
        Storage().list_videos("s3://videos/set1")

    message = str(refused.value)
    assert "refused the credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert s3_env.endpoint_url in message
    assert "not-the-secret-456" not in message and "storage-secret-123" not in message


def test_a_pickled_storage_carries_static_keys_to_a_process_without_them(s3_env, monkeypatch):
    s3_env.client().put_object(Bucket="videos", Key="travel/a.mp4", Body=b"payload")
    storage = Storage()
    assert storage.list_videos("s3://videos/travel").videos == ["s3://videos/travel/a.mp4"]  # S3 set up here
    shipped = pickle.dumps(storage)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # a Ray worker started before the keys were exported
    worker_copy = pickle.loads(shipped)

    assert worker_copy.read_bytes("s3://videos/travel/a.mp4") == b"payload"
    assert "storage-secret-123" not in repr(worker_copy)
    assert repr(worker_copy) == f"Storage(endpoint_url='{s3_env.endpoint_url}')"
