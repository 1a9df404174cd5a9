"""archive -> restore through the in-memory v2 backend: packs, local dedup, the cache, crashes, conflicts."""

from __future__ import annotations

import gc
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pick, write_script
from s3_sysbackup import archiver as archiver_module
from s3_sysbackup import cache as cache_module
from s3_sysbackup import restorer as restorer_module
from s3_sysbackup.archiver import (
    EXIT_OK,
    EXIT_WARNINGS,
    Archiver,
    CommitConflict,
    _bounded_warnings,
    _file_chunks,
    run_bounded,
)
from s3_sysbackup.fetch import BlobFetcher, stream_chunks
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.metadata import user_name
from s3_sysbackup.restorer import RestoreError, Restorer, write_snapshot
from s3_sysbackup.sink import FAULT_ENV, InjectedFault, PackShipper, SealedPack
from s3_sysbackup.walker import Node
from sysbackup_domain.chunking import FILE_CHUNKING, SMALL_FILE_BYTES, chunk_file
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import MAX_WARNING_CHARS, parse_commit_request
from sysbackup_domain.packs import PackWriter, open_blob, parse_trailer, verify_pack
from sysbackup_domain.tree import decode_tree
from uploader_fakes import FakeBackend

BIG_BYTES = 3 * SMALL_FILE_BYTES + 12345
# user::rw-, user:4242:r--, group::r--, mask::r--, other::--- in the kernel's xattr format (version 2)
ACL_WITH_NAMED_USER = (2).to_bytes(4, "little") + b"".join(
    tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    for tag, perm, ident in (
        (1, 6, 2**32 - 1),
        (2, 4, 4242),
        (4, 4, 2**32 - 1),
        (0x10, 4, 2**32 - 1),
        (0x20, 0, 2**32 - 1),
    )
)


def build_sample_tree(root: Path) -> Path:
    """Every kind of thing the walker must record, under root/data."""
    data = root / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "emptydir").mkdir()
    (data / "plain.txt").write_bytes(b"hello\n")
    (data / "empty").write_bytes(b"")
    (data / "secret").write_bytes(b"0600 content")
    (data / "secret").chmod(0o600)
    (data / "with space and ünïcode").write_bytes(b"unicode name")
    (data / "new\nline").write_bytes(b"newline name")
    (data / os.fsdecode(b"latin1-\xe9")).write_bytes(b"non-utf8 name")
    (data / "big.bin").write_bytes(os.urandom(BIG_BYTES))
    (data / "zeros.bin").write_bytes(bytes(2 * SMALL_FILE_BYTES))
    (data / "sub" / "deeper" / "file").write_bytes(b"deep")
    (data / "link").symlink_to("plain.txt")
    (data / "dangling").symlink_to("/nonexistent/target")
    (data / "acl-file").write_bytes(b"has a POSIX ACL")
    (data / "hard1").write_bytes(b"linked twice")
    os.link(data / "hard1", data / "hard2")
    os.mkfifo(data / "fifo", 0o640)
    os.setxattr(data / "plain.txt", "user.note", b"xattr value")
    (data / "sub").chmod(0o750)
    if os.geteuid() == 0:
        os.chown(data / "secret", 12345, 23456)  # ids no name maps to: restored by number
        os.setxattr(data / "acl-file", "system.posix_acl_access", ACL_WITH_NAMED_USER)
    return data


def snapshot_of(top: Path) -> dict[str, tuple]:
    """What a restore must reproduce, per relative path (lstat-based, nothing followed)."""
    seen: dict[str, tuple] = {}
    inode_names: dict[int, str] = {}
    for path in sorted([top, *top.rglob("*")]):
        st = path.lstat()
        rel = str(path.relative_to(top))
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        link_peer = None
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            link_peer = inode_names.setdefault(st.st_ino, rel)
        xattrs = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)
        }
        mtime = st.st_mtime_ns
        owner = (st.st_uid, st.st_gid)
        seen[rel] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            mtime,
            owner,
            content,
            link_peer,
            xattrs,
        )
    return seen


