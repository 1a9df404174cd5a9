"""The host's parent cache (sqlite in cache_dir) and the lock that keeps archives of one host apart.

It holds what the last *committed* run saw: per path (size, mtime_ns, ctime_ns, inode) -> blob list,
the committed manifest id (the next commit's parent) and hashes known to be stored. It is written
only after a successful commit, in one transaction, so a crashed run leaves the last good state.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .metadata import Stat

DB_NAME = "cache.sqlite"
LOCK_NAME = "archive.lock"
# A file modified this close to (or after) the previous scan may have changed again within the
# same mtime tick, after we read it: re-read it instead of trusting the stat match ("racy git").
RACY_WINDOW_NS = 1_000_000_000
SCHEMA_VERSION = "1"


def host_state_dir(cache_dir: Path, endpoint: str, config_dir: Path) -> Path:
    """This host's own corner of `cache_dir`: one per (stack endpoint, config directory).

    Several configs (hosts, stacks) may share a cache_dir without clobbering each other's parent,
    and two archives of *different* hosts may run at once; two of the same host may not.
    """
    scope = f"{endpoint}\n{config_dir.resolve()}"
    return cache_dir / hashlib.sha256(scope.encode()).hexdigest()[:16]


class CacheLockedError(RuntimeError):
    """Another archive run of this host holds the lock."""


@dataclass(frozen=True, slots=True)  # one per file
class FileState:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: Stat | os.stat_result) -> FileState:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


@dataclass(frozen=True, slots=True)
class CachedFile:
    state: FileState
    content: tuple[str, ...]
    scanned_ns: int  # wall-clock start of the run that read it

    def reusable_for(self, current: FileState) -> bool:
        """True if `current` is the file we read then, and it was settled when we read it."""
        settled_before = self.scanned_ns - RACY_WINDOW_NS
        return (
            current == self.state and current.mtime_ns < settled_before and current.ctime_ns < settled_before
        )


class ArchiveLock:
    """An exclusive fcntl lock on `cache_dir/archive.lock`, held for a whole archive run."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> ArchiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheLockedError(
                    f"another archive run of this host is in progress (lock {self.path} is held)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


