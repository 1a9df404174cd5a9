"""Issue 3: this Python's standard library plus a crafted tree (odd names, links, modes, a 200 MB file)
archive and restore exactly, and a no-change re-run of it all costs a handful of requests.

The stdlib is picked in place, read-only (the picker prints its top-level entries but site-packages);
the crafted tree lives under a quiet directory (S3SB_TEST_QUIET_DIR) so no other test changes its
ancestors' mtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysbackup_local.stack import LocalHost
from test_archive_restore import build_tree
from test_issue3_support import archive, pick, quiet_directory, restore

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
BIG_FILE_MIB = 200
NON_UTF8_NAME = b"latin-1 \xe9t\xe9 \xff\xfe"


def stdlib_entries() -> list[Path]:
    """The standard library's top-level entries, site-packages left out (~7.7k files, 257 MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(entry for entry in stdlib.iterdir() if entry.name != "site-packages")


def write_mixed_file(path: Path, mib: int) -> None:
    """Alternating MiB of random bytes and of repetitive text: some chunks compress, some do not."""
    text = b"".join(b"line %08d of a very compressible log file\n" % i for i in range(MIB // 44 + 1))[:MIB]
    with path.open("wb") as out:
        for block in range(mib):
            out.write(os.urandom(MIB) if block % 2 else text)


def build_odd_tree(top: Path) -> None:
    """test_archive_restore's crafted tree, plus what a larger system has that it lacks."""
    build_tree(top)
    (top / "empty-dir" / "nested-empty").mkdir()
    (top / "dir-link").symlink_to("etc/app")  # a symlink to a directory: kept as a link, not followed
    (top / "restricted").mkdir(mode=0o750)
    (top / "restricted").chmod(0o750)
    (top / "restricted" / "key").write_bytes(b"k")
    (top / "restricted" / "key").chmod(0o600)
    (top / "emojis 🗄️ and\ttabs").write_bytes(b"")
    raw_top = os.fsencode(top)
    fd = os.open(raw_top + b"/" + NON_UTF8_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"a name that is not UTF-8")
    os.close(fd)
    os.symlink(b"target \xff not utf-8", raw_top + b"/link \xfe")
    os.link(top / "empty", top / "empty-hard-link")  # hard-linked empty files
    write_mixed_file(top / "big-mixed.bin", BIG_FILE_MIB)


def fingerprint(top: Path) -> dict[bytes, tuple[object, ...]]:
    """Type, mode, mtime, size, content digest or link target, hard-link peer: `top` and all below it."""
    raw_top = os.fsencode(top)
    paths = [raw_top]
    if stat.S_ISDIR(os.lstat(raw_top).st_mode):
        for directory, dirs, files in os.walk(raw_top):
            paths.extend(os.path.join(directory, name) for name in [*dirs, *files])
    seen: dict[bytes, tuple[object, ...]] = {}
    first_name: dict[int, bytes] = {}
    for path in paths:
        st = os.lstat(path)
        relative = os.path.relpath(path, raw_top)
        content: object = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as handle:
                content = hashlib.file_digest(handle, "sha256").hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        is_linked_file = st.st_nlink > 1 and stat.S_ISREG(st.st_mode)
        peer = first_name.setdefault(st.st_ino, relative) if is_linked_file else None
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        seen[relative] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            size,
            content,
            peer,
        )
    return seen


@pytest.fixture
def crafted() -> Iterator[Path]:
    with quiet_directory() as quiet:
        top = quiet / "crafted"
        top.mkdir()
        build_odd_tree(top)
        time.sleep(1.1)  # files changed within a second of a scan are re-read next time; let them settle
        yield top


def test_the_stdlib_and_a_crafted_tree_restore_exactly(
    host_config: LocalHost, crafted: Path, tmp_path: Path
) -> None:
    picked = [*stdlib_entries(), crafted]
    pick(host_config, picked, tmp_path / "cache")
    expected = {path: fingerprint(path) for path in picked}
    regular = [entry for tree in expected.values() for entry in tree.values() if entry[0] == stat.S_IFREG]
    files, total_bytes = len(regular), sum(entry[3] for entry in regular)
    assert files > 7500 and total_bytes > (230 + BIG_FILE_MIB) * MIB

    started = time.monotonic()
    first = archive(host_config, tmp_path / "first.json")
    archived_s = time.monotonic() - started
    assert first.returncode == 0, first.process.stderr[-3000:]
    # Every regular file counted once per path (a hard link's second name too).
    assert first.stats["files"] == files, first.stats
    assert first.stats["bytes"] == total_bytes

    started = time.monotonic()
    target = tmp_path / "restored"
    restored = restore(host_config, target, "--stats-json", str(tmp_path / "restore.json"))
    restored_s = time.monotonic() - started
    assert restored.returncode == 0, restored.stderr[-3000:]
    for path, tree in expected.items():
        assert fingerprint(target / str(path).lstrip("/")) == tree, path
        assert fingerprint(path) == tree, f"{path} changed during the test: the comparison proves nothing"

    # Nothing changed: the re-run reads no file and makes one call, the commit, however large the tree.
    again = archive(host_config, tmp_path / "again.json")
    assert again.returncode == 0, again.process.stderr[-3000:]
    assert again.stats["files_read"] == 0 and again.stats["bytes_uploaded"] == 0
    assert again.stats["requests"]["api"] == {"POST /manifests": 1}, again.stats["requests"]
    restore_figures = json.loads((tmp_path / "restore.json").read_text())
    # Ranged GETs over merged spans of each pack, not one per file or blob.
    assert restore_figures["requests"]["s3"]["get"] < files / 10, restore_figures["requests"]
    print(
        f"\nlarge tree: {files} files, {total_bytes / MIB:.0f} MiB; archive {archived_s:.1f} s"
        f" with {first.stats['requests']}, restore {restored_s:.1f} s with {restore_figures['requests']},"
        f" no-change run {again.stats['elapsed_s']:.1f} s with {again.stats['requests']}"
    )
