"""Local folders and ``s3://`` prefixes behind one small interface.

Feature extraction reads videos from, and writes tables to, either kind of location, from the driver and
from Ray workers alike. ``Storage`` is the one object that knows how to reach them: it holds pyarrow
filesystems (S3 with an endpoint override and a patient retry strategy) and is pickled into Ray tasks,
so every worker reaches S3 the way the driver did.

Credentials come from the standard AWS chain (environment, shared config files, instance roles), read in
the driver. Static keys travel inside the pickled filesystem, because keys exported in the driver after
``ray.init`` never reach workers started before; refreshable credentials (instance or container roles,
assumed roles) do not travel, since they would expire on the workers: each worker resolves its own
chain. Keys are never logged or shown in a ``repr``.

Writes are atomic for readers: a local file is written under a hidden temporary name and renamed; an S3
object becomes visible only when its upload completes (a killed multipart upload stays invisible; a
bucket lifecycle rule that aborts incomplete uploads reclaims its space).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

# The containers decord or PyAV (FFmpeg) read video from, by file extension: every such file is extracted or
# becomes an error row. An audio-only MP4 (.m4a) and raw H.264 / HEVC streams are listed too, so that they
# get an error row that says why ("the file has no video stream", "no timestamps") rather than no mention.
VIDEO_EXTENSIONS = (
    ".3g2", ".3gp", ".264", ".265", ".asf", ".avi", ".divx", ".dv", ".f4v", ".flv", ".h264", ".h265",
    ".hevc", ".m2t", ".m2ts", ".m2v", ".m4a", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mts",
    ".mxf", ".nut", ".ogg", ".ogv", ".qt", ".rm", ".rmvb", ".ts", ".vob", ".webm", ".wmv", ".y4m",
)  # fmt: skip

# Why an entry under an input folder is not a video (besides a non-video extension, its own kind).
HIDDEN = "hidden"
NOT_A_FILE = "not a regular file (a pipe, socket or device)"
DANGLING_LINK = "a symlink to nothing"
FOLDER_NAMED_LIKE_A_VIDEO = "a folder named like a video"

PARTIAL_SUFFIX = ".partial"  # a local file being written under a hidden name, renamed when complete

# pyarrow's default of 3 attempts lost writes under 30% throttling responses (DESIGN.md section 7), and so
# did AWS's "standard" strategy with 10: its retry quota (500 tokens, 5 a retry, 1 back a success) runs dry
# after a few hundred throttled requests, and then nothing is retried (measured through tests/faultproxy.py:
# 17 of 40 objects lost). The "default" strategy has no quota; its backoff doubles from 25 ms, so 12
# attempts also wait out about 50 s of refused connections.
S3_MAX_ATTEMPTS = 12

_ACCESS_ERRORS = ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "EXPIRED_TOKEN")


class StorageError(RuntimeError):
    """A location cannot be listed, read or written; the message names it and says what to check."""


class StorageAccessError(StorageError):
    """The S3 endpoint refused the credentials."""


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(base: str, *names: str) -> str:
    """Append path components to a local path or an S3 URI."""
    return "/".join([base.rstrip("/"), *names])


def uri_name(uri: str) -> str:
    """The last path component: a file's name for local paths and S3 keys alike."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def video_id_from_uri(uri: str) -> str:
    """A video's id is its file name without the extension (``s3://b/x/clip01.mp4`` -> ``clip01``)."""
    name = uri_name(uri)
    stem, dot, _ = name.rpartition(".")
    return stem if dot else name


