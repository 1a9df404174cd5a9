"""One `archive` run: pick, walk, read what changed, pack, ship, build trees, snapshot, commit.

The order is what makes a crash harmless: every pack is in S3 and in the local index before the trees
that name its blobs, the manifest is committed only after everything is uploaded, and the parent view
in the cache is updated last. The commit lists the packs of what is new and where the trees the
backend walks are (commit_plan); a refusal (422) names packs and blobs the local index was wrong
about: they are forgotten, the backend's pack list is read again, and what is still missing is sent.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import marshal
import os
import stat
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sysbackup_domain import canonical
from sysbackup_domain.chunking import FILE_CHUNKING, chunk_file, chunk_sparse_file
from sysbackup_domain.manifest import MAX_WARNING_CHARS, MAX_WARNINGS, MAX_WARNINGS_BYTES, SnapshotRecord
from sysbackup_domain.tree import Tree, TreeEntry, encode_tree

from .api import ApiClient, ApiError
from .cache import ArchiveLock, CachedFile, FileRows, FileState, ParentCache, ParentSnapshot, host_state_dir
from .commit_plan import (
    CommitPlan,
    FetchedParent,
    ParentSide,
    PlanInputs,
    StoredTrees,
    TreeChanges,
    TreeShare,
    TreeWalk,
    ViewParent,
    resolve,
    walk_changes,
)
from .config import Config
from .fetch import BlobFetcher, MissingBlob, stream_chunks
from .heap import cyclic_gc_paused, pin_mmap_threshold
from .index_rebuild import rebuild_index
from .metadata import Stat, acl_text, encode_xattrs, group_name, hardlink_id, user_name
from .net import RequestCounter
from .pickers import run_pickers
from .sink import BlobSink, PackShipper, SealedPack, fault_point
from .snapshots import take_snapshots
from .transfer import Transfer
from .walker import Node, Walk, walk

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_WARNINGS = 2  # the run committed a manifest, but something was skipped or incomplete
LOCK_POLL_S = 0.1
# A refused commit is retried after forgetting what the refusal named; these bound the retries.
COMMIT_REFUSALS_MAX = 3  # commits refused (422) within one pass
RUNS_MAX = 3  # passes over the files (a pass sends again what the index lost)
# The walk's files are read in batches while the walk goes on; a directory's tree is built once its
# files are read, and its entries are then let go (see DirectoryTrees).
READ_BATCH = 1024  # files to read before the reading threads are started on them
WAITING_ENTRIES_MAX = 4096  # entries of walked directories waiting for their files before a batch is read
# Rows of the next cache view kept before they are written (a transaction each: 100 a 100k-file run
# cost 0.6 s; 8192 rows are ~3 MB).
STAGED_ROWS_MAX = 8192


class CommitConflict(RuntimeError):
    """The backend's head for this host is not the parent this host knows."""


class CacheWasLost(RuntimeError):
    """A new cache's host has a head: its index must be rebuilt before anything is sent."""

    def __init__(self, head: dict) -> None:
        super().__init__(f"this host's cache is new but the backend has its head {head.get('manifest_id')}")
        self.head = head


class MissingBlobs(RuntimeError):
    """Blobs the commit needs are in no pack the backend knows for this host: they must be sent again."""


class CommitRefused(RuntimeError):
    """The backend kept refusing the commit (422) after the host sent what it named."""


@dataclass(slots=True)  # one per file
class FileOutcome:
    """What reading (or reusing) one regular file produced."""

    content: tuple[str, ...]
    state: FileState  # the stat the content belongs to (what the cache records)
    st: Stat  # metadata for the tree entry
    bytes_read: int = 0
    reused: bool = False
    cacheable: bool = True  # False for an inconsistent read: the next run must read it again
    parent_content: tuple[str, ...] = ()  # the parent view's content at its path (the commit lists the rest)


@dataclass
class RunStats:
    files: int = 0
    dirs: int = 0
    bytes_read: int = 0
    bytes_total: int = 0  # size of every file in the tree, read or reused
    files_read: int = 0
    files_reused: int = 0
    snapshots: int = 0
    snapshot_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class RunContent:
    """What a run's manifest holds, and what the commit plan needs to compare it with the parent."""

    previous_memo: dict[str, tuple[str, str]]  # the parent's trees by directory (the cache's view)
    root: str | None = None
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    chunks_of: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stream index -> chunks
    # The trees' share of the commit plan, gathered by the walk against the parent it knew (None: the
    # cache's view was not that parent's; the commit walks the stored trees).
    trees: TreeChanges | None = None

    def snapshots_for_cache(self) -> dict[str, ParentSnapshot]:
        return {
            s.name: ParentSnapshot(s.content, self.chunks_of.get(s.content, ()))
            for s in self.snapshots
            if s.content is not None
        }


