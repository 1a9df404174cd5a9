"""The sub-commands as the CLI wires them: options parse, failures are one clear line and exit 1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import pick
from s3_sysbackup import cache as cache_module
from s3_sysbackup.cli import build_parser, main
from s3_sysbackup.commands.common import Session, blob_fetcher
from s3_sysbackup.restorer import Restorer
from s3_sysbackup.verify import verify_manifest


def test_every_command_parses_its_options():
    parser = build_parser()
    archive = parser.parse_args(["archive", "-q", "--stats-json", "/tmp/s.json", "--adopt-head"])
    assert archive.quiet and archive.adopt_head and archive.stats_json == Path("/tmp/s.json")
    restore = parser.parse_args(["restore", "latest", "/etc", "/var/lib", "--target", "/r", "--overwrite"])
    assert restore.manifest == "latest" and restore.paths == ["/etc", "/var/lib"] and restore.overwrite
    verify = parser.parse_args(["verify", "--read-data", "--host", "web-1"])
    assert verify.manifest == "latest" and verify.read_data and verify.host == "web-1"
    listing = parser.parse_args(["list", "--json"])
    assert listing.json and listing.host is None
    for args in (archive, restore, verify, listing):
        assert callable(args.handler)


def test_restore_needs_a_target_or_a_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["--config-dir", str(tmp_path), "restore", "latest"]) == 1
    assert "give either --target DIR or --snapshot NAME" in capsys.readouterr().err


def test_restore_stats_go_with_a_target_only(tmp_path: Path, capsys: pytest.CaptureFixture):
    stats = str(tmp_path / "s.json")
    assert (
        main(["--config-dir", str(tmp_path), "restore", "latest", "--snapshot", "db", "--stats-json", stats])
        == 1
    )
    assert "--stats-json goes with --target" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    "command", [["archive", "-q"], ["list"], ["restore", "latest", "--target", "/x"], ["verify"]]
)
def test_a_broken_config_is_one_clear_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture, command):
    (tmp_path / "conf").write_text("[api]\nregion = us-east-1\n")
    assert main(["--config-dir", str(tmp_path), *command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"s3-sysbackup {command[0]}: error: {tmp_path / 'conf'}: [api] endpoint is required"]


@pytest.fixture
def one_file_manifest(run_archive, config_dir, host_root, backend, monkeypatch) -> str:
    """The id of a committed manifest of /data/f ("restore me")."""
    monkeypatch.setattr(cache_module, "RACY_WINDOW_NS", 0)
    (host_root / "data").mkdir()
    (host_root / "data" / "f").write_bytes(b"restore me")
    pick(config_dir, "/data")
    return run_archive().manifest_id


def test_restore_and_verify_read_this_hosts_own_index(
    one_file_manifest, backend, transfer, make_config, tmp_path
):
    session = Session(make_config(), backend, transfer, backend.counter)  # type: ignore[arg-type]
    manifest = backend.get_manifest(one_file_manifest)
    listed_before = backend.counter.as_dict()["api"].get("GET /packs", 0)
    with blob_fetcher(session, host=None) as fetcher:
        report = verify_manifest(fetcher, manifest, read_data=True)
    assert report.blobs == 1 and report.bytes_verified == len(b"restore me")
    assert (
        backend.counter.as_dict()["api"].get("GET /packs", 0) == listed_before
    )  # the archive's index served

    with blob_fetcher(session, host="test-host") as other:  # a restore principal's --host
        Restorer(other, str(tmp_path / "r")).restore(manifest)
    assert (tmp_path / "r" / "data" / "f").read_bytes() == b"restore me"
    assert backend.counter.as_dict()["api"]["GET /packs"] == listed_before + 1


def test_a_cache_that_cannot_be_opened_falls_back_to_an_index_in_memory(
    one_file_manifest, backend, transfer, make_config, tmp_path
):
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    config = make_config()
    config = dataclasses.replace(config, content=dataclasses.replace(config.content, cache_dir=blocked))
    session = Session(config, backend, transfer, backend.counter)  # type: ignore[arg-type]
    with blob_fetcher(session, host=None) as fetcher:
        Restorer(fetcher, str(tmp_path / "r")).restore(backend.get_manifest(one_file_manifest))
    assert (tmp_path / "r" / "data" / "f").read_bytes() == b"restore me"