@dataclass
class VideoListing:
    """What an input holds: the videos to extract, and every other entry with the reason it is skipped.

    Nothing under an input folder disappears without a word: the summary counts the skipped entries by
    kind ("skipped 3: 2 .txt, 1 .png"), and those that look like videos but cannot be read as files (a
    pipe, a dangling symlink, a folder named x.mp4) are named one by one (``suspicious``).
    """

    videos: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (URI, kind: ".txt", HIDDEN, ...)

    def summary(self) -> str:
        """``"skipped 3: 2 .txt, 1 .png"``, most frequent kind first; empty when nothing was skipped."""
        if not self.skipped:
            return ""
        counts = sorted(
            Counter(kind for _, kind in self.skipped).items(), key=lambda item: (-item[1], item[0])
        )
        return f"skipped {len(self.skipped)}: " + ", ".join(f"{count} {kind}" for kind, count in counts)

    @property
    def suspicious(self) -> list[tuple[str, str]]:
        """Skipped entries named like videos that are not readable files, each worth naming."""
        return [
            (uri, kind)
            for uri, kind in self.skipped
            if kind in (NOT_A_FILE, DANGLING_LINK, FOLDER_NAMED_LIKE_A_VIDEO)
        ]


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _skip_kind(name: str) -> str:
    """The summary's kind for a regular file that is not a video: hidden, or its extension."""
    if name.startswith((".", "_")):
        return HIDDEN
    stem, dot, extension = name.rpartition(".")
    return f".{extension.lower()}" if dot and stem else "no extension"