@dataclass
class ArchiveOptions:
    quiet: bool = False
    adopt_head: bool = False  # take the backend's head as parent (after losing the cache)
    root_path: str = "/"  # what "/" is: tests archive a scratch directory as if it were root


@dataclass
class ArchiveResult:
    manifest_id: str
    root: str
    warnings: list[str]
    stats: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return EXIT_WARNINGS if self.warnings else EXIT_OK


class Progress:
    """One self-overwriting status line on stderr, when it is a terminal and not silenced."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._lock = threading.Lock()

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if force or now - self._last >= 0.5:
                self._last = now
                sys.stderr.write("\r\x1b[K" + text)
                sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class Archiver:
    def __init__(self, config: Config, api: ApiClient, transfer: Transfer, options: ArchiveOptions) -> None:
        self.config = config
        self.api = api
        self.transfer = transfer
        self.options = options
        self.counter: RequestCounter = api.counter
        # A cache with neither parent nor index is new or was lost: the backend's head, if any, is
        # this host's own last commit (a clone keeps its cache, and the original's next run catches it).
        self.cache_was_lost = False

    def run(self) -> ArchiveResult:
        pin_mmap_threshold()  # pack-sized buffers go back to the kernel when freed (see heap.py)
        state_dir = host_state_dir(self.config.content.cache_dir, self.api.endpoint, self.config.config_dir)
        with ArchiveLock(state_dir):
            cache = ParentCache(state_dir, scope=self.api.endpoint)
            try:
                self.cache_was_lost = cache.parent_manifest is None and not cache.index_ready
                go_ahead = self._head_check() if self.cache_was_lost else _no_wait
                if not self.cache_was_lost:
                    self._ensure_index(cache)
                for attempt in range(1, RUNS_MAX + 1):
                    try:
                        with cyclic_gc_paused():
                            return self._run_once(cache, go_ahead)
                    except CacheWasLost as lost:
                        self._adopt_head_of_lost_cache(cache, lost.head)
                        go_ahead = _no_wait
                    except MissingBlobs as error:
                        if attempt == RUNS_MAX:
                            raise CommitRefused(f"{error} (still, after {RUNS_MAX} passes)") from error
                        # The index vouched for blobs the backend no longer has (gc, a lost pack):
                        # read again the files that hold them, so their blobs are sent again.
                        forgotten = cache.forget_unindexed_files()
                        logger.warning("%s; sending them again (%d files to read again)", error, forgotten)
                raise AssertionError("unreachable")
            finally:
                cache.close()

    def _ensure_index(self, cache: ParentCache) -> int:
        """A cache without its local index (new, lost, from v1) learns the host's packs first; returns
        how many packs the backend listed (0 if the index was there).

        A lost cache is rebuilt from every pack's trailer, so nothing already stored is sent again."""
        if cache.index_ready:
            return 0
        progress = Progress(not self.options.quiet)
        try:
            report = rebuild_index(self.api, self.transfer, cache, progress=progress.show)
        finally:
            progress.done()
        if report.packs_read:
            logger.info("local index rebuilt: %d packs, %d blobs", report.packs_read, report.blobs_indexed)
        cache.mark_index_ready()
        return report.packs_listed

    def _head_check(self) -> Callable[[], None]:
        """A new cache (a host's first run, or a lost cache) must know the backend's head before it sends
        anything. It is asked (GET /manifests, from the function the commit calls anyway, so a first run
        starts no other function) while the pickers, the walk and the first reads run: its cold start is
        off the run's critical path. The returned go-ahead waits for the answer: no head, a first run
        (an empty index is right); a head, CacheWasLost (the run stops with nothing sent)."""
        asking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head")
        answer = asking.submit(self._head)
        asking.shutdown(wait=False)

        def go_ahead() -> None:
            head = answer.result()
            if head is not None:
                raise CacheWasLost(head)

        return go_ahead

    def _adopt_head_of_lost_cache(self, cache: ParentCache, head: dict) -> None:
        """The cache was lost: the index is rebuilt from the host's packs (nothing stored is sent again)
        and the head is the parent (rather than a 409 for a commit planned against no parent)."""
        self._ensure_index(cache)
        logger.warning("this host's cache is new: taking %s as parent", head["manifest_id"])
        cache.adopt_parent(str(head["manifest_id"]))

    def _run_once(self, cache: ParentCache, go_ahead: Callable[[], None]) -> ArchiveResult:
        run_id = uuid.uuid4().hex
        scan_started_ns = time.time_ns()
        stats = RunStats()
        warnings: list[str] = []
        progress = Progress(not self.options.quiet)
        shipper = PackShipper(
            self.api, self.transfer, on_stored=lambda pack: _index_pack(cache, pack), go_ahead=go_ahead
        )
        sink = BlobSink(shipper, known=cache.known_blobs(), spool_dir=cache.path.parent)

        picked = run_pickers(self.config.pickers_dir, self.config.content.picker_timeout_s)
        warnings.extend(picked.warnings)
        walked = walk(picked.paths, self.options.root_path)
        previous_memo = cache.tree_memo()
        content = RunContent(previous_memo=previous_memo, trees=_tree_changes(cache, previous_memo))
        memo: dict[str, tuple[str, str]] = {}  # directory trees, for the next run (see DirectoryTrees)
        rows = cache.file_rows()

        def on_stream(index: str, chunks: list[str]) -> None:
            content.chunks_of[index] = tuple(chunks)

        try:
            if picked.paths:
                trees = DirectoryTrees(self, cache, rows, sink, stats, warnings, progress, scan_started_ns)
                content.root = trees.build(walked, content.previous_memo, memo, content.trees)
            warnings.extend(walked.warnings)
            gone = rows.finish()
            content.snapshots, snapshot_warnings = take_snapshots(
                self.config.snapshots_dir,
                self.config.content.snapshot_timeout_s,
                sink.add_plaintext,
                on_bytes=lambda n: self._count_snapshot_bytes(stats, progress, n),
                on_stream=on_stream,
            )
            warnings.extend(snapshot_warnings)
            stats.snapshots = len(content.snapshots)
            if not picked.paths and not content.snapshots:
                warnings.append(f"nothing to back up: no paths from {self.config.pickers_dir}, no snapshots")
            progress.show("finishing uploads", force=True)
            sink.finish()
        except BaseException:
            sink.abort()
            progress.done()
            raise
        progress.done()
        go_ahead()  # a run that sent nothing still learns the head before planning its commit
        if not cache.index_ready:
            cache.mark_index_ready()  # a first run: the index is what this run sent
        manifest_stats = self._manifest_stats(stats, shipper, run_id, len(warnings))
        manifest_id = self._commit(cache, run_id, content, warnings, manifest_stats)
        fault_point("mid-commit")
        cache.record_commit(manifest_id, gone=gone, trees=memo, snapshots=content.snapshots_for_cache())
        report = dict(manifest_stats)
        report.update(
            elapsed_s=round(time.monotonic() - stats.started, 3),
            manifest_id=manifest_id,
            warnings=warnings,
            requests=self.counter.as_dict(),
        )
        return ArchiveResult(manifest_id, content.root or "", warnings, report)

    @staticmethod
    def _count_snapshot_bytes(stats: RunStats, progress: Progress, count: int) -> None:
        stats.snapshot_bytes += count
        progress.show(f"snapshots: {stats.snapshot_bytes / 2**20:.1f} MiB")

    # -- files ------------------------------------------------------------------------------

    def _read_file(
        self, node: Node, cached: CachedFile | None, sink: BlobSink, warnings: list[str]
    ) -> FileOutcome | None:
        previous = (
            FileOutcome(cached.content, cached.state, node.stat, reused=True, parent_content=cached.content)
            if cached is not None
            else None
        )
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            return _fallback(previous, warnings, f"cannot open {node.path!r}: {error.strerror}")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return _fallback(previous, warnings, f"{node.path!r} is no longer a regular file")
            if not _lock_shared(fd, self.config.content.lock_timeout_s):
                return _fallback(
                    previous,
                    warnings,
                    f"{node.path!r}: no shared lock within {self.config.content.lock_timeout_s:g} s",
                )
            outcome = self._read_locked(fd, node, sink, warnings)
            if cached is not None:
                outcome.parent_content = cached.content
            return outcome
        except OSError as error:
            return _fallback(previous, warnings, f"cannot read {node.path!r}: {error.strerror}")
        finally:
            os.close(fd)  # also drops the lock

    def _read_locked(self, fd: int, node: Node, sink: BlobSink, warnings: list[str]) -> FileOutcome:
        """Chunk and hash the file; if it changed while read, read once more, then warn."""
        bytes_read = 0
        for attempt in (1, 2):
            os.lseek(fd, 0, os.SEEK_SET)
            before = os.fstat(fd)
            content: list[str] = []
            length = 0
            last_chunk, digest = None, ""
            for chunk in _file_chunks(fd, before.st_size):
                if chunk is not last_chunk:  # a hole's zero block comes back as one object: hashed once
                    last_chunk, digest = chunk, sink.add_plaintext("data", chunk)
                content.append(digest)
                length += len(chunk)
            bytes_read += length
            after = os.fstat(fd)
            if _unchanged(before, after) and after.st_size == length:
                break
            if attempt == 2:
                warnings.append(
                    f"{node.path!r} changed while being read (twice); this copy may be inconsistent"
                )
                return FileOutcome(
                    tuple(content), FileState.of(after), Stat.of(after), bytes_read, cacheable=False
                )
        return FileOutcome(tuple(content), FileState.of(after), Stat.of(after), bytes_read=bytes_read)

    # -- commit -----------------------------------------------------------------------------

    def _commit(
        self, cache: ParentCache, run_id: str, content: RunContent, warnings: list[str], stats: dict[str, Any]
    ) -> str:
        parent = cache.parent_manifest
        crashed_run = cache.inflight_run
        cache.mark_inflight(run_id)
        refusals = conflicts = 0
        while True:
            plan = self._plan(cache, parent, content)
            request = {
                "parent": parent,
                "root": content.root,
                "snapshots": [s.to_json() for s in content.snapshots],
                "warnings": _bounded_warnings(warnings),
                "stats": stats,
                "days_retained": self.config.content.days_retained,
                **plan.request_fields(),
            }
            try:
                return str(self.api.commit_manifest(request)["manifest_id"])
            except ApiError as error:
                if error.status == 422:
                    refusals += 1
                    self._forget_refused(cache, error, refusals)
                    continue
                if error.status != 409:
                    raise
                conflicts += 1
                if conflicts > 2:
                    raise CommitConflict(_conflict_message(parent, self._head())) from error
                head = self._head()
                if head is not None and _run_id_of(head) == run_id:
                    return str(head["manifest_id"])  # our own commit landed; the reply was lost
                parent = self._parent_after_conflict(cache, parent, head, run_id, crashed_run, error)

    def _parent_after_conflict(
        self,
        cache: ParentCache,
        parent: str | None,
        head: dict | None,
        run_id: str,
        crashed_run: str | None,
        error: ApiError,
    ) -> str | None:
        """The parent to commit on after a 409, or CommitConflict (a clone, a concurrent run)."""
        if head is None:
            # No history at all (a new stack behind the same endpoint, or every manifest expired):
            # nothing to conflict with. Missing blobs, if any, come back as a 422.
            logger.warning("the backend has no manifest for this host; committing without a parent")
            return None
        if _run_id_of(head) == crashed_run or self.options.adopt_head or self.cache_was_lost:
            adopted = str(head["manifest_id"])
            logger.warning("taking %s as parent (a crashed run's commit, or a lost cache)", adopted)
            cache.adopt_parent(adopted)
            cache.mark_inflight(run_id)
            return adopted
        raise CommitConflict(_conflict_message(parent, head)) from error

    def _plan(self, cache: ParentCache, parent: str | None, content: RunContent) -> CommitPlan:
        """The commit's `packs` and `locations`; MissingBlobs if the index cannot place what it needs."""
        inputs = self._plan_inputs(cache, parent, content)
        try:
            listed, read = walk_changes(inputs)
        except MissingBlob as error:  # the parent's trees, read when the cache's view is not the parent's
            raise MissingBlobs(f"the parent's trees cannot be read: {error}") from error
        plan = resolve(listed, read, cache)
        if plan.unlocated:
            # A refusal dropped them, or they were never indexed: they may be in packs the index does
            # not know yet (gc repacked them, another run of this host uploaded them).
            rebuild_index(self.api, self.transfer, cache)
            plan = resolve(listed, read, cache)
        if plan.unlocated:
            sample = ", ".join(sorted(plan.unlocated)[:3])
            raise MissingBlobs(
                f"{len(plan.unlocated)} blobs of this run are in no pack the backend has for this host "
                f"(e.g. {sample})"
            )
        return plan

    def _plan_inputs(self, cache: ParentCache, parent: str | None, content: RunContent) -> PlanInputs:
        fetcher = BlobFetcher(self.api, self.transfer, cache)
        manifest: dict | None = None
        if parent is None:
            parent_snapshots: dict[str, ParentSnapshot] = {}
        elif cache.view_matches_parent:
            parent_snapshots = cache.parent_snapshots()  # the usual case: the cache describes the parent
        else:
            # The parent came from the backend (a crashed run's commit, a lost cache): read its trees.
            manifest = self.api.get_manifest(parent)
            parent_snapshots = _fetched_parent_snapshots(fetcher, manifest, content.snapshots)
        trees: TreeShare
        gathered = content.trees
        if gathered is not None and gathered.parent == parent and (parent is None or manifest is None):
            trees = gathered  # the usual case: the walk compared with this very parent
        else:
            trees = self._stored_tree_walk(cache, parent, manifest, content, fetcher)
        return PlanInputs(
            trees=trees,
            snapshots=content.snapshots,
            chunks_of=content.chunks_of,
            parent_snapshots=parent_snapshots,
        )

    def _stored_tree_walk(
        self,
        cache: ParentCache,
        parent: str | None,
        manifest: dict | None,
        content: RunContent,
        fetcher: BlobFetcher,
    ) -> TreeWalk:
        """The commit goes on another parent than the walk compared with: walk the stored trees, this
        run's read back from its packs (the walk let its directories go)."""
        side: ParentSide
        if manifest is not None:
            side, parent_root = FetchedParent(fetcher.fetch_all), manifest.get("root")
        elif parent is not None:  # the cache's view is this parent's
            memo = content.previous_memo
            side = ViewParent(memo, lambda path: _cached_content(cache, path))
            parent_root = memo[self.options.root_path][1] if self.options.root_path in memo else None
        else:
            side, parent_root = ViewParent({}, lambda path: None), None
        return TreeWalk(
            content.root, parent_root, self.options.root_path, StoredTrees(fetcher.fetch_all), side
        )

    @staticmethod
    def _forget_refused(cache: ParentCache, error: ApiError, refusals: int) -> None:
        """Drop from the local index the packs and blobs a 422 names (docs/PACK_INDEX.md)."""
        body = error.body if isinstance(error.body, dict) else {}
        missing = [digest for digest in body.get("missing") or [] if isinstance(digest, str)]
        packs = body.get("packs") if isinstance(body.get("packs"), dict) else {}
        if not missing and not packs:
            raise error  # refused for another reason (a malformed request): nothing to retry
        if refusals >= COMMIT_REFUSALS_MAX:
            raise CommitRefused(
                f"the backend refused the commit {refusals} times, last: {error.message}"
            ) from error
        logger.warning(
            "commit refused: packs %s, %d blobs missing; forgetting them and committing again",
            ", ".join(f"{pack_id} ({why})" for pack_id, why in sorted(packs.items())[:5]) or "none",
            len(missing),
        )
        cache.drop_packs(packs)
        cache.drop_blobs(missing)

    def _head(self) -> dict | None:
        return self.api.latest_manifest()

    def _manifest_stats(self, stats: RunStats, shipper: PackShipper, run_id: str, warnings: int) -> dict:
        # Integers only: the manifest is canonical JSON and some readers refuse floats.
        return {
            "run_id": run_id,
            "files": stats.files,
            "dirs": stats.dirs,
            "files_read": stats.files_read,
            "files_reused": stats.files_reused,
            "bytes": stats.bytes_total,
            "bytes_read": stats.bytes_read,
            "bytes_uploaded": shipper.counts.bytes_uploaded,
            "packs": shipper.counts.packs,
            "data_packs": shipper.counts.data_packs,
            # stored already (presign said so, or the PUT answered 412): a crashed run's, or identical bytes
            "packs_already_there": shipper.counts.packs_already_there,
            "blobs_new": shipper.counts.blobs_new,
            "snapshots": stats.snapshots,
            "snapshot_bytes": stats.snapshot_bytes,
            "warnings": warnings,
            "elapsed_ms": int((time.monotonic() - stats.started) * 1000),
            "requests": self.counter.as_dict(),
        }


