"""Restore a manifest (or parts of it) into a target directory, verifying every byte.

Safety first: trees come from storage and are treated as hostile. Names are checked by
`decode_tree` (no "/", "..", NUL) and again here; nothing is ever written *through* a symlink:
every directory is opened with O_NOFOLLOW relative to its parent's fd, every file is created with
O_CREAT|O_EXCL|O_NOFOLLOW relative to its directory's fd, and metadata calls use
follow_symlinks=False. A non-empty target is refused unless `overwrite` is set.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import stat
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from sysbackup_domain.tree import TreeEntry

from .api import ApiClient
from .fetch import LOCATE_BATCH, BlobFetcher, stream_chunks, walk_trees
from .heap import cyclic_gc_paused, pin_mmap_threshold
from .metadata import decode_xattrs

logger = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_OPEN_DIRS = 128
SNAPSHOT_WINDOW_CHUNKS = 256  # about 16 MiB of a stream at STREAM_CHUNKING's 64 KiB average
Parts = tuple[str, ...]


class RestoreError(RuntimeError):
    """The restore cannot (or must not) proceed."""


@dataclass
class RestoreResult:
    manifest_id: str
    files: int = 0
    dirs: int = 0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)


def resolve_manifest_id(api: ApiClient, wanted: str, host: str | None) -> str:
    """`latest` -> the head manifest's id (one short page); anything else is returned as given."""
    if wanted != "latest":
        return wanted
    head = api.latest_manifest(host=host)
    if head is None:
        raise RestoreError("there are no manifests for this host yet")
    return str(head["manifest_id"])


def restorable_snapshot(manifest: dict, name: str, *, allow_incomplete: bool = False) -> dict:
    """Snapshot `name` of `manifest`; RestoreError if absent, without a stream, or failed when taken."""
    snapshots = {s.get("name"): s for s in manifest.get("snapshots") or []}
    snapshot = snapshots.get(name)
    if snapshot is None:
        known = ", ".join(sorted(str(n) for n in snapshots)) or "none"
        raise RestoreError(f"manifest {manifest.get('id')} has no snapshot {name!r} (it has: {known})")
    if not snapshot.get("content"):
        raise RestoreError(f"snapshot {name!r} produced no stream ({snapshot.get('error') or 'empty'})")
    if snapshot.get("error") and not allow_incomplete:
        raise RestoreError(
            f"snapshot {name!r} failed when it was taken ({snapshot['error']}); its stream is incomplete "
            "and is not restored (--output FILE --incomplete writes the partial bytes)"
        )
    return snapshot


def write_snapshot(
    fetcher: BlobFetcher, manifest: dict, name: str, out: BinaryIO, *, allow_incomplete: bool = False
) -> int:
    """Write snapshot `name`'s stream to `out` in order (pipe it to its restore-through command).

    A snapshot whose snapshotter failed (error set) is refused unless `allow_incomplete`: its stream
    is cut short and must never pass for a good one. Chunks are fetched a window at a time: memory
    stays bounded whatever the stream's size, and consecutive chunks sit together in packs, so each
    window costs a few ranged GETs.
    """
    snapshot = restorable_snapshot(manifest, name, allow_incomplete=allow_incomplete)
    chunks = stream_chunks(fetcher, snapshot["content"])
    written = 0
    for start in range(0, len(chunks), SNAPSHOT_WINDOW_CHUNKS):
        window = chunks[start : start + SNAPSHOT_WINDOW_CHUNKS]
        blobs = fetcher.fetch_all(window)
        for digest in window:
            out.write(blobs[digest])
            written += len(blobs[digest])
    out.flush()
    if written != snapshot.get("size", written):
        raise RestoreError(f"snapshot {name!r}: wrote {written} bytes, the manifest says {snapshot['size']}")
    return written


def selection_parts(paths: Sequence[str]) -> list[Parts]:
    """`/etc/ssh` -> ("etc", "ssh"); refuses `..` so a selection cannot point outside the backup."""
    selected = []
    for path in paths:
        parts = tuple(part for part in path.split("/") if part and part != ".")
        if ".." in parts:
            raise RestoreError(f"restore path {path!r} contains '..'")
        selected.append(parts)
    return selected


