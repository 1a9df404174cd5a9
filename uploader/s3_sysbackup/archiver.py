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
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sysbackup_domain import canonical
from sysbackup_domain.chunking import FILE_CHUNKING, chunk_file
from sysbackup_domain.manifest import MAX_WARNING_CHARS, MAX_WARNINGS, MAX_WARNINGS_BYTES, SnapshotRecord
from sysbackup_domain.tree import Tree, TreeEntry, encode_tree

from .api import ApiClient, ApiError
from .cache import ArchiveLock, CachedFile, FileState, ParentCache, ParentSnapshot, host_state_dir
from .commit_plan import (
    CommitPlan,
    FetchedParent,
    NewChild,
    ParentSide,
    PlanInputs,
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
from .walker import Node, walk

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_WARNINGS = 2  # the run committed a manifest, but something was skipped or incomplete
LOCK_POLL_S = 0.1
# A refused commit is retried after forgetting what the refusal named; these bound the retries.
COMMIT_REFUSALS_MAX = 3  # commits refused (422) within one pass
RUNS_MAX = 3  # passes over the files (a pass sends again what the index lost)


class CommitConflict(RuntimeError):
    """The backend's head for this host is not the parent this host knows."""


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
class RunTrees:
    """The new manifest's trees as the run's own walk: a tree's entries are its directory's children
    (no tree is kept in memory twice, none is read back)."""

    outcomes: dict[str, FileOutcome]
    subtree_of: dict[int, str]  # id(directory node) -> its tree hash
    directory_of: dict[str, Node] = field(default_factory=dict)  # tree hash -> a directory with it

    def children(self, tree: str) -> Iterator[NewChild]:
        for child in (self.directory_of[tree].children or {}).values():
            if child.type == "file":
                outcome = self.outcomes.get(child.path)
                if outcome is not None:  # a skipped file has no entry
                    yield NewChild(child.name, "file", outcome.content, None)
            else:
                yield NewChild(child.name, child.type, (), self.subtree_of.get(id(child)))


@dataclass
class RunContent:
    """What a run's manifest holds, and what the commit plan needs to compare it with the parent."""

    previous_memo: dict[str, tuple[str, str]]  # the parent's trees by directory (the cache's view)
    root: str | None = None
    snapshots: list[SnapshotRecord] = field(default_factory=list)
    chunks_of: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stream index -> chunks
    trees: RunTrees = field(default_factory=lambda: RunTrees({}, {}))

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
                if self.cache_was_lost:
                    self._start_new_cache(cache)
                else:
                    self._ensure_index(cache)
                for attempt in range(1, RUNS_MAX + 1):
                    try:
                        with cyclic_gc_paused():
                            return self._run_once(cache)
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

    def _start_new_cache(self, cache: ParentCache) -> None:
        """A new cache (a host's first run, or a lost cache): ask for the head (GET /manifests, from the
        function the commit calls anyway, so a first run starts no other function). No head: nothing
        committed, an empty index. A head: the cache was lost; the index is rebuilt from the host's
        packs (nothing stored is sent again) and the head is the parent (rather than a 409 for a
        commit planned against no parent)."""
        head = self._head()
        if head is None:
            cache.mark_index_ready()
            return
        self._ensure_index(cache)
        logger.warning("this host's cache is new: taking %s as parent", head["manifest_id"])
        cache.adopt_parent(str(head["manifest_id"]))

    def _run_once(self, cache: ParentCache) -> ArchiveResult:
        run_id = uuid.uuid4().hex
        scan_started_ns = time.time_ns()
        stats = RunStats()
        warnings: list[str] = []
        progress = Progress(not self.options.quiet)
        shipper = PackShipper(self.api, self.transfer, on_stored=lambda pack: _index_pack(cache, pack))
        sink = BlobSink(shipper, known=cache.indexed_hashes(), spool_dir=cache.path.parent)

        picked = run_pickers(self.config.pickers_dir, self.config.content.picker_timeout_s)
        warnings.extend(picked.warnings)
        walked = walk(picked.paths, self.options.root_path)
        warnings.extend(walked.warnings)
        content = RunContent(previous_memo=cache.tree_memo())
        memo: dict[str, tuple[str, str]] = {}  # directory trees, for the next run (see _build_trees)

        def on_stream(index: str, chunks: list[str]) -> None:
            content.chunks_of[index] = tuple(chunks)

        try:
            outcomes = self._read_files(walked.root, cache, sink, stats, warnings, progress)
            if picked.paths:
                memo = dict(content.previous_memo)
                content.trees = RunTrees(outcomes, {})
                content.root = self._build_trees(walked.root, outcomes, sink, stats, memo, content.trees)
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
        manifest_stats = self._manifest_stats(stats, shipper, run_id, len(warnings))
        manifest_id = self._commit(cache, run_id, content, warnings, manifest_stats)
        fault_point("mid-commit")
        cache.record_commit(
            manifest_id,
            ((path, o.state, o.content) for path, o in outcomes.items() if o.cacheable and not o.reused),
            scan_started_ns,
            kept=(path for path, o in outcomes.items() if o.cacheable and o.reused),
            trees=memo,
            snapshots=content.snapshots_for_cache(),
        )
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

    def _read_files(
        self,
        root: Node,
        cache: ParentCache,
        sink: BlobSink,
        stats: RunStats,
        warnings: list[str],
        progress: Progress,
    ) -> dict[str, FileOutcome]:
        """Content of every regular file: reused from the cache when unchanged, else read."""
        outcomes: dict[str, FileOutcome] = {}
        to_read: list[tuple[Node, CachedFile | None]] = []
        node_at = {node.path: node for node in _iter_files(root)}
        for path, cached in cache.lookup_many(node_at):
            node = node_at[path]
            if cached is not None and cached.reusable_for(FileState.of(node.stat)):
                outcomes[node.path] = FileOutcome(cached.content, cached.state, node.stat, reused=True)
                stats.files_reused += 1
            else:
                to_read.append((node, cached))
        lock = threading.Lock()
        total = len(to_read)

        def read_one(item: tuple[Node, CachedFile | None]) -> None:
            node, cached = item
            local_warnings: list[str] = []
            outcome = self._read_file(node, cached, sink, local_warnings)
            with lock:
                warnings.extend(local_warnings)
                if outcome is not None:
                    outcomes[node.path] = outcome
                    stats.bytes_read += outcome.bytes_read
                stats.files_read += 1
                progress.show(f"read {stats.files_read}/{total} files, {stats.bytes_read / 2**20:.1f} MiB")

        run_bounded(read_one, to_read, workers=self.config.content.workers)
        return outcomes

    def _read_file(
        self, node: Node, cached: CachedFile | None, sink: BlobSink, warnings: list[str]
    ) -> FileOutcome | None:
        previous = (
            FileOutcome(cached.content, cached.state, node.stat, reused=True) if cached is not None else None
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
            return self._read_locked(fd, node, sink, warnings)
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
            for chunk in _file_chunks(fd, before.st_size):
                content.append(sink.add_plaintext("data", chunk))
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

    # -- trees ------------------------------------------------------------------------------

    def _build_trees(
        self,
        root: Node,
        outcomes: dict[str, FileOutcome],
        sink: BlobSink,
        stats: RunStats,
        memo: dict[str, tuple[str, str]],
        trees: RunTrees,
    ) -> str:
        """Encode every directory bottom-up (children before parents); returns the root tree hash.

        A directory whose tree would be made from exactly what the last committed run made it from
        (`memo`: path -> (signature, tree)), and whose tree the local index holds, reuses that tree
        unencoded; `memo` is replaced by this run's signatures for the next run. `trees` learns each
        directory's tree (the commit plan walks them).
        """
        order: list[Node] = []
        stack = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(child for child in (node.children or {}).values() if child.is_dir)
        previous, memo_now = dict(memo), memo
        memo_now.clear()
        subtree_of = trees.subtree_of
        for directory in reversed(order):  # a pre-order list reversed puts children first
            children = [
                (child, outcomes.get(child.path))
                for child in (directory.children or {}).values()
                if child.type != "file" or child.path in outcomes  # a skipped file has no entry
            ]
            signature = _tree_signature(children, subtree_of)
            remembered = previous.get(directory.path)
            if remembered is not None and remembered[0] == signature and sink.is_known_stored(remembered[1]):
                tree = remembered[1]
            else:
                entries = [
                    _tree_entry(child, outcome, subtree_of.get(id(child))) for child, outcome in children
                ]
                tree = sink.add_plaintext(
                    "tree", encode_tree(Tree(tuple(e for e in entries if e is not None)))
                )
            for child, outcome in children:
                if outcome is not None:
                    stats.bytes_total += outcome.state.size
                stats.files += child.type == "file"
                stats.dirs += child.type == "dir"
            subtree_of[id(directory)] = tree
            trees.directory_of[tree] = directory
            memo_now[directory.path] = (signature, tree)
        return subtree_of[id(root)]

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
        plan = resolve(listed, read, cache.locate(listed | read))
        if plan.unlocated:
            # A refusal dropped them, or they were never indexed: they may be in packs the index does
            # not know yet (gc repacked them, another run of this host uploaded them).
            rebuild_index(self.api, self.transfer, cache)
            plan = resolve(listed, read, cache.locate(listed | read))
        if plan.unlocated:
            sample = ", ".join(sorted(plan.unlocated)[:3])
            raise MissingBlobs(
                f"{len(plan.unlocated)} blobs of this run are in no pack the backend has for this host "
                f"(e.g. {sample})"
            )
        return plan

    def _plan_inputs(self, cache: ParentCache, parent: str | None, content: RunContent) -> PlanInputs:
        fetcher = BlobFetcher(self.api, self.transfer, cache)
        side: ParentSide
        if parent is None:
            side, parent_root, parent_snapshots = ViewParent({}, lambda path: None), None, {}
        elif cache.view_matches_parent:
            # The usual case: the cache describes the parent; nothing is read.
            memo = content.previous_memo
            side = ViewParent(memo, lambda path: _cached_content(cache, path))
            parent_root = memo[self.options.root_path][1] if self.options.root_path in memo else None
            parent_snapshots = cache.parent_snapshots()
        else:
            # The parent came from the backend (a crashed run's commit, a lost cache): read its trees.
            manifest = self.api.get_manifest(parent)
            side = FetchedParent(fetcher.fetch_all)
            parent_root = manifest.get("root")
            parent_snapshots = _fetched_parent_snapshots(fetcher, manifest, content.snapshots)
        return PlanInputs(
            root=content.root,
            parent_root=parent_root,
            root_path=self.options.root_path,
            snapshots=content.snapshots,
            chunks_of=content.chunks_of,
            parent_snapshots=parent_snapshots,
            new_trees=content.trees,
            parent=side,
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


def _iter_files(root: Node) -> Iterator[Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type == "file":
            yield node
        elif node.children:
            stack.extend(node.children.values())


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
TREE_MEMO_VERSION = "1"


def _tree_signature(children: list[tuple[Node, FileOutcome | None]], subtree_of: dict[int, str]) -> str:
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
                subtree_of.get(id(child)),
                child.target,
                sorted(child.xattrs.items()),
            )
        )
    return hashlib.sha256(repr((TREE_MEMO_VERSION, parts)).encode("utf-8", "surrogateescape")).hexdigest()


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
        xattrs=encode_xattrs(node.xattrs),
        acl=acl_text(node.xattrs),
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
