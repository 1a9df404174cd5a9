"""Turn the picked paths into an in-memory tree of lstat()ed nodes.

Rules: nothing is followed (symlinks are recorded as symlinks); a picked directory means everything
under it, but a directory on another filesystem inside it is recorded without its contents unless it
was picked itself (like `find -xdev`: picking `/` must not drag in /proc); the parents of every
picked path are recorded as directories so restore can rebuild the path with their owners and modes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .metadata import Stat, entry_type, read_xattrs


@dataclass(slots=True)  # one per file: no per-instance __dict__
class Node:
    name: str  # "" for the root
    path: str
    stat: Stat
    type: str
    target: str | None = None  # symlinks
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, Node] | None = None  # dirs only
    expanded: bool = False  # all entries under it were walked

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


@dataclass
class WalkResult:
    root: Node
    warnings: list[str] = field(default_factory=list)

    def iter_nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children.values())


def walk(picked: Iterable[str], root_path: str = "/") -> WalkResult:
    """lstat-walk `picked` (absolute paths). `root_path` lets tests walk a scratch directory as `/`."""
    warnings: list[str] = []
    root = _make_node("", root_path, os.lstat(root_path), warnings)
    if root is None or not root.is_dir:
        raise NotADirectoryError(f"walk root {root_path!r} is not a directory")
    result = WalkResult(root=root, warnings=warnings)
    for path in picked:
        components = _components(path, result.warnings)
        if components is None:
            continue
        node = _descend(result.root, components, root_path, result.warnings)
        if node is not None and node.is_dir:
            _expand(node, result.warnings)
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


def _expand(top: Node, warnings: list[str]) -> None:
    """Add everything under `top` (iteratively: trees can be deeper than Python's recursion limit)."""
    device = top.stat.st_dev
    stack = [top]
    while stack:
        node = stack.pop()
        if node.expanded:
            continue
        node.expanded = True
        assert node.children is not None
        try:
            with os.scandir(node.path) as entries:
                listed = [(entry.name, entry.path, entry.stat(follow_symlinks=False)) for entry in entries]
        except OSError as error:
            warnings.append(f"cannot list {node.path!r}: {error.strerror}")
            continue
        for name, path, st in listed:
            child = node.children.get(name)
            if child is None:
                child = _make_node(name, path, st, warnings)
                if child is None:
                    continue
                node.children[name] = child
            if child.is_dir and child.stat.st_dev == device:
                stack.append(child)


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
        node.xattrs = read_xattrs(path)
    except OSError as error:
        warnings.append(f"cannot read metadata of {path!r}: {error.strerror}")
    return node


def _display(root_path: str, components: list[str]) -> str:
    return (
        repr("/" + "/".join(components)) if root_path == "/" else repr(os.path.join(root_path, *components))
    )