@pytest.fixture(autouse=True)
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files made a moment ago are inside the 1 s racy window; tests that want reuse cannot wait.
    monkeypatch.setattr(cache_module, "RACY_WINDOW_NS", 0)


def backend_blob(backend: FakeBackend, digest: str) -> bytes:
    pack_id = backend.blobs()[digest]
    entry = next(e for e in verify_pack(backend.objects[pack_id]) if e.hash == digest)
    return open_blob(entry, backend.objects[pack_id][entry.offset : entry.offset + entry.length])


def fresh_fetcher(backend: FakeBackend, transfer) -> BlobFetcher:
    """A fetcher whose index starts empty: it learns the packs from GET /packs and their trailers."""
    return BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]


def new_calls(backend: FakeBackend, before: dict[str, int]) -> dict[str, int]:
    after = backend.counter.as_dict().get("api", {})
    return {route: n - before.get(route, 0) for route, n in after.items() if n - before.get(route, 0)}


def restore(backend: FakeBackend, transfer, manifest_id: str, target: Path, paths=(), overwrite=False):
    fetcher = fresh_fetcher(backend, transfer)
    return Restorer(fetcher, str(target), overwrite=overwrite).restore(
        backend.get_manifest(manifest_id), paths
    )


def test_round_trip_is_exact(run_archive, config_dir, host_root, backend, transfer, tmp_path):
    data = build_sample_tree(host_root)
    pick(config_dir, "/data")
    result = run_archive()
    assert result.exit_code == EXIT_OK, result.warnings
    target = tmp_path / "restored"
    restored = restore(backend, transfer, result.manifest_id, target)
    assert snapshot_of(target / "data") == snapshot_of(data)
    assert restored.warnings == []
    assert result.stats["files"] == restored.files == 12  # regular files, hard links included
    zeros = (target / "data" / "zeros.bin").stat()
    assert zeros.st_blocks * 512 < zeros.st_size // 2  # all-zero chunks were left as holes
    if os.geteuid() == 0:
        tree = decode_tree(backend_blob(backend, backend.get_manifest(result.manifest_id)["root"]))
        data_tree = decode_tree(backend_blob(backend, tree.entries[0].subtree))
        acl = next(entry.acl for entry in data_tree.entries if entry.name == "acl-file")
        assert acl == f"user::rw-,user:{user_name(4242) or 4242}:r--,group::r--,mask::r--,other::---"


def test_a_small_run_is_one_valid_pack_of_data_and_trees(run_archive, config_dir, host_root, backend):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    run_archive()
    assert len(backend.objects) == 1  # one PUT; the commit reads and verifies it in one GET
    (pack,) = backend.objects.values()
    assert {entry.kind for entry in verify_pack(pack)} == {"data", "tree"}


def test_unchanged_second_run_reads_and_uploads_nothing(run_archive, config_dir, host_root, backend):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    first = run_archive()
    before = backend.counter.as_dict()["api"]
    second = run_archive()
    assert second.stats["files_read"] == 0
    assert second.stats["files_reused"] == first.stats["files_read"]
    assert second.stats["packs"] == 0 and second.stats["bytes_uploaded"] == 0
    assert new_calls(backend, before) == {"POST /manifests": 1}
    assert backend.commit_requests[-1]["packs"] == [] and backend.commit_requests[-1]["locations"] == {}
    assert second.root == first.root
    assert backend.manifests[second.manifest_id]["parent"] == first.manifest_id


def test_changed_file_alone_is_read_again(run_archive, config_dir, host_root, backend, transfer, tmp_path):
    data = build_sample_tree(host_root)
    pick(config_dir, "/data")
    first = run_archive()
    (data / "sub" / "deeper" / "file").write_bytes(b"changed content")
    before = backend.counter.as_dict()["api"]
    second = run_archive()
    assert new_calls(backend, before) == {"POST /packs/presign": 1, "POST /manifests": 1}
    assert second.stats["files_read"] == 1
    assert second.root != first.root
    assert second.stats["bytes_uploaded"] < 64 * 1024  # the new file and a few trees, no big.bin
    target = tmp_path / "restored"
    restore(backend, transfer, second.manifest_id, target)
    assert (target / "data" / "sub" / "deeper" / "file").read_bytes() == b"changed content"