def is_selected(path: Parts, selected: list[Parts]) -> bool:
    """True if `path` is on the way to, or inside, a selected subtree (everything if none selected)."""
    if not selected or () in selected:
        return True
    for chosen in selected:
        depth = min(len(path), len(chosen))
        if path[:depth] == chosen[:depth]:
            return True
    return False


class DirFds:
    """Directory fds under the target, opened component by component with O_NOFOLLOW, LRU-cached."""

    def __init__(self, target_fd: int) -> None:
        self.target_fd = target_fd
        self._open: OrderedDict[Parts, int] = OrderedDict()

    def get(self, parts: Parts) -> int:
        if not parts:
            return self.target_fd
        fd = self._open.get(parts)
        if fd is not None:
            self._open.move_to_end(parts)
            return fd
        # Walk down from the deepest directory still open (iteratively: paths can be deep).
        depth = len(parts) - 1
        while depth > 0 and parts[:depth] not in self._open:
            depth -= 1
        fd = self._open[parts[:depth]] if depth else self.target_fd
        for end in range(depth + 1, len(parts) + 1):
            fd = os.open(parts[end - 1], DIR_FLAGS, dir_fd=fd)  # ELOOP if someone planted a symlink
            self._open[parts[:end]] = fd
            self._open.move_to_end(parts[:end])
        while len(self._open) > MAX_OPEN_DIRS:
            _, old = self._open.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


@dataclass
class _FileSlot:
    parts: Parts
    entry: TreeEntry


