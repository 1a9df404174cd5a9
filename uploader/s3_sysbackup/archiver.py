"""One `archive` run: pick, walk, read what changed, pack, ship, build trees, snapshot, commit.

The order is what makes a crash harmless: blobs are registered before the trees that name them, and
the manifest is committed only after everything is registered; the parent cache is updated last.
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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sysbackup_domain import canonical
from sysbackup_domain.chunking import FILE_CHUNKING, chunk_file
from sysbackup_domain.manifest import MAX_WARNING_CHARS, MAX_WARNINGS, MAX_WARNINGS_BYTES, SnapshotRecord
from sysbackup_domain.tree import Tree, TreeEntry, encode_tree

from .api import ApiClient, ApiError, ApiUnavailable
from .cache import ArchiveLock, CachedFile, FileState, ParentCache, host_state_dir
from .config import Config
from .heap import pin_mmap_threshold
from .metadata import Stat, acl_text, encode_xattrs, group_name, hardlink_id, user_name
from .net import RequestCounter
from .pickers import run_pickers
from .sink import BlobSink, PackShipper, fault_point
from .snapshots import take_snapshots
from .transfer import Transfer
from .walker import Node, walk

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_WARNINGS = 2  # the run committed a manifest, but something was skipped or incomplete
LOCK_POLL_S = 0.1


class CommitConflict(RuntimeError):
    """The backend's head for this host is not the parent this host knows."""


