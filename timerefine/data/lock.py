"""One writer at a time per output location: a lock beside the parts, on local disk and on S3 alike.

Two extractions into one table would both extract the same videos and write each one twice. Neither a
local folder nor S3 offers one locking primitive that works on both (and not every S3-compatible store
has conditional writes), so the lock is a protocol over what both do offer, a whole-object write and a
consistent listing:

1. a writer puts its own entry ``<output>/_writers/<token>.json`` (who it is: host, process, command);
2. it lists ``_writers/``; any other entry that is alive means someone else holds the output, so it
   removes its own entry and is refused, naming the holder;
3. otherwise it holds the output, and rewrites its entry every ``heartbeat_s`` while it runs.

Two writers can never both proceed: whichever lists second sees the other's entry (both may be refused
if they start within the same instant; the message says to retry). An entry is stale, and removed by the
next writer, when its process is gone from this same machine (same host name and boot), or when it has
not been rewritten for ``stale_after_s`` seconds, measured on the storage's own clock (both entries'
modification times), so that clocks that differ between machines do not matter. The folder's leading
underscore hides it from ``pyarrow.dataset`` and pandas readers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from timerefine.data.storage import Storage, StorageError, join_uri, uri_name

logger = logging.getLogger(__name__)

LOCK_FOLDER = "_writers"


class OutputBusyError(StorageError):
    """Another live writer holds the output."""


def _boot_id() -> str:
    """This machine's boot (Linux); with the host name it tells whether a process id is ours to check."""
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else ""


@dataclass(frozen=True)
class Holder:
    """Who wrote a lock entry: enough to tell whether it is still running, and to name it in a message."""

    host: str
    boot_id: str
    pid: int
    process_started: float  # the process's start time, so that a recycled pid is not taken for it
    started_at: str  # when it took the lock (ISO 8601, its own clock), for people reading the message
    command: str

    @classmethod
    def of_this_process(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            boot_id=_boot_id(),
            pid=os.getpid(),
            process_started=psutil.Process().create_time(),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(sys.argv)[:300],
        )

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started_at}: {self.command}"

    def gone(self) -> bool:
        """True when this holder ran on this machine and its process no longer runs."""
        if (self.host, self.boot_id) != (socket.gethostname(), _boot_id()):
            return False  # another machine's process: only its heartbeat tells
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) > 1.0
        except psutil.NoSuchProcess:
            return True


class OutputLock:
    """Hold ``output`` for this process while the ``with`` block runs (see the module docstring)."""

    def __init__(
        self, output: str, storage: Storage, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
    ) -> None:
        if not stale_after_s > 2 * heartbeat_s:
            raise ValueError("stale_after_s must exceed two heartbeats, or a live writer would look stale")
        self.output = output
        self.storage = storage
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.folder = join_uri(output, LOCK_FOLDER)
        self.entry = join_uri(self.folder, f"{uuid.uuid4().hex}.json")
        self.holder = Holder.of_this_process()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the output, or raise ``OutputBusyError`` naming the live writer that holds it."""
        self._write_entry()
        try:
            others = self._live_others()
        except BaseException:
            self.storage.delete(self.entry)
            raise
        if others:
            self.storage.delete(self.entry)
            entry, holder = others[0]
            raise OutputBusyError(
                f"{self.output} is being written by another job ({holder.describe()}); two writers would "
                f"write videos twice. Wait for it to finish and rerun (it resumes), or, if that job is gone "
                f"for good, delete {entry} (a writer that stops its heartbeat is taken over after "
                f"{self.stale_after_s:g} s)"
            )
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        self.storage.delete(self.entry)

    def _write_entry(self) -> None:
        self.storage.write_bytes(self.entry, json.dumps(asdict(self.holder)).encode())

    def _live_others(self) -> list[tuple[str, Holder]]:
        """The other entries that belong to live writers; stale ones are removed on the way."""
        entries = self.storage.modified_times(self.folder)
        now = entries.get(self.entry)
        if now is None:
            raise StorageError(f"{self.entry}: written but not listed; the storage is not consistent")
        live = []
        for entry, modified in sorted(entries.items(), key=lambda item: item[1]):
            if entry == self.entry:
                continue
            try:
                holder = Holder(**json.loads(self.storage.read_bytes(entry)))
            except StorageError:  # released while we looked
                continue
            except (ValueError, TypeError):  # not an entry this code wrote: a stranger's file, kept
                logger.warning("ignoring %s: not a writer lock entry", entry)
                continue
            silent_s = now - modified
            if holder.gone() or silent_s > self.stale_after_s:
                why = "its process is gone" if holder.gone() else f"no heartbeat for {silent_s:.0f} s"
                logger.warning("taking over %s from %s (%s)", self.output, holder.describe(), why)
                self.storage.delete(entry)
                continue
            live.append((entry, holder))
        return live

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_entry()
            except StorageError as error:  # keep beating: the storage may be back by the next one
                logger.warning("cannot renew the lock %s: %s", uri_name(self.entry), error)