class DirectoryTrees:
    """Read the walk's files and build its directories' trees as the walk goes, bottom-up.

    Files are read in batches (READ_BATCH, on the reading threads); a walked directory waits until
    its files are read, then its tree is built and its entries let go: a run holds the directories on
    the walk's path and a batch or so of files, not the whole tree (100k files held whole: ~1.3 KB
    each). Unchanged files are reused from the cache's rows, merged in path order (FileRows); the rows
    of what is read are staged for the next view as each batch is done.
    """

    def __init__(
        self,
        archiver: Archiver,
        cache: ParentCache,
        rows: FileRows,
        sink: BlobSink,
        stats: RunStats,
        warnings: list[str],
        progress: Progress,
        scanned_ns: int,
    ) -> None:
        self.archiver = archiver
        self.cache = cache
        self.rows = rows
        self.sink = sink
        self.stats = stats
        self.warnings = warnings
        self.progress = progress
        self.scanned_ns = scanned_ns
        self._to_read: list[tuple[Node, CachedFile | None]] = []
        self._waiting: deque[Node] = deque()  # walked directories, children first, trees not built yet
        self._waiting_entries = 0
        self._staged: list[tuple[str, FileState | None, tuple[str, ...]]] = []  # rows not yet in the cache

    def build(
        self,
        walked: Walk,
        previous: dict[str, tuple[str, str]],
        memo: dict[str, tuple[str, str]],
        changes: TreeChanges | None,
    ) -> str:
        """Every directory's tree; returns the root's.

        A directory whose tree would be made from exactly what the last committed run made it from
        (`previous`: path -> (signature, tree)), and whose tree the local index holds, reuses that tree
        unencoded; `memo` learns this run's signatures for the next run, `changes` the commit plan's
        share of each tree."""
        for node in walked.nodes():
            if not node.is_dir:
                self._add_file(node)
                if len(self._to_read) >= READ_BATCH:  # also within one directory of very many files
                    self._read_batch()
                continue
            self._waiting.append(node)
            self._waiting_entries += len(node.children or ())
            if self._waiting_entries >= WAITING_ENTRIES_MAX:
                self._read_batch()
            if not self._to_read:
                self._build_waiting(previous, memo, changes)
        self._read_batch()
        self._stage()
        self._build_waiting(previous, memo, changes)
        return str(walked.root.outcome)

    def _add_file(self, node: Node) -> None:
        cached = self.rows.lookup(node.path)
        if cached is not None and cached.reusable_for(FileState.of(node.stat)):
            node.outcome = FileOutcome(
                cached.content, cached.state, node.stat, reused=True, parent_content=cached.content
            )
            self.stats.files_reused += 1
        else:
            self._to_read.append((node, cached))

    def _read_batch(self) -> None:
        batch, self._to_read = self._to_read, []
        if not batch:
            return
        # Largest first: a big file read last would leave the other threads idle.
        batch.sort(key=lambda item: item[0].stat.st_size, reverse=True)
        lock = threading.Lock()
        stats = self.stats

        def read_one(item: tuple[Node, CachedFile | None]) -> None:
            node, cached = item
            local_warnings: list[str] = []
            outcome = self.archiver._read_file(node, cached, self.sink, local_warnings)
            with lock:
                self.warnings.extend(local_warnings)
                node.outcome = outcome
                if outcome is not None:
                    stats.bytes_read += outcome.bytes_read
                stats.files_read += 1
                self.progress.show(f"read {stats.files_read} files, {stats.bytes_read / 2**20:.1f} MiB")

        run_bounded(read_one, batch, workers=self.archiver.config.content.workers)
        self._staged.extend(_next_view_rows(batch))
        if len(self._staged) >= STAGED_ROWS_MAX:
            self._stage()

    def _stage(self) -> None:
        self.cache.stage_files(self._staged, self.scanned_ns)
        self._staged = []

    def _build_waiting(
        self,
        previous: dict[str, tuple[str, str]],
        memo: dict[str, tuple[str, str]],
        changes: TreeChanges | None,
    ) -> None:
        while self._waiting:
            directory = self._waiting.popleft()
            self._waiting_entries -= len(directory.children or ())
            self._build_one(directory, previous, memo, changes)

    def _build_one(
        self,
        directory: Node,
        previous: dict[str, tuple[str, str]],
        memo: dict[str, tuple[str, str]],
        changes: TreeChanges | None,
    ) -> None:
        children = [
            (child, child.outcome if child.type == "file" else None)
            for child in (directory.children or {}).values()
            if child.type != "file" or child.outcome is not None  # a skipped file has no entry
        ]
        signature = _tree_signature(children)
        remembered = previous.get(directory.path)
        if remembered is not None and remembered[0] == signature and self.sink.is_known_stored(remembered[1]):
            tree = remembered[1]
        else:
            entries = [_tree_entry(child, outcome, _subtree(child)) for child, outcome in children]
            tree = self.sink.add_plaintext(
                "tree", encode_tree(Tree(tuple(e for e in entries if e is not None)))
            )
        for child, outcome in children:
            if outcome is not None:
                self.stats.bytes_total += outcome.state.size
            self.stats.files += child.type == "file"
            self.stats.dirs += child.type == "dir"
        memo[directory.path] = (signature, tree)
        if changes is not None:
            changes.add_directory(
                directory.path, tree, ((o.content, o.parent_content) for _, o in children if o is not None)
            )
        directory.outcome = tree
        directory.children = None  # its tree is built: its entries are not needed any more


