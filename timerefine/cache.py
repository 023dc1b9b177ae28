"""timerefine's cache of built models: each entry built once, checked, published whole, rebuilt when broken.

The built-in LLMs, the built-in encoders and GGUF conversions are folders under ``$TIMEREFINE_HOME``
(default ``~/.cache/timerefine``) that many processes may want at the same moment: the ranks of a training
run, the encoder actors of an extraction, jobs started together on a fresh machine. A folder renamed into
place once built is not enough (an entry was once found published with its tokenizer and no config or
weights, and stayed broken until deleted by hand), so an entry here is

- built once: under a file lock (``filelock``, as Hugging Face guards its hub cache), in
  ``<cache>/.locks/<entry>.lock``; other processes wait for it, then use what it built;
- checked before it is published: the builder's own check (loading config, tokenizer, preprocessing back)
  and every safetensors file's header against its size;
- published whole, with a manifest written last (``timerefine_cache.json``: every file and its size),
  by one rename of the staging folder;
- rebuilt when found incomplete: an entry whose manifest is missing, or whose files no longer match it (a
  file deleted or truncated by hand, a copy interrupted), is built again on next use.

Checking an entry on each use costs one small JSON read and a ``stat`` per file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger("timerefine.cache")

MANIFEST = "timerefine_cache.json"
LOCKS = ".locks"


def timerefine_home() -> Path:
    """Root of timerefine's caches: ``$TIMEREFINE_HOME``, else ``~/.cache/timerefine``."""
    return Path(os.environ.get("TIMEREFINE_HOME") or Path.home() / ".cache" / "timerefine")


def cached_build(
    directory: Path, build: Callable[[Path], None], check: Callable[[Path], None] | None = None
) -> Path:
    """``directory``, built by ``build(staging)`` unless a complete copy is already there.

    ``check(staging)`` raises when what was built cannot be used (it should load the entry back); the
    weights' headers are checked besides. Safe when several processes ask for the same entry at once: one
    builds, the others wait on the lock and then find the entry complete.
    """
    if incomplete_reason(directory) is None:
        return directory
    lock_path = directory.parent / LOCKS / f"{directory.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for %s: another process is building %s", lock_path, directory.name)
        lock.acquire()
    try:
        reason = incomplete_reason(directory)  # another process may have built it while this one waited
        if reason is None:
            return directory
        if directory.exists():
            logger.warning("cache entry %s is incomplete (%s); rebuilding it", directory, reason)
        started = time.perf_counter()
        _build_and_publish(directory, build, check)
        logger.info("built cache entry %s in %.1f s", directory, time.perf_counter() - started)
    finally:
        lock.release()
    return directory


def incomplete_reason(directory: Path) -> str | None:
    """Why ``directory`` is not a complete cache entry (None when it is one)."""
    manifest = directory / MANIFEST
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "not built" if not directory.exists() else f"no {MANIFEST}: its build never finished"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST}: {error}"
    for name, size in files.items():
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} when it was built"
    return None


def check_safetensors(directory: Path) -> None:
    """Raise unless the folder has weights and every ``*.safetensors`` file's header matches its size."""
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.rglob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors weights were written")
    for file in files:
        try:
            with safe_open(file, framework="numpy") as weights:
                weights.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: unreadable weights ({error})") from error


def _build_and_publish(directory: Path, build: Callable[[Path], None], check: Callable[[Path], None] | None):
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    stale = directory.parent / f".{directory.name}-stale-{uuid.uuid4().hex[:8]}"
    try:
        build(staging)
        check_safetensors(staging)
        if check is not None:
            check(staging)
        files = {
            str(path.relative_to(staging)): path.stat().st_size
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")
        if directory.exists():  # an incomplete entry: moved aside first, so the rename below publishes
            directory.rename(stale)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