def test_failing_picker_is_a_warning_and_others_still_count(run_archive, config_dir, host_root, backend):
    build_sample_tree(host_root)
    pick(config_dir, "/data/plain.txt", name="10-good")
    write_script(config_dir / "pickers.d" / "20-bad", "echo /data/secret\nexit 3\n")
    result = run_archive()
    assert result.exit_code == EXIT_WARNINGS
    assert any("20-bad" in w and "status 3" in w for w in result.warnings)
    assert result.stats["files"] == 2  # both pickers' paths


def crash_once(run_archive, monkeypatch: pytest.MonkeyPatch, fault: str, **options) -> None:
    """One archive run that crashes at `fault` (S3SB_FAULT), leaving the environment clean after."""
    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(InjectedFault):
        run_archive(**options)
    monkeypatch.delenv(FAULT_ENV)


def test_crash_after_indexing_then_rerun_sends_nothing_again(
    run_archive, config_dir, host_root, backend, transfer, monkeypatch
):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    crash_once(run_archive, monkeypatch, "after-index")
    put_by_crash = list(transfer.puts)
    assert put_by_crash and backend.head is None
    result = run_archive()
    assert backend.head == result.manifest_id
    # Only what the crashed run had not indexed yet (trees come after data) went up.
    assert not set(transfer.puts[len(put_by_crash) :]) & set(put_by_crash)


def test_crash_after_pack_put_then_rerun_finds_identical_packs_stored(
    run_archive, make_config, config_dir, host_root, backend, transfer, monkeypatch, tmp_path
):
    data = build_sample_tree(host_root)
    pick(config_dir, "/data")
    crash_once(run_archive, monkeypatch, "after-pack-put", config=make_config(workers=1))
    put_by_crash = set(backend.objects)
    assert put_by_crash and backend.head is None
    listed_before = backend.counter.as_dict()["api"].get("GET /packs", 0)

    # One reader: the re-run builds byte-identical packs, which presign answers as stored.
    result = run_archive(config=make_config(workers=1))

    assert result.stats["packs_already_there"] == len(put_by_crash)
    assert len(transfer.puts) == len(set(transfer.puts))  # no pack was PUT twice
    assert backend.counter.as_dict()["api"].get("GET /packs", 0) == listed_before  # no pack list read
    target = tmp_path / "restored"
    restore(backend, transfer, result.manifest_id, target)
    assert (target / "data" / "big.bin").read_bytes() == (data / "big.bin").read_bytes()


def test_a_pack_the_backend_already_stores_is_indexed_without_a_put(backend, transfer):
    writer = PackWriter()
    writer.add(blob_hash(b"already there"), "data", b"already there")
    data, entries = writer.finish()
    stored_by_another_run = backend.store_pack(data)
    indexed: list[str] = []
    shipper = PackShipper(backend, transfer, on_stored=lambda pack: indexed.append(pack.sha256))  # type: ignore[arg-type]
    shipper.ship([SealedPack.in_memory(data, entries)])
    assert indexed == [stored_by_another_run] and transfer.puts == []
    assert shipper.counts.packs_already_there == 1 and shipper.counts.bytes_uploaded == 0


def test_crash_after_commit_then_rerun_adopts_its_own_commit(
    run_archive, config_dir, host_root, backend, monkeypatch
):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    monkeypatch.setenv(FAULT_ENV, "mid-commit")
    with pytest.raises(InjectedFault):
        run_archive()
    crashed_commit = backend.head
    assert crashed_commit is not None
    monkeypatch.delenv(FAULT_ENV)
    result = run_archive()
    assert backend.manifests[result.manifest_id]["parent"] == crashed_commit