def _next_view_rows(
    batch: list[tuple[Node, CachedFile | None]],
) -> Iterator[tuple[str, FileState | None, tuple[str, ...]]]:
    """The cache rows a read batch changes: a row for what was read, none for what was skipped or read
    inconsistently (a reused previous version keeps its row)."""
    for node, cached in batch:
        outcome: FileOutcome | None = node.outcome
        if outcome is not None and outcome.cacheable and not outcome.reused:
            yield node.path, outcome.state, outcome.content
        elif cached is not None and (outcome is None or not outcome.cacheable):
            yield node.path, None, ()


def _tree_changes(cache: ParentCache, previous_memo: dict[str, tuple[str, str]]) -> TreeChanges | None:
    """What the walk compares its trees with: the parent the cache describes, or no parent; None if
    the cache's view is not its parent's (the commit then walks the stored trees)."""
    parent = cache.parent_manifest
    if parent is None:
        return TreeChanges(None, {})
    return TreeChanges(parent, previous_memo) if cache.view_matches_parent else None


def _subtree(node: Node) -> str | None:
    return node.outcome if node.is_dir else None


def _fetched_parent_snapshots(
    fetcher: BlobFetcher, manifest: dict, snapshots: list[SnapshotRecord]
) -> dict[str, ParentSnapshot]:
    """The parent's snapshots, with the chunk lists read back only where this run's stream differs."""
    ours = {s.name: s.content for s in snapshots}
    parents: dict[str, ParentSnapshot] = {}
    for snapshot in manifest.get("snapshots") or []:
        name, index = str(snapshot.get("name")), snapshot.get("content")
        if not index:
            continue
        differs = ours.get(name) not in (None, index)
        parents[name] = ParentSnapshot(index, tuple(stream_chunks(fetcher, index)) if differs else ())
    return parents


