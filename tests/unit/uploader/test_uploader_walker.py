"""The walker records what was picked, lstat-only, with full metadata and the picked paths' parents."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from s3_sysbackup.metadata import acl_text, hardlink_id, user_name
from s3_sysbackup.walker import Walk, walk


def make_tree(root: Path) -> Path:
    top = root / "srv" / "app"
    (top / "empty-dir").mkdir(parents=True)
    (top / "private").write_bytes(b"x")
    (top / "private").chmod(0o600)
    (top / "group-dir").mkdir(mode=0o750)
    (top / "group-dir").chmod(0o750)
    (top / "empty-file").write_bytes(b"")
    (top / "name with space").write_bytes(b"s")
    (top / "new\nline").write_bytes(b"n")
    (top / "ünï").write_bytes(b"u")
    (top / "to-outside").symlink_to(root / "outside")
    (top / "hard-a").write_bytes(b"h")
    os.link(top / "hard-a", top / "hard-b")
    os.mkfifo(top / "pipe")
    os.setxattr(top / "private", "user.origin", b"test")
    outside = root / "outside"
    outside.mkdir()
    (outside / "not-picked").write_bytes(b"o")
    return top


def walked(picks: list[str], root: Path) -> Walk:
    """The walk, run through (nothing dropped: the whole tree stays under `root`)."""
    result = walk(picks, root_path=str(root))
    for _ in result.nodes():
        pass
    return result


def test_picked_directory_is_recorded_recursively_with_metadata(tmp_path: Path):
    make_tree(tmp_path)
    result = walked(["/srv/app"], tmp_path)
    assert result.warnings == []
    srv = result.root.children["srv"]
    assert set(result.root.children) == {"srv"}  # "outside" was not picked
    app = srv.children["app"]
    kinds = {name: node.type for name, node in app.children.items()}
    assert kinds == {
        "empty-dir": "dir", "private": "file", "group-dir": "dir", "empty-file": "file",
        "name with space": "file", "new\nline": "file", "ünï": "file", "to-outside": "symlink",
        "hard-a": "file", "hard-b": "file", "pipe": "fifo",
    }  # fmt: skip
    assert stat.S_IMODE(app.children["private"].stat.st_mode) == 0o600
    assert stat.S_IMODE(app.children["group-dir"].stat.st_mode) == 0o750
    assert app.children["empty-dir"].children == {}
    assert app.children["to-outside"].target == str(tmp_path / "outside")
    assert app.children["to-outside"].children is None  # a symlink to a directory is not entered
    assert app.children["private"].xattrs == {"user.origin": b"test"}
    assert app.children["empty-file"].xattrs is None  # no empty dict per file
    hard_a, hard_b = app.children["hard-a"].stat, app.children["hard-b"].stat
    assert hardlink_id(hard_a) == hardlink_id(hard_b) is not None
    assert hardlink_id(app.children["private"].stat) is None


def test_parents_of_a_picked_file_are_recorded_without_siblings(tmp_path: Path):
    make_tree(tmp_path)
    result = walked(["/srv/app/private"], tmp_path)
    app = result.root.children["srv"].children["app"]
    assert list(app.children) == ["private"]
    assert app.type == "dir" and not app.picked


def test_a_path_through_a_symlink_is_not_followed(tmp_path: Path):
    make_tree(tmp_path)
    result = walked(["/srv/app/to-outside/not-picked", "/srv/app/missing"], tmp_path)
    assert len(result.warnings) == 2
    assert "non-directory" in result.warnings[0] and "does not exist" in result.warnings[1]
    assert "to-outside" not in result.root.children["srv"].children["app"].children


def test_dotdot_in_a_picked_path_is_refused(tmp_path: Path):
    make_tree(tmp_path)
    result = walked(["/srv/../outside"], tmp_path)
    assert result.root.children == {}
    assert "'..'" in result.warnings[0]


def test_acl_text_from_the_xattr_format():
    # version 2; user::rw-, user:1234:r--, group::r--, mask::r--, other::---
    entries = [
        (0x01, 6, 0xFFFFFFFF),
        (0x02, 4, 1234),
        (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF),
        (0x20, 0, 0xFFFFFFFF),
    ]
    raw = (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
        for tag, perm, ident in entries
    )
    text = acl_text({"system.posix_acl_access": raw})
    assert text is not None
    assert text.split(",")[0] == "user::rw-"
    assert text.split(",")[1] == f"user:{user_name(1234) or 1234}:r--"
    assert text.split(",")[-1] == "other::---"
    assert acl_text({"system.posix_acl_access": b"\x01\x02"}) is None  # malformed: no text, no crash


def test_overlapping_picks_in_any_order_give_the_same_tree(tmp_path: Path):
    make_tree(tmp_path)

    def shape(picks: list[str]) -> set[str]:
        stack, paths = [walked(picks, tmp_path).root], set()
        while stack:
            node = stack.pop()
            paths.add(node.path)
            stack.extend((node.children or {}).values())
        return paths

    whole = shape(["/srv/app"])
    assert shape(["/srv/app/private", "/srv/app/"]) == whole
    assert shape(["/srv/app", "/srv/app/group-dir", "/srv/app/private"]) == whole
    assert shape(["/srv"]) == whole  # /srv holds only app


def test_files_come_in_the_byte_order_of_their_paths_and_directories_after_their_entries(tmp_path: Path):
    top = tmp_path / "data"
    (top / "a").mkdir(parents=True)
    (top / "b").mkdir()
    for name in ("a-b", "a.c", "a/x", "a/y-z", "a/\udcff", "b/f"):  # "a-b" < "a.c" < "a/..." as bytes
        (top / name).write_bytes(b"x")

    nodes = [
        (node.path.removeprefix(str(tmp_path)), node.type) for node in walk(["/data"], str(tmp_path)).nodes()
    ]

    files = [path for path, kind in nodes if kind == "file"]
    assert files == ["/data/a-b", "/data/a.c", "/data/a/x", "/data/a/y-z", "/data/a/\udcff", "/data/b/f"]
    assert files == sorted(files, key=os.fsencode)  # what an ordered scan of the cache's rows gives
    directories = [path for path, kind in nodes if kind == "dir"]
    assert directories == ["/data/a", "/data/b", "/data", ""]  # each after its entries
    assert (
        nodes.index(("/data/a/\udcff", "file"))
        < nodes.index(("/data/a", "dir"))
        < nodes.index(("/data/b/f", "file"))
    )