class Restorer:
    def __init__(self, fetcher: BlobFetcher, target: str, *, overwrite: bool = False) -> None:
        self.fetcher = fetcher
        self.target = target
        self.overwrite = overwrite
        self.as_root = os.geteuid() == 0

    def restore(self, manifest: dict, paths: Sequence[str] = ()) -> RestoreResult:
        pin_mmap_threshold()  # fetched spans go back to the kernel when freed (see heap.py)
        with cyclic_gc_paused():
            return self._restore(manifest, paths)

    def _restore(self, manifest: dict, paths: Sequence[str]) -> RestoreResult:
        result = RestoreResult(manifest_id=str(manifest.get("id", "")))
        root = manifest.get("root")
        if not root:
            raise RestoreError(f"manifest {result.manifest_id} has no file tree (only snapshots)")
        selected = selection_parts(paths)
        items = list(walk_trees(self.fetcher, root, lambda parts: is_selected(parts, selected)))
        found = {parts for parts, _ in items}
        for chosen in selected:
            if chosen and chosen not in found:
                raise RestoreError(f"/{'/'.join(chosen)} is not in manifest {result.manifest_id}")
        for parts, entry in items:
            _check_name(parts, entry)
        target_fd = self._open_target()
        dirs = DirFds(target_fd)
        try:
            self._restore_items(items, dirs, result)
        finally:
            dirs.close()
            os.close(target_fd)
        return result

    def _open_target(self) -> int:
        os.makedirs(self.target, exist_ok=True)
        fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.listdir(fd) and not self.overwrite:
            os.close(fd)
            raise RestoreError(
                f"target {self.target} is not empty (use --overwrite to replace what is there)"
            )
        return fd

    def _restore_items(
        self, items: list[tuple[Parts, TreeEntry]], dirs: DirFds, result: RestoreResult
    ) -> None:
        by_depth = sorted(items, key=lambda item: len(item[0]))
        for parts, entry in by_depth:
            if entry.type == "dir":
                self._make_dir(dirs, parts)
                result.dirs += 1
        slots: list[_FileSlot] = []
        links: list[tuple[Parts, Parts]] = []
        primary_of: dict[str, Parts] = {}
        for parts, entry in by_depth:
            if entry.type != "file":
                continue
            primary = primary_of.get(entry.hardlink) if entry.hardlink else None
            if primary is not None:
                links.append((primary, parts))
                continue
            if entry.hardlink:
                primary_of[entry.hardlink] = parts
            slots.append(_FileSlot(parts, entry))
            result.files += 1
        # A file is created at its first write (one open, not two: opens are most of a restore of
        # many small files); empty and all-zero files, which get no write, are created after.
        created: set[Parts] = set()
        result.bytes_written += self._fill_files(dirs, slots, created)
        for slot in slots:
            if slot.parts not in created:
                os.close(self._create_file(dirs, slot.parts, slot.entry))
        for primary, parts in links:
            self._link(dirs, primary, parts)
            result.files += 1
        for parts, entry in by_depth:
            if entry.type not in ("file", "dir"):
                self._make_special(dirs, parts, entry, result.warnings)
        for parts, entry in by_depth:
            if entry.type != "dir":
                self._apply_metadata(dirs, parts, entry, result.warnings)
        # Directories last and deepest first: writing inside a directory changes its mtime, and a
        # read-only directory mode would stop us writing inside it.
        for parts, entry in reversed(by_depth):
            if entry.type == "dir":
                self._apply_metadata(dirs, parts, entry, result.warnings)

    # -- creating ---------------------------------------------------------------------------

    def _make_dir(self, dirs: DirFds, parts: Parts) -> None:
        parent = dirs.get(parts[:-1])
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            return
        except FileExistsError:
            pass
        existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(existing.st_mode):
            return
        self._remove_existing(parent, name, parts)
        os.mkdir(name, 0o700, dir_fd=parent)

    def _create_file(
        self, dirs: DirFds, parts: Parts, entry: TreeEntry, *, sized_by_write: bool = False
    ) -> int:
        """Create the file (replacing what is there only with --overwrite); returns it open for writing.
        `sized_by_write`: the caller writes all of it at once, so it needs no size up front."""
        parent = dirs.get(parts[:-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        except FileExistsError:
            self._remove_existing(parent, parts[-1], parts)
            fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        if sized_by_write:
            return fd
        try:
            # The full size up front: holes stay holes where we skip all-zero chunks (sparse files).
            os.ftruncate(fd, entry.size or 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove_existing(self, parent: int, name: str, parts: Parts) -> None:
        """Replace what is at `name` (only with --overwrite). Unlinking a symlink never follows it."""
        if not self.overwrite:
            raise RestoreError(f"/{'/'.join(parts)} already exists in the target (use --overwrite)")
        existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(existing.st_mode):
            raise RestoreError(f"/{'/'.join(parts)} is a directory in the target; will not replace it")
        os.unlink(name, dir_fd=parent)

    def _fill_files(self, dirs: DirFds, slots: list[_FileSlot], created: set[Parts]) -> int:
        """Fetch each needed chunk once and write it at every place it belongs (creating each file at
        its first write; `created` learns which)."""
        entry_of = {slot.parts: slot.entry for slot in slots}
        written = 0
        for batch in _slot_batches(slots, LOCATE_BATCH):
            located, urls = self.fetcher.locate({digest for slot in batch for digest in slot.entry.content})
            uses: dict[str, list[tuple[Parts, int]]] = {}
            for slot in batch:
                position = 0
                for digest in slot.entry.content:
                    uses.setdefault(digest, []).append((slot.parts, position))
                    position += located[digest].entry.raw_length
                if position != (slot.entry.size or 0):
                    raise RestoreError(
                        f"/{'/'.join(slot.parts)}: chunks add up to {position} bytes, "
                        f"the tree says {slot.entry.size}"
                    )
            for digest, plaintext in self.fetcher.fetch_located(located, urls):
                if is_all_zeros(plaintext):
                    continue  # leave a hole (the file was pre-sized, or is created sized after)
                for parts, position in uses[digest]:
                    if parts in created:
                        fd = os.open(
                            parts[-1], os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs.get(parts[:-1])
                        )
                    else:
                        entry = entry_of[parts]
                        fd = self._create_file(dirs, parts, entry, sized_by_write=len(entry.content) == 1)
                        created.add(parts)
                    written += self._write_at(fd, position, plaintext)
        return written

    @staticmethod
    def _write_at(fd: int, position: int, data: bytes) -> int:
        """Write `data` at `position` of the open file `fd`, then close it."""
        try:
            view = memoryview(data)
            while view:
                count = os.pwrite(fd, view, position)
                view, position = view[count:], position + count
        finally:
            os.close(fd)
        return len(data)

    def _link(self, dirs: DirFds, primary: Parts, parts: Parts) -> None:
        source_dir = dirs.get(primary[:-1])
        target_dir = dirs.get(parts[:-1])
        try:
            os.link(
                primary[-1], parts[-1], src_dir_fd=source_dir, dst_dir_fd=target_dir, follow_symlinks=False
            )
        except FileExistsError:
            self._remove_existing(target_dir, parts[-1], parts)
            os.link(
                primary[-1], parts[-1], src_dir_fd=source_dir, dst_dir_fd=target_dir, follow_symlinks=False
            )

    def _make_special(self, dirs: DirFds, parts: Parts, entry: TreeEntry, warnings: list[str]) -> None:
        parent = dirs.get(parts[:-1])
        name = parts[-1]
        display = "/" + "/".join(parts)
        for attempt in (1, 2):
            try:
                if entry.type == "symlink":
                    os.symlink(entry.target or "", name, dir_fd=parent)
                elif entry.type == "fifo":
                    os.mkfifo(name, 0o600, dir_fd=parent)
                elif entry.type in ("chardev", "blockdev"):
                    kind = stat.S_IFCHR if entry.type == "chardev" else stat.S_IFBLK
                    os.mknod(name, kind | 0o600, entry.rdev or 0, dir_fd=parent)
                else:
                    warnings.append(f"{display}: a {entry.type} cannot be restored (recreated by its owner)")
                return
            except FileExistsError:
                if attempt == 2:
                    raise
                self._remove_existing(parent, name, parts)
            except PermissionError as error:
                warnings.append(f"{display}: cannot create {entry.type}: {error.strerror}")
                return

    # -- metadata ---------------------------------------------------------------------------

    def _apply_metadata(self, dirs: DirFds, parts: Parts, entry: TreeEntry, warnings: list[str]) -> None:
        parent = dirs.get(parts[:-1])
        name = parts[-1]
        display = "/" + "/".join(parts)
        if entry.type not in ("file", "dir"):
            try:
                os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return  # a socket or a device we could not create: already warned about
        if entry.type in ("file", "dir"):
            self._apply_xattrs(parent, name, entry, display, warnings)
        if self.as_root:
            try:
                os.chown(name, *self._owner(entry), dir_fd=parent, follow_symlinks=False)
            except OSError as error:
                warnings.append(f"{display}: cannot set owner: {error.strerror}")
        if entry.type != "symlink":  # Linux has no lchmod; a symlink's mode means nothing
            os.chmod(name, entry.mode, dir_fd=parent)  # safe: checked above that it is no symlink
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _apply_xattrs(
        self, parent: int, name: str, entry: TreeEntry, display: str, warnings: list[str]
    ) -> None:
        values = decode_xattrs(dict(entry.xattrs or {}))
        if not values:
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if entry.type == "dir" else 0)
        fd = os.open(name, flags, dir_fd=parent)
        try:
            for key, value in values.items():
                try:
                    os.setxattr(fd, key, value)
                except OSError as error:
                    if error.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                        warnings.append(f"{display}: cannot set xattr {key}: {error.strerror}")
                    else:
                        raise
        finally:
            os.close(fd)

    def _owner(self, entry: TreeEntry) -> tuple[int, int]:
        """Owner by name when this system knows the name (uids differ between hosts), else by number."""
        return _uid_of(entry.user, entry.uid), _gid_of(entry.group, entry.gid)


@functools.lru_cache(maxsize=1024)
def _uid_of(user: str | None, uid: int) -> int:
    """The uid this system gives `user`, else the recorded `uid` (one passwd lookup per name)."""
    if user:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(user).pw_uid
    return uid


@functools.lru_cache(maxsize=1024)
def _gid_of(group: str | None, gid: int) -> int:
    if group:
        with contextlib.suppress(KeyError):
            return grp.getgrnam(group).gr_gid
    return gid


def is_all_zeros(data: bytes) -> bool:
    """True for a blob of zeros (written as a hole). strip() copies a blob that is not all zeros, so
    it only runs on one whose ends are both zero."""
    return not data or (data[0] == 0 and data[-1] == 0 and not data.strip(b"\0"))


def _slot_batches(slots: list[_FileSlot], max_hashes: int) -> Iterator[list[_FileSlot]]:
    """Groups of files whose chunks number about `max_hashes` (one locate round each)."""
    batch: list[_FileSlot] = []
    count = 0
    for slot in slots:
        if batch and count + len(slot.entry.content) > max_hashes:
            yield batch
            batch, count = [], 0
        batch.append(slot)
        count += len(slot.entry.content)
    if batch:
        yield batch


def _check_name(parts: Parts, entry: TreeEntry) -> None:
    # decode_tree already refuses these; a second check costs nothing and guards this module alone.
    name = entry.name
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RestoreError(f"hostile entry name {name!r} under /{'/'.join(parts[:-1])}")