def _index_pack(cache: ParentCache, pack: SealedPack) -> None:
    cache.record_pack(pack.sha256, pack.size, pack.entries)


def _cached_content(cache: ParentCache, path: str) -> tuple[str, ...] | None:
    cached = cache.lookup(path)
    return cached.content if cached is not None else None


def run_bounded(work: Callable[[T], None], items: Iterable[T], workers: int) -> None:
    """`work(item)` for every item on `workers` threads, each taking its next item from `items` itself.

    No future, queue or wake-up per item: for small files that hand-off cost more than hashing the
    file (the stdlib tree's reading threads waited on the submitting thread a third of the time).
    Items are taken lazily, so a million files are never all pending. The first exception stops
    every thread from taking more and is re-raised.
    """
    source = iter(items)
    take = threading.Lock()
    failures: list[BaseException] = []

    def drain() -> None:
        while not failures:
            with take:
                item = next(source, _NO_MORE)
            if item is _NO_MORE:
                return
            try:
                work(item)  # type: ignore[arg-type]
            except BaseException as error:  # re-raised in the caller's thread
                failures.append(error)

    threads = [threading.Thread(target=drain, name=f"read-{n}") for n in range(max(1, workers))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as interrupted:  # Ctrl-C while joining: let the readers stop, then raise it
        failures.append(interrupted)
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]