def test_someone_elses_head_is_a_clear_conflict(run_archive, config_dir, host_root, backend):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    run_archive()
    backend.commit_manifest(
        {"parent": backend.head, "root": None, "snapshots": [], "stats": {"run_id": "clone"}}
    )
    with pytest.raises(CommitConflict, match="cloned"):
        run_archive()


def test_locked_file_keeps_its_previous_version(
    run_archive, make_config, config_dir, host_root, backend, transfer, tmp_path
):
    data = build_sample_tree(host_root)
    pick(config_dir, "/data")
    first = run_archive()
    secret = data / "secret"
    secret.write_bytes(b"being rewritten")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(30)",
            str(secret),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        second = run_archive(config=make_config(lock_timeout_s=0.3))
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert second.exit_code == EXIT_WARNINGS
    assert any("secret" in w and "previous version" in w for w in second.warnings)
    target = tmp_path / "restored"
    restore(backend, transfer, second.manifest_id, target, paths=["/data/secret"])
    assert (target / "data" / "secret").read_bytes() == b"0600 content"
    assert first.exit_code == EXIT_OK


def test_snapshot_stream_round_trips(run_archive, config_dir, backend, transfer, monkeypatch):
    payload = b"".join(b"row %d: some database content\n" % i for i in range(60000))
    stream_file = config_dir / "payload.sql"
    stream_file.write_bytes(payload)
    write_script(
        config_dir / "snapshots.d" / "db",
        f'echo "nightly dump"\necho "::restore-through::psql db"\ncat {stream_file} >&$1\n',
    )
    result = run_archive()
    snapshot = backend.get_manifest(result.manifest_id)["snapshots"][0]
    assert snapshot["name"] == "db" and snapshot["description"] == "nightly dump"
    assert snapshot["restore_through"] == "psql db" and snapshot["size"] == len(payload)
    fetcher = fresh_fetcher(backend, transfer)
    chunks = stream_chunks(fetcher, snapshot["content"])
    assert len(chunks) > 3
    out = io.BytesIO()
    monkeypatch.setattr(restorer_module, "SNAPSHOT_WINDOW_CHUNKS", 3)  # several windows
    assert write_snapshot(fetcher, backend.get_manifest(result.manifest_id), "db", out) == len(payload)
    assert out.getvalue() == payload
    with pytest.raises(RestoreError, match=r"no snapshot 'web'.*db"):
        write_snapshot(fetcher, backend.get_manifest(result.manifest_id), "web", out)


def test_failing_and_hanging_snapshotters_are_warnings(run_archive, make_config, config_dir, backend):
    write_script(config_dir / "snapshots.d" / "10-fails", "echo partial >&$1\necho 'db down' >&2\nexit 5\n")
    write_script(config_dir / "snapshots.d" / "20-hangs", "echo started >&$1\nsleep 60\n")
    write_script(config_dir / "snapshots.d" / "30-works", "echo fine >&$1\n")
    started = time.monotonic()
    result = run_archive(config=make_config(snapshot_timeout_s=0.5))
    assert time.monotonic() - started < 10
    assert result.exit_code == EXIT_WARNINGS
    records = {s["name"]: s for s in backend.get_manifest(result.manifest_id)["snapshots"]}
    assert records["10-fails"]["exit_status"] == 5 and "db down" in records["10-fails"]["error"]
    assert "timeout" in records["20-hangs"]["error"] and records["20-hangs"]["size"] == len(b"started\n")
    assert records["30-works"]["error"] is None and records["30-works"]["size"] == len(b"fine\n")
    assert sum("snapshot" in w for w in result.warnings) == 2