class MissingBlobs(RuntimeError):
    """The backend refused the commit because blobs this host thought stored are gone."""


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

    def run(self) -> ArchiveResult:
        pin_mmap_threshold()  # pack-sized buffers go back to the kernel when freed (see heap.py)
        state_dir = host_state_dir(self.config.content.cache_dir, self.api.endpoint, self.config.config_dir)
        with ArchiveLock(state_dir):
            cache = ParentCache(state_dir, scope=self.api.endpoint)
            try:
                try:
                    return self._run_once(cache)
                except MissingBlobs as error:
                    # Our cache vouched for blobs the backend no longer has (retention lapsed, gc):
                    # forget what the cache knows and send everything the backend lacks.
                    logger.warning("%s; re-running without the cache", error)
                    cache.forget_content()
                    return self._run_once(cache)
            finally:
                cache.close()

    def _run_once(self, cache: ParentCache) -> ArchiveResult:
        run_id = uuid.uuid4().hex
        scan_started_ns = time.time_ns()
        stats = RunStats()
        warnings: list[str] = []
        progress = Progress(not self.options.quiet)
        self._adopt_unfinished_packs(cache)
        shipper = PackShipper(self.api, self.transfer, before_put=cache.add_unfinished_packs)
        sink = BlobSink(self.api, shipper, known_stored=cache.all_stored())

        picked = run_pickers(self.config.pickers_dir, self.config.content.picker_timeout_s)
        warnings.extend(picked.warnings)
        walked = walk(picked.paths, self.options.root_path)
        warnings.extend(walked.warnings)
        memo: dict[str, tuple[str, str]] = {}  # directory trees, for the next run (see _build_trees)
        referenced: set[str] = set()  # every blob the manifest will need, for the next run's cache

        def add_snapshot_blob(kind: str, plaintext: bytes) -> str:
            digest = sink.add_plaintext(kind, plaintext)
            referenced.add(digest)
            return digest

        try:
            outcomes = self._read_files(walked.root, cache, sink, stats, warnings, progress)
            memo = cache.tree_memo()
            root = (
                self._build_trees(walked.root, outcomes, sink, stats, referenced, memo)
                if picked.paths
                else None
            )
            snapshots, snapshot_warnings = take_snapshots(
                self.config.snapshots_dir,
                self.config.content.snapshot_timeout_s,
                add_snapshot_blob,
                on_bytes=lambda n: self._count_snapshot_bytes(stats, progress, n),
            )
            warnings.extend(snapshot_warnings)
            stats.snapshots = len(snapshots)
            if not picked.paths and not snapshots:
                warnings.append(f"nothing to back up: no paths from {self.config.pickers_dir}, no snapshots")
            progress.show("finishing uploads", force=True)
            sink.finish()
        except BaseException:
            sink.abort()
            progress.done()
            raise
        progress.done()
        manifest_stats = self._manifest_stats(stats, shipper, run_id, len(warnings))
        manifest_id = self._commit(cache, run_id, root, snapshots, warnings, manifest_stats)
        fault_point("mid-commit")
        cache.record_commit(
            manifest_id,
            ((path, o.state, o.content) for path, o in outcomes.items() if o.cacheable and not o.reused),
            scan_started_ns,
            referenced,
            kept=(path for path, o in outcomes.items() if o.cacheable and o.reused),
            trees=memo,
        )
        report = dict(manifest_stats)
        report.update(
            elapsed_s=round(time.monotonic() - stats.started, 3),
            manifest_id=manifest_id,
            warnings=warnings,
            requests=self.counter.as_dict(),
        )
        return ArchiveResult(manifest_id, root or "", warnings, report)

    def _adopt_unfinished_packs(self, cache: ParentCache) -> None:
        """After a crash, have the backend register the packs the crashed run PUT but never registered.

        Their blobs then count as stored and are not sent again (a re-run packs blobs in another order,
        so it cannot rebuild the same packs). Only an optimisation: if it fails, the data goes up again.
        """
        pack_ids = cache.unfinished_packs()
        if not pack_ids:
            return  # the previous run finished: nothing to adopt, no request
        try:
            outcome = self.api.adopt_packs(pack_ids)
        except (ApiError, ApiUnavailable) as error:
            logger.warning("could not adopt an unfinished run's packs (their data goes again): %s", error)
            return
        logger.info(
            "unfinished run: %d packs adopted, %d already registered, %d not adopted",
            len(outcome["adopted"]),
            len(outcome["registered"]),
            len(outcome["skipped"]),
        )

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
        for node in _iter_files(root):
            cached = cache.lookup(node.path)
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
            with open(fd, "rb", buffering=0, closefd=False) as stream:
                for chunk in chunk_file(stream, FILE_CHUNKING):  # type: ignore[arg-type]
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
        referenced: set[str],
        memo: dict[str, tuple[str, str]],
    ) -> str:
        """Encode every directory bottom-up (children before parents); returns the root tree hash.

        Adds every tree and file content hash to `referenced`. A directory whose tree would be made
        from exactly what the last committed run made it from (`memo`: path -> (signature, tree)),
        and whose tree the parent manifest holds, reuses that tree unencoded; `memo` is replaced by
        this run's signatures for the next run.
        """
        order: list[Node] = []
        stack = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(child for child in (node.children or {}).values() if child.is_dir)
        previous, memo_now = dict(memo), memo
        memo_now.clear()
        subtree_of: dict[int, str] = {}
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
                    referenced.update(outcome.content)
                    stats.bytes_total += outcome.state.size
                stats.files += child.type == "file"
                stats.dirs += child.type == "dir"
            subtree_of[id(directory)] = tree
            memo_now[directory.path] = (signature, tree)
            referenced.add(tree)
        return subtree_of[id(root)]

    # -- commit -----------------------------------------------------------------------------

    def _commit(
        self,
        cache: ParentCache,
        run_id: str,
        root: str | None,
        snapshots: list[SnapshotRecord],
        warnings: list[str],
        stats: dict[str, Any],
    ) -> str:
        parent = cache.parent_manifest
        crashed_run = cache.inflight_run
        cache.mark_inflight(run_id)
        for _attempt in range(2):
            request = {
                "parent": parent,
                "root": root,
                "snapshots": [s.to_json() for s in snapshots],
                "warnings": _bounded_warnings(warnings),
                "stats": stats,
                "days_retained": self.config.content.days_retained,
            }
            try:
                result = self.api.commit_manifest(request)
                return str(result["manifest_id"])
            except ApiError as error:
                if error.status == 422:
                    raise MissingBlobs(f"commit refused: {error.message}") from error
                if error.status != 409:
                    raise
                head = self._head()
                if head is None:
                    # No history at all (a new stack behind the same endpoint, or every manifest
                    # expired): nothing to conflict with. Missing blobs, if any, come back as a 422.
                    logger.warning("the backend has no manifest for this host; committing without a parent")
                    parent = None
                    continue
                if _run_id_of(head) == run_id:
                    return str(head["manifest_id"])  # our own commit landed; the reply was lost
                if _run_id_of(head) == crashed_run or self.options.adopt_head:
                    logger.warning("taking %s as parent (a crashed run's commit)", head["manifest_id"])
                    parent = str(head["manifest_id"])
                    cache.adopt_parent(parent)
                    cache.mark_inflight(run_id)
                    continue
                raise CommitConflict(_conflict_message(parent, head)) from error
        raise CommitConflict(_conflict_message(parent, self._head()))

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
            "packs_already_there": shipper.counts.packs_already_there,  # PUT answered 412 (a crashed run's)
            "blobs_new": shipper.counts.blobs_new,
            "snapshots": stats.snapshots,
            "snapshot_bytes": stats.snapshot_bytes,
            "warnings": warnings,
            "elapsed_ms": int((time.monotonic() - stats.started) * 1000),
            "requests": self.counter.as_dict(),
        }


def run_bounded(work: Callable[[T], None], items: Iterable[T], workers: int) -> None:
    """`work(item)` for every item on `workers` threads, with few tasks queued at a time.

    (Executor.map would create a future per item up front: a million files, a million futures.)
    The first exception stops the submission of new work and is re-raised.
    """
    in_flight: set[Future[None]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
        for item in items:
            if len(in_flight) >= 4 * workers:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
            in_flight.add(pool.submit(work, item))
        for future in in_flight:
            future.result()


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
        "If the cache directory was lost or reset on this very host, re-run with --adopt-head."
    )


def write_stats_json(path: Path, stats: dict[str, Any]) -> None:
    path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
