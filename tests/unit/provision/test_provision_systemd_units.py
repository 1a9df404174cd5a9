"""The systemd units write-config installs: `systemd-analyze verify` accepts them, and they are hardened.

systemd-analyze verify works without a running systemd (it loads the units offline); it prints unknown
or malformed settings as warnings with exit status 0, so the test also requires empty output.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from s3_sysbackup.provision.systemd import SERVICE_NAME, TIMER_NAME, UnitSettings, render_service, write_units

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt install systemd)"
)


@pytest.fixture
def units(tmp_path: Path) -> dict[str, Path]:
    # ExecStart must name an existing executable for verify to pass: this interpreter is one.
    settings = UnitSettings(Path(sys.executable), tmp_path / "etc backup", Path("/var/cache/s3-sysbackup"))
    return {path.name: path for path in write_units(tmp_path / "units", settings)}


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=paths[0].parent,
        timeout=60,
        check=False,
    )


def unit_settings(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return {section: dict(parser[section]) for section in parser.sections()}


@needs_systemd_analyze
def test_systemd_analyze_accepts_both_units_without_a_warning(units: dict[str, Path]) -> None:
    result = verify(units[SERVICE_NAME], units[TIMER_NAME])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_would_report_a_mistyped_setting(units: dict[str, Path]) -> None:
    """Guards the test above: the same call does see a bad value or an unknown key."""
    service = units[SERVICE_NAME]
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    assert "stricter" in verify(service).stderr


def test_the_service_is_a_hardened_oneshot(units: dict[str, Path]) -> None:
    service = unit_settings(units[SERVICE_NAME])["Service"]
    assert service["Type"] == "oneshot"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "read-only"
    assert service["ReadWritePaths"] == "/var/cache/s3-sysbackup"
    # Reading every file needs exactly this capability; nothing else survives the bounding set.
    assert service["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    assert service["AmbientCapabilities"] == "CAP_DAC_READ_SEARCH"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["SystemCallFilter"] == "@system-service"
    assert service["IOSchedulingClass"] == "idle"
    assert int(service["Nice"]) > 0


def test_the_service_runs_archive_on_this_config_dir_even_with_spaces(units: dict[str, Path]) -> None:
    exec_start = unit_settings(units[SERVICE_NAME])["Service"]["ExecStart"]
    assert exec_start.startswith(sys.executable + " --config-dir ")
    assert "'" + str(units[SERVICE_NAME].parent.parent / "etc backup") + "'" in exec_start
    assert exec_start.endswith(" archive --quiet")


def test_the_timer_runs_daily_catches_up_and_spreads_hosts(units: dict[str, Path]) -> None:
    timer = unit_settings(units[TIMER_NAME])
    assert timer["Timer"]["OnCalendar"] == "daily"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"] == "1h"
    assert timer["Timer"]["Unit"] == SERVICE_NAME
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_a_custom_cache_dir_is_the_only_writable_path() -> None:
    settings = UnitSettings(Path("/usr/bin/s3-sysbackup"), Path("/etc/backup"), Path("/srv/cache"))
    text = render_service(settings)
    assert [line for line in text.splitlines() if line.startswith("ReadWritePaths=")] == [
        "ReadWritePaths=/srv/cache"
    ]


def security_check(service: Path) -> subprocess.CompletedProcess[str]:
    """systemd's own exposure score (0-10); --threshold is in tenths: 40 = fail above 4.0, "OK" level."""
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=40", "--no-pager", service.name],
        capture_output=True,
        text=True,
        cwd=service.parent,
        timeout=60,
        check=False,
    )


@needs_systemd_analyze
def test_systemd_rates_the_service_exposure_ok(units: dict[str, Path]) -> None:
    result = security_check(units[SERVICE_NAME])
    assert result.returncode == 0, result.stdout[-400:]
    assert "Overall exposure level for s3-sysbackup.service" in result.stdout


@needs_systemd_analyze
def test_the_exposure_check_fails_an_unhardened_service(tmp_path: Path) -> None:
    """Guards the test above: a plain oneshot running as root is rated far above the threshold."""
    plain = tmp_path / SERVICE_NAME
    plain.write_text(f"[Unit]\nDescription=plain\n[Service]\nType=oneshot\nExecStart={sys.executable}\n")
    assert security_check(plain).returncode != 0
