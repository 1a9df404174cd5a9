"""The host's cache (sqlite in cache_dir) and the lock that keeps archives of one host apart.

It holds two things:
- the **parent view**: what the last *committed* run saw (per path (size, mtime_ns, ctime_ns, inode)
  -> blob list, the tree per directory, the snapshots' chunk lists) and its manifest id (the next
  commit's parent). Written only after a successful commit, in one transaction, so a crashed run
  leaves the last good state. `view_of` names the manifest the view describes: after the parent is
  taken from the backend (a crashed run's commit, --adopt-head) the view no longer matches it.
- the **local index** (docs/PACK_INDEX.md, "Uploader"): blob hash -> (pack, offset, length, codec,
  raw_length, kind) and pack -> size, for every pack this host uploaded (or the backend said it
  stores), written as soon as the pack is in S3, before any commit. Dedup is a lookup here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sysbackup_domain.packs import PackEntry

from .metadata import Stat

KeyRange = tuple[bytes | None, bytes | None]  # paths strictly between the two (None: unbounded)
DB_NAME = "cache.sqlite"
LOCK_NAME = "archive.lock"
# A file modified this close to (or after) the previous scan may have changed again within the
# same mtime tick, after we read it: re-read it instead of trusting the stat match ("racy git").
RACY_WINDOW_NS = 1_000_000_000
SCHEMA_VERSION = "3"
V1_TABLES = ("stored", "unfinished_packs")  # the v1 index's, dropped by the upgrade
SQL_BATCH = 500  # host parameters per IN (...) query
SCAN_PAGE = 1000  # file rows read at a time by FileRows
KNOWN_ASKED_BEFORE_LOADING = 2048  # KnownBlobs: questions asked of the database before the set is loaded
BLOB_COLUMNS = "hash, pack_id, offset, length, codec, raw_length, kind"


def host_state_dir(cache_dir: Path, endpoint: str, config_dir: Path) -> Path:
    """This host's own corner of `cache_dir`: one per (stack endpoint, config directory).

    Several configs (hosts, stacks) may share a cache_dir without clobbering each other's parent,
    and two archives of *different* hosts may run at once; two of the same host may not.
    """
    scope = f"{endpoint}\n{config_dir.resolve()}"
    return cache_dir / hashlib.sha256(scope.encode()).hexdigest()[:16]


FILE_FIELDS = "size, mtime_ns, ctime_ns, inode, content, scanned_ns"


def _cached_file(row: Sequence) -> CachedFile:
    size, mtime_ns, ctime_ns, inode, content, scanned_ns = row
    return CachedFile(FileState(size, mtime_ns, ctime_ns, inode), decode_content(content), scanned_ns)


def encode_content(content: Iterable[str]) -> str:
    """A file's blob list as the cache stores it: hashes joined by spaces (hex never holds one).

    Decoding it is a split, ten times cheaper than JSON: a no-change run decodes every file's list."""
    return " ".join(content)


def decode_content(text: str) -> tuple[str, ...]:
    return tuple(text.split())


class CacheLockedError(RuntimeError):
    """Another archive run of this host holds the lock."""


class FileState(NamedTuple):  # one per file: a tuple is built and compared far faster than a frozen dataclass
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: Stat | os.stat_result) -> FileState:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class CachedFile(NamedTuple):
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


@dataclass(frozen=True, slots=True)
class IndexedBlob:
    """Where the local index says a blob is."""

    pack_id: str
    entry: PackEntry


@dataclass(frozen=True)
class ParentSnapshot:
    """A snapshot of the parent manifest: its stream index blob and the chunks that index lists."""

    stream_index: str
    chunks: tuple[str, ...]


