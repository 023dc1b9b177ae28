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
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

VIDEO_EXTENSIONS = (".avi", ".mkv", ".mov", ".mp4", ".webm")

# pyarrow's default of 3 attempts lost writes under 30% throttling responses (DESIGN.md section 7); with
# 10, AWS's standard backoff also rides out an endpoint that refuses connections for about a minute.
S3_MAX_ATTEMPTS = 10

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
        self._s3: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r})"

    def _s3_filesystem(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            retry = pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts)
            options: dict = {"retry_strategy": retry}
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                options["scheme"] = parsed.scheme
                options["endpoint_override"] = parsed.netloc
                options["region"] = "us-east-1"  # S3-compatible servers ignore it; request signing needs one
            if self.region:
                options["region"] = self.region
            self._s3 = pafs.S3FileSystem(**options, **_static_credentials())
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

    def local_path(self, uri: str) -> str | None:
        """The path of a local file, or None for an S3 URI (callers then read the bytes)."""
        return None if is_s3_uri(uri) else self.resolve(uri)[1]

    def canonical(self, uri: str) -> str:
        """Absolute local paths and ``s3://bucket/key`` URIs without a trailing slash."""
        return uri.rstrip("/") if is_s3_uri(uri) else self.resolve(uri)[1]

    # -- reading --------------------------------------------------------------------------------------

    def list_videos(self, uri: str) -> list[str]:
        """Video URIs under a folder or prefix (recursively, sorted), or listed in a text file (its order).

        Accepts a folder / ``s3://`` prefix (files with a video extension, hidden files skipped), a single
        video file, or a text file with one path or URI a line (blank lines and ``#`` comments skipped;
        relative paths are relative to the list file's folder).
        """
        uri = self.canonical(uri)
        kind = self.file_type(uri)
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such file, folder or S3 prefix")
        if kind == pafs.FileType.Directory:
            return self.list_files(uri, VIDEO_EXTENSIONS)
        if uri.lower().endswith(VIDEO_EXTENSIONS):
            return [uri]
        return self._read_video_list(uri)

    def _read_video_list(self, list_uri: str) -> list[str]:
        try:
            text = self.read_bytes(list_uri).decode("utf-8")
        except UnicodeDecodeError as error:
            raise StorageError(
                f"{list_uri}: not a video ({', '.join(VIDEO_EXTENSIONS)}) and not a UTF-8 text file listing "
                "videos, one path or URI a line"
            ) from error
        base = list_uri.rsplit("/", 1)[0]
        videos = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not entry.lower().endswith(VIDEO_EXTENSIONS):
                raise StorageError(
                    f"{list_uri}, line {line_number}: {entry!r} does not end in a video extension "
                    f"({', '.join(VIDEO_EXTENSIONS)}); list one video path or URI a line"
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
            partial = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.partial")
            try:
                with filesystem.open_output_stream(partial) as stream:
                    stream.write(data)
                filesystem.move(partial, path)  # rename(2): atomic within one filesystem
            finally:
                if filesystem.get_file_info(partial).type != pafs.FileType.NotFound:
                    filesystem.delete_file(partial)

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
