"""Content-addressed memo store (diskcache, nothing evicted, JSON values) and atomic file writes.

``cache_dir`` is a trust boundary: whoever can write it decides what every stage reads back. The
store therefore never unpickles (``JsonDisk``): a row holding a pickle, key or value, is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_RAW, MODE_TEXT, UNKNOWN

# Nothing is ever dropped: eviction off and a size limit no disk reaches.
_NO_LIMIT = 2**62


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any, length: int = 64) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (first ``length`` characters)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def bytes_digest(data: bytes, length: int = 64) -> str:
    return hashlib.sha256(data).hexdigest()[:length]


class LockedError(RuntimeError):
    """Another process holds the lock: the same work is already running."""


class CacheError(RuntimeError):
    """The cache folder cannot be opened as a cache; the message names it."""


class UnsafeEntry(ValueError):
    """A cache row that would have to be unpickled (or read from outside the cache) to be read."""


class JsonDisk(diskcache.Disk):
    """diskcache's storage with pickle removed: keys and values are text, numbers or bytes only.

    diskcache's own ``Disk`` unpickles any row stored as a pickle, so a tampered ``cache.db`` could
    run code when read (the class of CVE-2025-69872). Here such a row is refused instead.
    """

    def put(self, key: Any) -> tuple[Any, bool]:
        if not isinstance(key, str):
            raise TypeError(f"cache keys are strings, got {type(key).__name__}")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:  # a pickled key: never unpickled; reads as None, which matches no lookup
            return None
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[Any, ...]:
        if not isinstance(value, str) or read:
            raise TypeError(f"cache values are JSON text, got {type(value).__name__}")
        return super().store(value, read, key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (MODE_RAW, MODE_TEXT) or read:
            raise UnsafeEntry(f"a cache row stored with mode {mode} (a pickle or a file handle)")
        if filename is not None and (os.path.isabs(filename) or ".." in Path(filename).parts):
            raise UnsafeEntry(f"a cache row pointing outside the cache: {filename!r}")
        return super().fetch(mode, filename, value, read)


class Cache:
    """A memo store keyed by the digest of everything that determines a value.

    Values are JSON text, never pickles. An entry that cannot be read back as JSON is a miss; one
    stored as a pickle is a miss too, never unpickled, and says so once on stderr.
    ``hits`` and ``misses`` count lookups per namespace, so tests and stages can prove what ran.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self._store = diskcache.Cache(
                str(self.directory),
                disk=JsonDisk,
                eviction_policy="none",
                size_limit=_NO_LIMIT,
                cull_limit=0,
            )
        except sqlite3.DatabaseError as exc:
            raise CacheError(
                f"{self.directory / 'cache.db'} is not a readable cache ({exc}); "
                "move it away or choose another cache_dir"
            ) from None
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.refused = 0

    def key(self, namespace: str, key_obj: Any) -> str:
        return f"{namespace}:{digest(key_obj)}"

    def get(self, namespace: str, key_obj: Any, valid: Callable[[Any], bool] | None = None) -> Any | None:
        """The stored value, or None on a miss: absent, unreadable, or (with ``valid``) of the wrong
        shape, which the caller then recomputes and overwrites."""
        try:
            raw = self._store.get(self.key(namespace, key_obj))
        except (UnsafeEntry, OSError, UnicodeDecodeError) as exc:
            raw = None
            self._refuse(exc)
        value = None
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
        if value is not None and valid is not None and not valid(value):
            value = None
        counter = self.hits if value is not None else self.misses
        counter[namespace] = counter.get(namespace, 0) + 1
        return value

    def set(self, namespace: str, key_obj: Any, value: Any) -> None:
        """Store a JSON-safe, non-None value. Callers never store failures."""
        if value is None:
            raise ValueError("refusing to cache None: a failure is never memoised")
        self._store.set(self.key(namespace, key_obj), canonical_json(value))

    def _refuse(self, exc: Exception) -> None:
        if not self.refused:
            print(f"cache {self.directory}: unreadable entry treated as a miss: {exc}", file=sys.stderr)
        self.refused += 1

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return len(self._store)
        prefix = f"{namespace}:"
        return sum(1 for k in self._store.iterkeys() if isinstance(k, str) and k.startswith(prefix))

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cache({str(self.directory)!r})"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, rename over it, fsync the folder (so
    the rename itself survives a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temp files ``atomic_write_bytes`` left beside ``path`` when a process was killed
    mid-write. Only for a caller that owns ``path`` (holds its lock): a live writer's temp would go."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an ``fcntl.flock`` on ``path`` (created if absent) for the block; LockedError at once
    if another process holds it. The kernel releases the lock when the process dies, however."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockedError(
                f"{what} is already running (process {holder} holds {path}); wait for it to finish, "
                "or use another save dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