class ParentCache:
    def __init__(self, cache_dir: Path, scope: str) -> None:
        """`scope` names the stack the cache belongs to (the API endpoint); another scope starts empty."""
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = cache_dir / DB_NAME
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Packs are recorded from the shipping threads while the archive thread reads: one writer at a time.
        self._lock = threading.RLock()
        self._create_schema()
        if self._meta("scope") != scope:
            self.clear()
        elif self._meta("schema") != SCHEMA_VERSION:
            # An older cache: its parent and file rows stay good; the index is rebuilt from the packs.
            for table in V1_TABLES:
                self.db.execute(f"DROP TABLE IF EXISTS {table}")
            self._respell_json_contents()
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
            CREATE TABLE IF NOT EXISTS files_pending (
                path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
                inode INTEGER, content TEXT, scanned_ns INTEGER);
            CREATE TABLE IF NOT EXISTS trees (path BLOB PRIMARY KEY, signature TEXT, tree TEXT);
            CREATE TABLE IF NOT EXISTS snapshots (name TEXT PRIMARY KEY, stream_index TEXT, chunks TEXT);
            CREATE TABLE IF NOT EXISTS blobs (
                hash TEXT PRIMARY KEY, pack_id TEXT NOT NULL, offset INTEGER, length INTEGER,
                codec TEXT, raw_length INTEGER, kind TEXT);
            CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack_id);
            CREATE TABLE IF NOT EXISTS packs (pack_id TEXT PRIMARY KEY, size INTEGER);
            """
        )

    # -- the parent view --------------------------------------------------------------------

    @property
    def parent_manifest(self) -> str | None:
        return self._meta("parent")

    @property
    def inflight_run(self) -> str | None:
        """The run id of a commit that was sent but whose outcome this cache never recorded."""
        return self._meta("inflight_run")

    @property
    def view_matches_parent(self) -> bool:
        """True if the trees, file rows and snapshots here are the parent manifest's own."""
        parent = self.parent_manifest
        return parent is not None and self._meta("view_of") == parent

    def lookup(self, path: str) -> CachedFile | None:
        row = self.db.execute(
            f"SELECT {FILE_FIELDS} FROM files WHERE path = ?", (os.fsencode(path),)
        ).fetchone()
        return None if row is None else _cached_file(row)

    def file_rows(self) -> FileRows:
        """A merge of the parent view's file rows with a walk's files (see FileRows); starts a new
        staging of the next view's rows (a crashed run's staged rows are dropped)."""
        with self._transaction():
            self.db.execute("DELETE FROM files_pending")
        return FileRows(self)

    def stage_files(
        self, rows: Iterable[tuple[str, FileState | None, tuple[str, ...]]], scanned_ns: int
    ) -> None:
        """Rows the next view holds in place of the parent view's: (path, state, content) for a file
        read, (path, None, ()) for a path whose row goes. Applied by record_commit only."""
        staged = [
            (
                os.fsencode(path),
                *(state or (None, None, None, None)),
                None if state is None else encode_content(content),
                scanned_ns,
            )
            for path, state, content in rows
        ]
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO files_pending VALUES (?, ?, ?, ?, ?, ?, ?)", staged)

    def tree_memo(self) -> dict[str, tuple[str, str]]:
        """Directory path -> (signature, tree hash) as the last committed run built them."""
        return {
            os.fsdecode(path): (signature, tree)
            for path, signature, tree in self.db.execute("SELECT path, signature, tree FROM trees")
        }

    def parent_snapshots(self) -> dict[str, ParentSnapshot]:
        """Snapshot name -> its stream index and chunks, as the last committed run took them."""
        return {
            name: ParentSnapshot(index, tuple(json.loads(chunks)))
            for name, index, chunks in self.db.execute("SELECT name, stream_index, chunks FROM snapshots")
        }

    # -- the local index --------------------------------------------------------------------

    @property
    def index_ready(self) -> bool:
        """False until the index was built (a new or lost cache, a v1 cache): see index_rebuild."""
        return self._meta("index_ready") == "1"

    def mark_index_ready(self) -> None:
        self._set_meta({"index_ready": "1"})

    def indexed_hashes(self) -> set[str]:
        """Every blob hash the local index knows (the archive's dedup set)."""
        return {row[0] for row in self.db.execute("SELECT hash FROM blobs")}

    def known_blobs(self) -> KnownBlobs:
        """Whether the local index holds a blob, for the archive's dedup (see KnownBlobs)."""
        return KnownBlobs(self)

    def is_indexed(self, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone() is not None

    def known_packs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT pack_id, size FROM packs"))

    def locate(self, hashes: Iterable[str]) -> dict[str, IndexedBlob]:
        """The indexed ones of `hashes` -> where they are."""
        found: dict[str, IndexedBlob] = {}
        for batch in _sql_batches(list(set(hashes))):
            marks = ",".join("?" * len(batch))
            rows = self.db.execute(f"SELECT {BLOB_COLUMNS} FROM blobs WHERE hash IN ({marks})", batch)
            for digest, pack_id, offset, length, codec, raw_length, kind in rows:
                entry = PackEntry(digest, kind, codec, offset, length, raw_length)
                found[digest] = IndexedBlob(pack_id, entry)
        return found

    def packs_of(self, hashes: Iterable[str]) -> tuple[set[str], set[str]]:
        """(the packs holding the indexed ones of `hashes`, the ones the index does not hold), with
        no row per blob in memory: a plan listing 100k chunks took ~50 MB as `locate`'s answers."""
        packs: set[str] = set()
        missing: set[str] = set()
        for batch in _sql_batches(list(set(hashes))):
            marks = ",".join("?" * len(batch))
            query = f"SELECT pack_id, COUNT(*) FROM blobs WHERE hash IN ({marks}) GROUP BY pack_id"
            found = 0
            for pack_id, count in self.db.execute(query, batch):
                packs.add(pack_id)
                found += count
            if found < len(batch):
                rows = self.db.execute(f"SELECT hash FROM blobs WHERE hash IN ({marks})", batch)
                missing.update(set(batch).difference(row[0] for row in rows))
        return packs, missing

    def trees_in(self, pack_ids: Iterable[str]) -> dict[str, IndexedBlob]:
        """Every tree blob the index holds in these packs (a restore reads a pack's trees in one GET)."""
        found: dict[str, IndexedBlob] = {}
        for batch in _sql_batches(sorted(set(pack_ids))):
            marks = ",".join("?" * len(batch))
            query = f"SELECT {BLOB_COLUMNS} FROM blobs WHERE kind = 'tree' AND pack_id IN ({marks})"
            for digest, pack_id, offset, length, codec, raw_length, kind in self.db.execute(query, batch):
                found[digest] = IndexedBlob(
                    pack_id, PackEntry(digest, kind, codec, offset, length, raw_length)
                )
        return found

    def record_pack(self, pack_id: str, size: int, entries: Sequence[PackEntry]) -> None:
        """Index a pack that is in S3 (its PUT succeeded, presign said stored, or its trailer was read)."""
        rows = [(e.hash, pack_id, e.offset, e.length, e.codec, e.raw_length, e.kind) for e in entries]
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?)", (pack_id, size))
            self.db.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def drop_packs(self, pack_ids: Iterable[str]) -> None:
        """Forget packs the backend refused (gone, condemned, corrupt...) and every blob indexed in them."""
        with self._transaction():
            for pack_id in set(pack_ids):
                self.db.execute("DELETE FROM blobs WHERE pack_id = ?", (pack_id,))
                self.db.execute("DELETE FROM packs WHERE pack_id = ?", (pack_id,))

    def drop_blobs(self, hashes: Iterable[str]) -> None:
        with self._transaction():
            self.db.executemany("DELETE FROM blobs WHERE hash = ?", ((h,) for h in set(hashes)))

    # -- writing the parent view ------------------------------------------------------------

    def mark_inflight(self, run_id: str) -> None:
        self._set_meta({"inflight_run": run_id})

    def record_commit(
        self,
        manifest_id: str,
        gone: Iterable[KeyRange] = (),
        trees: dict[str, tuple[str, str]] | None = None,
        snapshots: dict[str, ParentSnapshot] | None = None,
    ) -> None:
        """Make the cache a committed run's view, atomically: the file rows in the `gone` ranges go
        (FileRows.finish), the staged rows (stage_files) take effect; every other row stays as it was.
        `trees`: directory path -> (signature of what its tree was made from, tree hash); `snapshots`:
        what its snapshots hold.

        Only differences are written: a no-change run of 100k files rewrites nothing."""
        with self._transaction():
            for low, high in gone:
                self._delete_range(low, high)
            self.db.execute(
                "DELETE FROM files WHERE path IN (SELECT path FROM files_pending WHERE content IS NULL)"
            )
            self.db.execute(
                "INSERT OR REPLACE INTO files SELECT * FROM files_pending WHERE content IS NOT NULL"
            )
            self.db.execute("DELETE FROM files_pending")
            if trees is not None:
                self.db.execute("DELETE FROM trees")
                self.db.executemany(
                    "INSERT INTO trees VALUES (?, ?, ?)",
                    ((os.fsencode(path), signature, tree) for path, (signature, tree) in trees.items()),
                )
            self.db.execute("DELETE FROM snapshots")
            self.db.executemany(
                "INSERT INTO snapshots VALUES (?, ?, ?)",
                (
                    (name, snapshot.stream_index, json.dumps(list(snapshot.chunks)))
                    for name, snapshot in (snapshots or {}).items()
                ),
            )
            view = (("parent", manifest_id), ("view_of", manifest_id))
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", view)
            self.db.execute("DELETE FROM meta WHERE key = 'inflight_run'")

    def _delete_range(self, low: bytes | None, high: bytes | None) -> None:
        """Delete the file rows strictly between `low` and `high` (None: unbounded)."""
        bounds = [("path > ?", low), ("path < ?", high)]
        where = " AND ".join(test for test, bound in bounds if bound is not None) or "1"
        self.db.execute(
            f"DELETE FROM files WHERE {where}", [bound for _, bound in bounds if bound is not None]
        )

    def files_after(self, after: bytes | None, limit: int) -> list[Sequence]:
        """Up to `limit` file rows (path first) after `after` (from the first if None), in order."""
        if after is None:
            query, parameters = f"SELECT path, {FILE_FIELDS} FROM files ORDER BY path LIMIT ?", (limit,)
        else:
            query = f"SELECT path, {FILE_FIELDS} FROM files WHERE path > ? ORDER BY path LIMIT ?"
            parameters = (after, limit)
        return self.db.execute(query, parameters).fetchall()

    def adopt_parent(self, manifest_id: str) -> None:
        """Take `manifest_id` as the parent (our own crashed commit turned out to have landed)."""
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('parent', ?)", (manifest_id,))
            self.db.execute("DELETE FROM meta WHERE key = 'inflight_run'")

    def forget_unindexed_files(self) -> int:
        """Drop the file rows naming a blob the local index no longer has (a refused commit dropped its
        pack): the next run reads those files again and sends their blobs. Returns how many went."""
        indexed = self.indexed_hashes()
        with self._transaction():
            gone = [
                (path,)
                for path, content in self.db.execute("SELECT path, content FROM files")
                if not indexed.issuperset(decode_content(content))
            ]
            self.db.executemany("DELETE FROM files WHERE path = ?", gone)
        return len(gone)

    def _respell_json_contents(self) -> None:
        """Schema 1-2 kept a file's blob list as JSON; it is now `encode_content`'s spelling."""
        with self._transaction():
            rows = self.db.execute("SELECT path, content FROM files WHERE content LIKE '[%'").fetchall()
            self.db.executemany(
                "UPDATE files SET content = ? WHERE path = ?",
                ((encode_content(json.loads(content)), path) for path, content in rows),
            )

    def clear(self) -> None:
        with self._transaction():
            for table in ("files", "files_pending", "meta", "trees", "snapshots", "blobs", "packs"):
                self.db.execute(f"DELETE FROM {table}")

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")