class Storage:
    """Reads and writes local paths and ``s3://bucket/key`` URIs; picklable for Ray tasks.

    ``endpoint_url`` (default: the environment's ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) points
    S3 URIs at another S3-compatible server. S3 access is set up on first use, in the process that first
    meets an S3 URI: build and use the Storage in the driver before handing it to Ray tasks.
    """

    def __init__(
        self, endpoint_url: str | None = None, region: str | None = None, max_attempts: int = S3_MAX_ATTEMPTS
    ) -> None:
        env = os.environ  # the standard AWS variables, as boto3 and the AWS CLI read them
        endpoint_url = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint_url:
            parsed = urlparse(endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"S3 endpoint URL must look like http(s)://host:port, got {endpoint_url!r}")
        self.endpoint_url = endpoint_url or None
        self.region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        self.max_attempts = max_attempts
        self._keys: dict[str, str] | None = None  # static keys from the driver's chain, once S3 is used
        self._s3: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict:
        """What travels to Ray workers: the settings and the driver's static keys, not pyarrow's filesystems.

        A pickled ``S3FileSystem`` comes back with pyarrow's default retry strategy (3 attempts, with a
        quota), not ours: each process rebuilds its own from these settings instead.
        """
        return {name: value for name, value in self.__dict__.items() if name not in ("_s3", "_local")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _s3=None, _local=pafs.LocalFileSystem())

    def _s3_filesystem(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            if self._keys is None:  # first use, in this process: the driver, or a worker the keys missed
                self._keys = _static_credentials()
            retry = pafs.AwsDefaultS3RetryStrategy(max_attempts=self.max_attempts)
            options: dict = {"retry_strategy": retry}
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                options["scheme"] = parsed.scheme
                options["endpoint_override"] = parsed.netloc
                options["region"] = "us-east-1"  # S3-compatible servers ignore it; request signing needs one
            if self.region:
                options["region"] = self.region
            self._s3 = pafs.S3FileSystem(**options, **self._keys)
        return self._s3

    # -- locating -------------------------------------------------------------------------------------

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem that holds ``uri`` and the path inside it (``bucket/key`` for S3)."""
        if is_s3_uri(uri):
            path = uri.removeprefix("s3://").rstrip("/")
            if not path or path.startswith("/"):
                raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
            return self._s3_filesystem(), path
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"{uri}: unsupported URI scheme; use a local path or s3://bucket/prefix")
        return self._local, str(Path(uri.removeprefix("file://")).expanduser().absolute())

    def portable_filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """Like ``resolve``, for a library that pickles the filesystem into its own workers (Ray Train's
        ``storage_filesystem``): S3 goes through this Storage, rebuilt with its retries in each process,
        where a pickled ``S3FileSystem`` would fall back to pyarrow's 3 attempts."""
        filesystem, path = self.resolve(uri)
        if is_s3_uri(uri):
            filesystem = pafs.PyFileSystem(_StorageS3Handler(self))
        return filesystem, path

    def local_path(self, uri: str) -> str | None:
        """The path of a local file, or None for an S3 URI (callers then read the bytes)."""
        return None if is_s3_uri(uri) else self.resolve(uri)[1]

    def canonical(self, uri: str) -> str:
        """Absolute local paths and ``s3://bucket/key`` URIs without a trailing slash."""
        return uri.rstrip("/") if is_s3_uri(uri) else self.resolve(uri)[1]

    # -- reading --------------------------------------------------------------------------------------

    def list_videos(self, uri: str) -> VideoListing:
        """The videos under a folder or prefix (recursively, sorted), or listed in a text file (its order).

        Accepts a folder / ``s3://`` prefix (files with a video extension; everything else is counted in
        the listing's ``skipped``), a single video file, or a text file with one path or URI a line (blank
        lines and ``#`` comments skipped; relative paths are relative to the list file's folder).
        """
        uri = self.canonical(uri)
        kind = self.file_type(uri)
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such file, folder or S3 prefix")
        if kind == pafs.FileType.Directory:
            return self._list_local_folder(uri) if not is_s3_uri(uri) else self._list_s3_prefix(uri)
        if kind != pafs.FileType.File:
            raise StorageError(f"{uri}: {NOT_A_FILE}; pass a video, a folder or a text file listing videos")
        if is_video_name(uri):
            return VideoListing([uri])
        return VideoListing(self._read_video_list(uri))

    def _list_s3_prefix(self, uri: str) -> VideoListing:
        filesystem, path = self.resolve(uri)
        with self._explained(uri, "list"):
            infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        listing = VideoListing()
        for info in sorted(infos, key=lambda info: info.path):
            entry = f"s3://{info.path}"
            if info.type == pafs.FileType.Directory:
                if is_video_name(info.base_name):
                    listing.skipped.append((entry, FOLDER_NAMED_LIKE_A_VIDEO))
            elif is_video_name(info.base_name) and not info.base_name.startswith((".", "_")):
                listing.videos.append(entry)
            else:
                listing.skipped.append((entry, _skip_kind(info.base_name)))
        return listing

    def _list_local_folder(self, root: str) -> VideoListing:
        """A local folder, walked with ``os.scandir``: pyarrow's listing leaves out dangling symlinks.

        Symlinked folders are followed (each real folder once, so a link loop ends)."""
        listing = VideoListing()
        seen: set[str] = set()

        def walk(folder: str) -> None:
            real = os.path.realpath(folder)
            if real in seen:
                return
            seen.add(real)
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError as error:
                raise StorageError(f"cannot list {folder}: {error.strerror}") from error
            for entry in entries:
                try:
                    mode = entry.stat().st_mode  # follows symlinks
                except FileNotFoundError:
                    listing.skipped.append((entry.path, DANGLING_LINK))
                    continue
                if stat.S_ISDIR(mode):
                    if is_video_name(entry.name):
                        listing.skipped.append((entry.path, FOLDER_NAMED_LIKE_A_VIDEO))
                    walk(entry.path)
                elif not stat.S_ISREG(mode):
                    listing.skipped.append((entry.path, NOT_A_FILE))
                elif is_video_name(entry.name) and not entry.name.startswith((".", "_")):
                    listing.videos.append(entry.path)
                else:
                    listing.skipped.append((entry.path, _skip_kind(entry.name)))

        walk(root)
        return listing

    def _read_video_list(self, list_uri: str) -> list[str]:
        try:
            text = self.read_bytes(list_uri).decode("utf-8")
        except UnicodeDecodeError as error:
            raise StorageError(
                f"{list_uri}: not a video ({' '.join(VIDEO_EXTENSIONS)}) and not a UTF-8 text file "
                "listing videos, one path or URI a line"
            ) from error
        base = list_uri.rsplit("/", 1)[0]
        videos = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not is_video_name(entry):
                raise StorageError(
                    f"{list_uri}, line {line_number}: {entry!r} does not end in a video extension "
                    f"({' '.join(VIDEO_EXTENSIONS)}); list one video path or URI a line"
                )
            if not (is_s3_uri(entry) or entry.startswith(("/", "file://"))):
                entry = join_uri(base, entry)
            videos.append(self.canonical(entry))
        if any(map(is_s3_uri, videos)):
            self._s3_filesystem()  # resolve credentials here, in the driver (see the module docstring)
        return videos

    def list_files(self, uri: str, suffixes: tuple[str, ...]) -> list[str]:
        """URIs of the files below ``uri`` whose names end in one of ``suffixes`` (case-insensitive).

        Hidden names (a leading ``.`` or ``_``) are skipped: they are partial writes and bookkeeping.
        """
        filesystem, path = self.resolve(uri)
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        with self._explained(uri, "list"):
            infos = filesystem.get_file_info(selector)
        prefix = "s3://" if is_s3_uri(uri) else ""
        return sorted(
            prefix + info.path
            for info in infos
            if info.type == pafs.FileType.File
            and info.base_name.lower().endswith(suffixes)
            and not info.base_name.startswith((".", "_"))
        )

    def file_type(self, uri: str) -> pafs.FileType:
        filesystem, path = self.resolve(uri)
        with self._explained(uri, "look up"):
            return filesystem.get_file_info(path).type

    def read_bytes(self, uri: str) -> bytes:
        filesystem, path = self.resolve(uri)
        with self._explained(uri, "read"), filesystem.open_input_stream(path) as stream:
            return stream.read()

    # -- writing --------------------------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file so that readers see it complete or not at all."""
        filesystem, path = self.resolve(uri)
        with self._explained(uri, "write"):
            if is_s3_uri(uri):
                with filesystem.open_output_stream(path) as stream:
                    stream.write(data)
                return
            directory, name = os.path.split(path)
            filesystem.create_dir(directory, recursive=True)
            partial = os.path.join(directory, f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
            try:
                with filesystem.open_output_stream(partial) as stream:
                    stream.write(data)
                filesystem.move(partial, path)  # rename(2): atomic within one filesystem
            finally:
                if filesystem.get_file_info(partial).type != pafs.FileType.NotFound:
                    filesystem.delete_file(partial)

    def delete(self, uri: str) -> None:
        """Delete a file; one that is already gone is fine (another cleaner got there first)."""
        filesystem, path = self.resolve(uri)
        with self._explained(uri, "delete"), contextlib.suppress(FileNotFoundError):
            filesystem.delete_file(path)

    def modified_times(self, uri: str) -> dict[str, float]:
        """URI -> modification time (seconds since the epoch, the storage's own clock) of the files
        directly in a folder or under a prefix; empty when there is none."""
        filesystem, path = self.resolve(uri)
        selector = pafs.FileSelector(path, allow_not_found=True)
        with self._explained(uri, "list"):
            infos = filesystem.get_file_info(selector)
        prefix = "s3://" if is_s3_uri(uri) else ""
        return {
            prefix + info.path: info.mtime.timestamp() for info in infos if info.type == pafs.FileType.File
        }

    def incomplete_writes(self, uri: str) -> list[tuple[str, str]]:
        """What killed writers left below ``uri``: on S3 its incomplete multipart uploads (invisible, but
        stored and billed) as (key, upload id); locally the hidden ``.partial`` files of ``write_bytes``."""
        if not is_s3_uri(uri):
            filesystem, path = self.resolve(uri)
            selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
            with self._explained(uri, "list"):
                infos = filesystem.get_file_info(selector)
            return [(info.path, "") for info in infos if info.base_name.endswith(PARTIAL_SUFFIX)]
        import botocore.exceptions

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            pages = (
                self._s3_client()
                .get_paginator("list_multipart_uploads")
                .paginate(Bucket=bucket, Prefix=prefix)
            )
            return [
                (upload["Key"], upload["UploadId"]) for page in pages for upload in page.get("Uploads", [])
            ]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise StorageError(f"cannot list the incomplete uploads of {uri}: {error}") from error

    def abort_incomplete_writes(self, uri: str) -> int:
        """Remove what ``incomplete_writes`` finds; returns how many. Only for a location this process alone
        writes to (the extraction holds its output's lock): another writer's uploads in flight would go too.
        """
        incomplete = self.incomplete_writes(uri)
        if not is_s3_uri(uri):
            for path, _ in incomplete:
                self.delete(path)
            return len(incomplete)
        import botocore.exceptions

        bucket = uri.removeprefix("s3://").partition("/")[0]
        client = self._s3_client()
        try:
            for key, upload_id in incomplete:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            raise StorageError(f"cannot abort the incomplete uploads of {uri}: {error}") from error
        return len(incomplete)

    def _s3_client(self):
        """A boto3 client for what pyarrow's filesystem does not offer (multipart upload listings), with
        the same endpoint and patience; its keys come from the standard chain, as the driver's do."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region or ("us-east-1" if self.endpoint_url else None),
            config=config,
        )

    def check_writable(self, uri: str) -> None:
        """Fail early, before hours of decoding, when the output location refuses writes."""
        probe = join_uri(uri, f"_write_check.{uuid.uuid4().hex}")
        self.write_bytes(probe, b"")
        filesystem, path = self.resolve(probe)
        with self._explained(probe, "delete"):
            filesystem.delete_file(path)

    # -- errors ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _explained(self, uri: str, action: str) -> Iterator[None]:
        """Turn pyarrow's OSErrors into StorageErrors that say what to check, without any secret."""
        try:
            yield
        except FileNotFoundError as error:
            raise StorageError(f"cannot {action} {uri}: not found") from error
        except OSError as error:
            message = str(error)
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            if is_s3_uri(uri) and any(code in message for code in _ACCESS_ERRORS):
                raise StorageAccessError(
                    f"cannot {action} {uri}: the S3 endpoint{where} refused the credentials "
                    f"({_aws_error_code(message)}). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                    "AWS_PROFILE, the bucket's permissions, and --endpoint-url / AWS_ENDPOINT_URL"
                ) from error
            if is_s3_uri(uri) and "NETWORK_CONNECTION" in message:
                raise StorageError(
                    f"cannot {action} {uri}: no connection to the S3 endpoint{where} after "
                    f"{self.max_attempts} attempts. Check --endpoint-url / AWS_ENDPOINT_URL and the network"
                ) from error
            if is_s3_uri(uri) and "NO_SUCH_BUCKET" in message:
                raise StorageError(f"cannot {action} {uri}: the bucket does not exist{where}") from error
            raise StorageError(f"cannot {action} {uri}: {message}") from error


class _StorageS3Handler(pafs.FileSystemHandler):
    """pyarrow's S3 filesystem behind a picklable handler: each process uses its Storage's own."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _StorageS3Handler) and other.storage.endpoint_url == self.storage.endpoint_url
        )

    __hash__ = None

    @property
    def _s3(self) -> pafs.S3FileSystem:
        return self.storage._s3_filesystem()

    def get_type_name(self) -> str:
        return "timerefine-s3"

    def normalize_path(self, path):
        return self._s3.normalize_path(path)

    def get_file_info(self, paths):
        return self._s3.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._s3.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._s3.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._s3.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._s3.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self._s3.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self._s3.delete_file(path)

    def move(self, src, dest):
        self._s3.move(src, dest)

    def copy_file(self, src, dest):
        self._s3.copy_file(src, dest)

    def open_input_stream(self, path):
        return self._s3.open_input_stream(path)

    def open_input_file(self, path):
        return self._s3.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self._s3.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self._s3.open_append_stream(path, metadata=metadata)


def _aws_error_code(message: str) -> str:
    match = re.search(r"AWS Error (\w+)", message)
    return match.group(1) if match else "access denied"


def _static_credentials() -> dict[str, str]:
    """Keys from the driver's credential chain that can safely travel to workers (see module docstring)."""
    import boto3
    from botocore.credentials import RefreshableCredentials

    credentials = boto3.Session().get_credentials()
    if credentials is None or isinstance(credentials, RefreshableCredentials):
        return {}
    frozen = credentials.get_frozen_credentials()
    keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
    if frozen.token:
        keys["session_token"] = frozen.token
    return keys
