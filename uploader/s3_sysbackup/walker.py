"""Walk the picked paths as lstat()ed nodes, one directory at a time.

Rules: nothing is followed (symlinks are recorded as symlinks); a picked directory means everything
under it, but a directory on another filesystem inside it is recorded without its contents unless it
was picked itself (like `find -xdev`: picking `/` must not drag in /proc); the parents of every
picked path are recorded as directories so restore can rebuild the path with their owners and modes.

The walk is a stream (`Walk.nodes`), so a run holds the entries of the directories on the path it is
at, not the whole tree: a 100k-file tree held whole cost ~1.3 KB a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .metadata import Stat, entry_type, read_xattrs


@dataclass(slots=True)  # one per entry: no per-instance __dict__
class Node:
    name: str  # "" for the root
    path: str
    stat: Stat
    type: str
    target: str | None = None  # symlinks
    xattrs: dict[str, bytes] | None = None  # None when it has none (no empty dict per file)
    children: dict[str, Node] | None = None  # dirs only
    picked: bool = False  # a picked directory: everything under it is walked
    outcome: Any = None  # what the consumer made of it: a file's content, a directory's tree

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


@dataclass
class Walk:
    """The picked paths and their parents (`root`), walked by `nodes`; `warnings` grows as it goes."""

    root: Node
    warnings: list[str] = field(default_factory=list)

    def nodes(self) -> Iterator[Node]:
        """Every regular file, and every directory after all of its entries (post-order).

        Entries are taken in the byte order of their full paths (a directory's name sorts with a "/"
        after it), so files come in the order of an ordered scan of paths. A directory's `children`
        are listed when it is entered; the consumer may drop them once the directory is yielded.
        """
        stack = [self._enter(self.root, self.root.stat.st_dev if self.root.picked else None)]
        while stack:
            frame = stack[-1]
            child = next(frame.pending, None)
            if child is None:
                stack.pop()
                yield frame.directory
            elif child.is_dir:
                device = frame.device
                if child.picked:
                    device = child.stat.st_dev
                elif device is not None and child.stat.st_dev != device:
                    device = None  # another filesystem, not picked: recorded without its contents
                stack.append(self._enter(child, device))
            elif child.type == "file":
                yield child

    def _enter(self, directory: Node, device: int | None) -> _Frame:
        """List `directory` if it is walked (`device` set); its entries are taken in path byte order."""
        assert directory.children is not None
        if device is not None:
            self._list(directory)
        return _Frame(directory, iter(sorted(directory.children.values(), key=_path_order)), device)

    def _list(self, directory: Node) -> None:
        assert directory.children is not None
        try:
            with os.scandir(directory.path) as entries:
                listed = [(entry.name, entry.path, entry.stat(follow_symlinks=False)) for entry in entries]
        except OSError as error:
            self.warnings.append(f"cannot list {directory.path!r}: {error.strerror}")
            return
        for name, path, st in listed:
            if name not in directory.children:  # a picked path below was recorded already
                child = _make_node(name, path, st, self.warnings)
                if child is not None:
                    directory.children[name] = child


@dataclass(slots=True)
class _Frame:
    directory: Node
    pending: Iterator[Node]
    device: int | None = None  # the filesystem walked below `directory` (None: only picked entries)


def _path_order(node: Node) -> bytes:
    name = os.fsencode(node.name)
    return name + b"/" if node.is_dir else name


def walk(picked: Iterable[str], root_path: str = "/") -> Walk:
    """The picked paths (absolute) and their parents, ready to walk. `root_path` lets tests walk a
    scratch directory as `/`."""
    warnings: list[str] = []
    root = _make_node("", root_path, os.lstat(root_path), warnings)
    if root is None or not root.is_dir:
        raise NotADirectoryError(f"walk root {root_path!r} is not a directory")
    result = Walk(root=root, warnings=warnings)
    for path in picked:
        components = _components(path, result.warnings)
        if components is None:
            continue
        node = _descend(result.root, components, root_path, result.warnings)
        if node is not None and node.is_dir:
            node.picked = True
    return result


def _components(path: str, warnings: list[str]) -> list[str] | None:
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        # normpath would silently change the meaning of a/../b when a is a symlink.
        warnings.append(f"ignored picked path with '..': {path!r}")
        return None
    return parts


def _descend(root: Node, components: list[str], root_path: str, warnings: list[str]) -> Node | None:
    """Record (and return) the node of a picked path, adding its parent directories on the way."""
    node = root
    for depth, name in enumerate(components):
        assert node.children is not None
        child = node.children.get(name)
        if child is None:
            child_path = os.path.join(node.path, name)
            try:
                st = os.lstat(child_path)
            except FileNotFoundError:
                warnings.append(f"picked path does not exist: {_display(root_path, components)}")
                return None
            except OSError as error:
                warnings.append(f"cannot stat {child_path!r}: {error.strerror}")
                return None
            is_last = depth == len(components) - 1
            if not is_last and not stat.S_ISDIR(st.st_mode):
                # Most often a symlinked parent (/var/run -> /run): following it would leave the picked tree.
                warnings.append(
                    "picked path goes through a non-directory (not followed): "
                    f"{_display(root_path, components)}"
                )
                return None
            child = _make_node(name, child_path, st, warnings)
            if child is None:
                return None
            node.children[name] = child
        node = child
        if not node.is_dir and depth < len(components) - 1:
            warnings.append(f"picked path goes through a non-directory: {_display(root_path, components)}")
            return None
    return node


def _make_node(name: str, path: str, st: os.stat_result, warnings: list[str]) -> Node | None:
    kind = entry_type(st.st_mode)
    if kind is None:
        warnings.append(f"skipped {path!r}: unsupported file type {stat.S_IFMT(st.st_mode):o}")
        return None
    node = Node(name=name, path=path, stat=Stat.of(st), type=kind)
    if kind == "dir":
        node.children = {}
    try:
        if kind == "symlink":
            node.target = os.readlink(path)
        node.xattrs = read_xattrs(path) or None
    except OSError as error:
        warnings.append(f"cannot read metadata of {path!r}: {error.strerror}")
    return node


def _display(root_path: str, components: list[str]) -> str:
    return (
        repr("/" + "/".join(components)) if root_path == "/" else repr(os.path.join(root_path, *components))
    )