def test_a_file_growing_while_read_is_read_again_then_warned(run_archive, config_dir, host_root):
    growing = host_root / "data" / "growing.log"
    growing.parent.mkdir()
    growing.write_bytes(os.urandom(8 * SMALL_FILE_BYTES))
    pick(config_dir, "/data")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time\nwith open(sys.argv[1],'ab',buffering=0) as f:\n"
            " print('writing',flush=True)\n while True: f.write(b'x'); time.sleep(0.0005)",
            str(growing),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        result = run_archive()
    finally:
        writer.kill()
        writer.wait()
    assert result.exit_code == EXIT_WARNINGS
    assert any("growing.log" in w and "changed while being read" in w for w in result.warnings)
    assert result.stats["bytes_read"] > 2 * 8 * SMALL_FILE_BYTES  # read twice
    again = run_archive()  # quiet now: the inconsistent copy must not be trusted as the parent
    assert again.stats["files_read"] == 1 and again.exit_code == EXIT_OK


def test_an_empty_run_commits_but_warns(run_archive, backend):
    result = run_archive()
    assert result.exit_code == EXIT_WARNINGS and "nothing to back up" in result.warnings[0]
    assert backend.get_manifest(result.manifest_id)["root"] is None


def make_chain(top: Path, depth: int) -> Path:
    """top/d/d/.../d (`depth` levels) without recursion (pathlib's mkdir(parents=True) recurses)."""
    path = top
    path.mkdir()
    for _ in range(depth):
        path = path / "d"
        path.mkdir()
    return path


def remove_chain(top: Path, depth: int) -> None:
    """Undo make_chain bottom-up (shutil.rmtree recurses too, and would fail on pytest's cleanup)."""
    for level in range(depth, -1, -1):
        path = top / Path(*["d"] * level) if level else top
        for child in path.iterdir():
            if not child.is_dir() or child.is_symlink():
                child.unlink()
        path.rmdir()