class KnownBlobs:
    """`digest in known`: does the local index hold the blob? Asked of the database while questions
    are few (a no-change run asks about its trees only), from a set of every indexed hash once they
    are many (a first backup asks about every chunk). That set, for a 100k-blob index, is ~15 MB."""

    def __init__(self, cache: ParentCache, asked_before_loading: int = KNOWN_ASKED_BEFORE_LOADING) -> None:
        self._cache = cache
        self._asked_before_loading = asked_before_loading
        self._asked = 0
        self._hashes: set[str] | None = None

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        if self._hashes is None:
            self._asked += 1
            if self._asked <= self._asked_before_loading:
                return self._cache.is_indexed(digest)
            self._hashes = self._cache.indexed_hashes()
        return digest in self._hashes


class FileRows:
    """The parent view's file rows, read in path byte order alongside a walk that asks for its files
    in that same order: one ordered scan, in pages (a query per path cost a third of a no-change run,
    and holding every row costs ~250 bytes a file). The rows it passes over are of paths this run no
    longer has: `gone` keeps them as ranges, which record_commit deletes."""

    def __init__(self, cache: ParentCache) -> None:
        self._cache = cache
        self._page: deque[Sequence] = deque()
        self._read_up_to: bytes | None = None  # the last path read from the table
        self._exhausted = False
        self._last_asked: bytes | None = None
        self.gone: list[KeyRange] = []

    def lookup(self, path: str) -> CachedFile | None:
        """The row of `path`, or None; paths must be asked in ascending byte order, each once."""
        key = os.fsencode(path)
        if self._last_asked is not None and key <= self._last_asked:
            raise ValueError(f"file rows asked out of order: {path!r}")
        passed_over = False
        row = self._peek()
        while row is not None and row[0] < key:
            self._page.popleft()
            passed_over = True
            row = self._peek()
        if passed_over:
            self.gone.append((self._last_asked, key))
        self._last_asked = key
        if row is not None and row[0] == key:
            self._page.popleft()
            return _cached_file(row[1:])
        return None

    def finish(self) -> list[KeyRange]:
        """`gone`, with the rows after the last path asked (all of them if none was)."""
        if self._peek() is not None:
            self.gone.append((self._last_asked, None))
            self._page.clear()
            self._exhausted = True
        return self.gone

    def _peek(self) -> Sequence | None:
        if not self._page and not self._exhausted:
            rows = self._cache.files_after(self._read_up_to, SCAN_PAGE)
            self._exhausted = len(rows) < SCAN_PAGE
            if rows:
                self._read_up_to = rows[-1][0]
                self._page.extend(rows)
        return self._page[0] if self._page else None


def _sql_batches(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), SQL_BATCH):
        yield items[start : start + SQL_BATCH]