class ParentCache:
    def __init__(self, cache_dir: Path, scope: str) -> None:
        """`scope` names the stack the cache belongs to (the API endpoint); another scope starts empty."""
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = cache_dir / DB_NAME
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()  # packs are recorded from the shipping threads
        self._create_schema()
        if self._meta("scope") != scope or self._meta("schema") != SCHEMA_VERSION:
            self.clear()
            self._set_meta({"scope": scope, "schema": SCHEMA_VERSION})

    def close(self) -> None:
        self.db.close()

    def _create_schema(self) -> None:
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS files (
                path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
                inode INTEGER, content TEXT, scanned_ns INTEGER);
            CREATE TABLE IF NOT EXISTS stored (hash TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS unfinished_packs (pack_id TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS trees (path BLOB PRIMARY KEY, signature TEXT, tree TEXT);
            """
        )

    # -- reading ----------------------------------------------------------------------------

    @property
    def parent_manifest(self) -> str | None:
        return self._meta("parent")

    @property
    def inflight_run(self) -> str | None:
        """The run id of a commit that was sent but whose outcome this cache never recorded."""
        return self._meta("inflight_run")

    def unfinished_packs(self) -> list[str]:
        """Packs a run presigned (and may have PUT) since the last recorded commit: a run crashed."""
        return [row[0] for row in self.db.execute("SELECT pack_id FROM unfinished_packs ORDER BY pack_id")]

    def lookup(self, path: str) -> CachedFile | None:
        row = self.db.execute(
            "SELECT size, mtime_ns, ctime_ns, inode, content, scanned_ns FROM files WHERE path = ?",
            (os.fsencode(path),),
        ).fetchone()
        if row is None:
            return None
        size, mtime_ns, ctime_ns, inode, content, scanned_ns = row
        return CachedFile(FileState(size, mtime_ns, ctime_ns, inode), tuple(json.loads(content)), scanned_ns)

    def tree_memo(self) -> dict[str, tuple[str, str]]:
        """Directory path -> (signature, tree hash) as the last committed run built them."""
        return {
            os.fsdecode(path): (signature, tree)
            for path, signature, tree in self.db.execute("SELECT path, signature, tree FROM trees")
        }

    def known_stored(self, hashes: Iterable[str]) -> set[str]:
        wanted = list(set(hashes))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            found.update(
                row[0] for row in self.db.execute(f"SELECT hash FROM stored WHERE hash IN ({marks})", batch)
            )
        return found

    def all_stored(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT hash FROM stored")}

    # -- writing ----------------------------------------------------------------------------

    def add_unfinished_packs(self, pack_ids: Iterable[str]) -> None:
        """Remember packs about to be PUT, before the PUT: a crash before their registration leaves
        them in the bucket unregistered, and the next run adopts them instead of sending the data again."""
        with self._lock, self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO unfinished_packs VALUES (?)", ((i,) for i in pack_ids))

    def mark_inflight(self, run_id: str) -> None:
        self._set_meta({"inflight_run": run_id})

    def record_commit(
        self,
        manifest_id: str,
        files: Iterable[tuple[str, FileState, tuple[str, ...]]],
        scanned_ns: int,
        stored: Iterable[str],
        kept: Iterable[str] = (),
        trees: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        """Make the cache a committed run's view, atomically: `files` are the rows it read, `kept` the
        paths whose rows it reused as they are, every other row goes; `stored` = what it references;
        `trees`: directory path -> (signature of what its tree was made from, tree hash).

        Only differences are written: a no-change run of 100k files rewrites nothing."""
        rows = [
            (os.fsencode(path), s.size, s.mtime_ns, s.ctime_ns, s.inode, json.dumps(list(c)), scanned_ns)
            for path, s, c in files
        ]
        wanted_paths = {os.fsencode(path) for path in kept}.union(row[0] for row in rows)
        wanted_hashes = set(stored)
        with self._transaction():
            gone = [row for row in self.db.execute("SELECT path FROM files") if row[0] not in wanted_paths]
            self.db.executemany("DELETE FROM files WHERE path = ?", gone)
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            # Only what this manifest references: those blobs live as long as it is retained,
            # while anything older may have been collected since.
            had = {row[0] for row in self.db.execute("SELECT hash FROM stored")}
            self.db.executemany("DELETE FROM stored WHERE hash = ?", ((h,) for h in had - wanted_hashes))
            self.db.executemany("INSERT INTO stored VALUES (?)", ((h,) for h in wanted_hashes - had))
            if trees is not None:
                self.db.execute("DELETE FROM trees")
                self.db.executemany(
                    "INSERT INTO trees VALUES (?, ?, ?)",
                    ((os.fsencode(path), signature, tree) for path, (signature, tree) in trees.items()),
                )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('parent', ?)", (manifest_id,))
            self.db.execute("DELETE FROM meta WHERE key = 'inflight_run'")
            self.db.execute("DELETE FROM unfinished_packs")  # the run finished: its packs are registered

    def adopt_parent(self, manifest_id: str) -> None:
        """Take `manifest_id` as the parent (our own crashed commit turned out to have landed)."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('parent', ?)", (manifest_id,))
            self.db.execute("DELETE FROM meta WHERE key = 'inflight_run'")

    def forget_content(self) -> None:
        """Drop file and stored-hash knowledge (the backend says blobs we thought stored are gone)."""
        with self._transaction():
            self.db.execute("DELETE FROM trees")
            self.db.execute("DELETE FROM files")
            self.db.execute("DELETE FROM stored")

    def clear(self) -> None:
        with self._transaction():
            for table in ("files", "stored", "meta", "unfinished_packs", "trees"):
                self.db.execute(f"DELETE FROM {table}")

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