_NO_MORE = object()


def _file_chunks(fd: int, size_hint: int) -> Iterator[bytes]:
    """The chunks of the open file `fd` (read from the start).

    A file fstat says is one blob is read with one read of its size (chunk_file's generic path
    reads into a one-blob buffer: 256 KiB allocated for each 1 KiB file of a 100k-file tree)."""
    if size_hint < FILE_CHUNKING.one_blob_up_to:
        data = _read_up_to(fd, size_hint + 1)  # one byte more than fstat said: was that the end?
        if len(data) <= size_hint:
            if data:
                yield data
            return
        os.lseek(fd, 0, os.SEEK_SET)  # it grew since fstat: read it the general way
    around_holes = chunk_sparse_file(fd, size_hint, FILE_CHUNKING)  # a disk image is read, its holes not
    if around_holes is not None:
        yield from around_holes
        return
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        yield from chunk_file(stream, FILE_CHUNKING)  # type: ignore[arg-type]


def _read_up_to(fd: int, size: int) -> bytes:
    """`size` bytes, or fewer at end of file."""
    parts: list[bytes] = []
    while size > 0:
        part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _lock_shared(fd: int, timeout_s: float) -> bool:
    """A shared POSIX advisory lock (writers that lock exclusively are waited for), with a timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_S)


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


def _fallback(previous: FileOutcome | None, warnings: list[str], problem: str) -> FileOutcome | None:
    if previous is not None:
        warnings.append(f"{problem}; kept its previous version")
        return previous
    warnings.append(f"{problem}; skipped (no previous version)")
    return None


# Bump when what a tree entry is made of (or how trees are encoded) changes: remembered trees then miss.
TREE_MEMO_VERSION = "2"
# marshal's version 0 has no shared-reference or interned-string flags: equal values give equal bytes,
# and it is ~6x faster than repr (a 100k-file no-change run signs every directory). Its format may
# change with Python's version: remembered trees then miss once (they are encoded again).
SIGNATURE_MARSHAL_VERSION = 0


def _tree_signature(children: list[tuple[Node, FileOutcome | None]]) -> str:
    """A digest of everything the directory's tree entries are made from (see _tree_entry)."""
    parts = []
    for child, outcome in children:
        st = outcome.st if outcome is not None else child.stat
        parts.append(
            (
                child.name,
                child.type,
                tuple(st),
                user_name(st.st_uid),
                group_name(st.st_gid),
                (outcome.state.size, outcome.content) if outcome is not None else None,
                _subtree(child),
                child.target,
                sorted((child.xattrs or {}).items()),
            )
        )
    return hashlib.sha256(marshal.dumps((TREE_MEMO_VERSION, parts), SIGNATURE_MARSHAL_VERSION)).hexdigest()