def test_trees_deeper_than_the_recursion_limit(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    depth = sys.getrecursionlimit() + 100
    deepest = make_chain(host_root / "deep", depth)
    (deepest / "leaf").write_bytes(b"bottom")
    pick(config_dir, "/deep")
    target = tmp_path / "restored"
    try:
        result = run_archive()
        restore(backend, transfer, result.manifest_id, target)
        assert (target / "deep" / Path(*["d"] * depth) / "leaf").read_bytes() == b"bottom"
    finally:
        remove_chain(host_root / "deep", depth)
        if (target / "deep").exists():
            remove_chain(target / "deep", depth)


def test_bounded_runner_does_everything_and_stops_at_the_first_failure():
    done: list[int] = []

    def work(item: int) -> None:
        if item == 50:
            raise ValueError("item 50 failed")
        done.append(item)

    run_bounded(done.append, range(1000), workers=3)
    assert sorted(done) == list(range(1000))
    done.clear()
    with pytest.raises(ValueError, match="item 50"):
        run_bounded(work, range(100_000), workers=2)
    assert len(done) < 1000  # submission stopped soon after the failure


def test_a_backend_without_history_for_this_host_starts_a_new_chain(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    data = build_sample_tree(host_root)
    pick(config_dir, "/data")
    run_archive()
    fresh = FakeBackend()  # e.g. the stack was rebuilt behind the same endpoint
    backend.__dict__.update(fresh.__dict__)
    result = run_archive()
    assert backend.manifests[result.manifest_id]["parent"] is None
    target = tmp_path / "restored"
    restore(backend, transfer, result.manifest_id, target)
    assert (target / "data" / "big.bin").read_bytes() == (data / "big.bin").read_bytes()


@pytest.mark.parametrize("text", ["w" * 4000, "é" * 4000])
def test_the_warnings_sent_always_fit_what_the_backend_takes(text: str):
    """10,000 long warnings (non-ASCII ones grow 6x when encoded) would make a manifest too large to
    serve back; the uploader keeps what fits and sums up the rest in a last line."""
    warnings = [f"{index}: {text}" for index in range(10_000)]

    sent = _bounded_warnings(warnings)

    request = parse_commit_request({"parent": None, "root": None, "snapshots": [], "warnings": sent})
    assert 1 < len(request.warnings) < len(warnings)
    assert request.warnings[:-1] == tuple(w[:MAX_WARNING_CHARS] for w in warnings[: len(sent) - 1])
    assert request.warnings[-1] == f"... and {len(warnings) - len(sent) + 1} more warnings"


def test_a_restore_asks_for_each_packs_url_once_and_reads_all_its_trees_in_one_get(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    deep = host_root / "data" / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    for level, directory in enumerate([deep, *deep.parents][:6]):
        (directory / f"f{level}").write_bytes(f"file at level {level}".encode())
    pick(config_dir, "/data")
    result = run_archive()
    (pack_id,) = backend.objects  # a small run: one pack holds the files and the trees
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    pack = backend.objects[pack_id]
    fetcher.index.record_pack(pack_id, len(pack), parse_trailer(pack))  # as this host's own index holds it
    before = backend.counter.as_dict()

    Restorer(fetcher, str(tmp_path / "restored")).restore(backend.get_manifest(result.manifest_id), ())

    after = backend.counter.as_dict()
    assert after["api"]["POST /downloads"] - before["api"].get("POST /downloads", 0) == 1  # 8 tree levels
    # One GET brought every tree of the pack (the walk is 8 levels deep), one more the file contents.
    assert after["s3"]["get"] - before["s3"].get("get", 0) == 2
    assert (tmp_path / "restored" / deep.relative_to(host_root) / "f0").read_bytes() == b"file at level 0"


def test_a_hosts_first_run_asks_for_the_head_and_lists_no_packs(run_archive, config_dir, host_root, backend):
    build_sample_tree(host_root)
    pick(config_dir, "/data")
    result = run_archive()
    calls = backend.counter.as_dict()["api"]
    # GET /manifests goes to the function the commit calls anyway: a first run starts no third one.
    assert calls == {"GET /manifests": 1, "POST /packs/presign": 1, "POST /manifests": 1}, calls
    assert backend.head == result.manifest_id


@pytest.mark.parametrize("size", [0, 1000, FILE_CHUNKING.one_blob_up_to, 3 * FILE_CHUNKING.one_blob_up_to])
@pytest.mark.parametrize("stale_hint", [False, True])  # True: the file grew after fstat said 10 bytes
def test_file_chunks_match_chunk_file_whatever_fstat_said(tmp_path: Path, size: int, stale_hint: bool):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    with path.open("rb") as stream:
        expected = list(chunk_file(stream, FILE_CHUNKING))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(_file_chunks(fd, 10 if stale_hint else size)) == expected
    finally:
        os.close(fd)


def test_a_run_lets_each_directory_go_once_its_tree_is_built(
    run_archive, config_dir, host_root, backend, transfer, tmp_path, monkeypatch
):
    monkeypatch.setattr(archiver_module, "READ_BATCH", 4)
    monkeypatch.setattr(archiver_module, "WAITING_ENTRIES_MAX", 8)
    data = host_root / "data"
    for d in range(12):
        (data / f"d{d:02d}").mkdir(parents=True)
        for f in range(10):
            (data / f"d{d:02d}" / f"f{f}").write_bytes(b"file %d %d\n" % (d, f))
    pick(config_dir, "/data")
    live_nodes: list[int] = []
    read_file = Archiver._read_file

    def counting_read(self, node, cached, sink, warnings):
        live_nodes.append(sum(1 for thing in gc.get_objects() if isinstance(thing, Node)))
        return read_file(self, node, cached, sink, warnings)

    monkeypatch.setattr(Archiver, "_read_file", counting_read)
    result = run_archive()

    assert result.stats["files"] == 120 and result.stats["files_read"] == 120
    whole_tree = 120 + 12 + 3  # files, their directories, data, the root's parents
    assert max(live_nodes) <= whole_tree // 3, live_nodes  # about one directory's worth, not the tree
    target = tmp_path / "restored"
    restore(backend, transfer, result.manifest_id, target)
    assert snapshot_of(target / "data") == snapshot_of(data)