def _tree_entry(node: Node, outcome: FileOutcome | None, subtree: str | None) -> TreeEntry | None:
    if node.type == "file" and outcome is None:
        return None  # skipped with a warning
    st = outcome.st if outcome is not None else node.stat
    return TreeEntry(
        name=node.name,
        type=node.type,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        user=user_name(st.st_uid),
        group=group_name(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        size=outcome.state.size if outcome is not None else None,
        content=outcome.content if outcome is not None else (),
        subtree=subtree,
        target=node.target,
        rdev=st.st_rdev if node.type in ("chardev", "blockdev") else None,
        xattrs=encode_xattrs(node.xattrs or {}),
        acl=acl_text(node.xattrs or {}),
        hardlink=hardlink_id(st),
    )


def _run_id_of(manifest: dict) -> str | None:
    stats = manifest.get("stats")
    return stats.get("run_id") if isinstance(stats, dict) else None


def _bounded_warnings(warnings: list[str]) -> list[str]:
    """What the backend takes: at most MAX_WARNINGS, each cut to MAX_WARNING_CHARS, all of them within
    MAX_WARNINGS_BYTES encoded (a larger manifest is refused); the rest summed up in a last line."""
    kept: list[str] = []
    budget = MAX_WARNINGS_BYTES - 128  # room for the summary line
    for warning in warnings[: MAX_WARNINGS - 1]:
        cut = warning[:MAX_WARNING_CHARS]
        budget -= len(canonical.dumps(cut)) + 1  # the comma
        if budget < 0:
            break
        kept.append(cut)
    if len(warnings) > len(kept):
        kept.append(f"... and {len(warnings) - len(kept)} more warnings")
    return kept


def _conflict_message(parent: str | None, head: dict | None) -> str:
    head_id = head.get("manifest_id") if head else None
    return (
        f"the backend's latest manifest for this host is {head_id}, but this host's cache says its last "
        f"commit was {parent}. Either this machine was cloned from another host that uses the same "
        "credentials (give each host its own IAM user), or another archive run committed concurrently. "
        "If this host's cache was reset (not lost) on this very host, re-run with --adopt-head."
    )


def write_stats_json(path: Path, stats: dict[str, Any]) -> None:
    path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _no_wait() -> None:
    """The go-ahead of a run whose cache knows its parent: nothing to wait for."""
