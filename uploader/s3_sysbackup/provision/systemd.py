"""The hardened `s3-sysbackup.service` (oneshot) and its daily `s3-sysbackup.timer`.

The service runs as root with every capability dropped but CAP_DAC_READ_SEARCH: that one lets it read
(and traverse) every file whatever its mode, which is all an archive needs; it cannot write anywhere but
its cache, change ownership, kill, load modules or bypass write permissions. Restores are run by hand,
outside this sandbox. Snapshotters run inside it too: one that switches user (the project's PostgreSQL
snapshotter runs pg_dump through `runuser -u postgres`) or keeps state outside the cache (its
\restrict key file in /var/lib/s3-sysbackup) needs a drop-in (`systemctl edit s3-sysbackup.service`):

    [Service]
    CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID
    ReadWritePaths=/var/lib/s3-sysbackup
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

SERVICE_NAME = "s3-sysbackup.service"
TIMER_NAME = "s3-sysbackup.timer"
DEFAULT_SYSTEMD_DIR = Path("/etc/systemd/system")


@dataclass(frozen=True)
class UnitSettings:
    executable: Path  # the s3-sysbackup console script
    config_dir: Path
    cache_dir: Path


def _quote(value: Path | str) -> str:
    # systemd's ExecStart splits like a shell for plain words; quote anything with spaces or specials.
    return shlex.quote(str(value))


def render_service(settings: UnitSettings) -> str:
    exec_start = " ".join(
        [_quote(settings.executable), "--config-dir", _quote(settings.config_dir), "archive", "--quiet"]
    )
    return f"""\
# Written by `s3-sysbackup write-config`. Overrides belong in a drop-in (systemctl edit s3-sysbackup).
[Unit]
Description=s3-sysbackup: WORM backup of this host
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart={exec_start}
# A run hung for most of a day is stopped, so the next day's can start (the cache makes it cheap).
TimeoutStartSec=20h
# archive exits 2 when it committed with warnings (a picker failed, a file was unreadable): the backup
# exists, but the unit should still show as failed so someone looks.

# Reading everything needs CAP_DAC_READ_SEARCH and nothing else (no DAC_OVERRIDE: no writes past modes).
CapabilityBoundingSet=CAP_DAC_READ_SEARCH
AmbientCapabilities=CAP_DAC_READ_SEARCH
NoNewPrivileges=yes

# Read-only view of the system; the cache (parent state, lock) is the only writable place.
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={_quote(settings.cache_dir)}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Not ProtectClock= nor PrivateDevices=: both restrict device access, and a snapshotter may read a
# block device (an LVM snapshot); /dev entries are backed up from lstat and never opened anyway.
# HTTPS to the API and S3; AF_UNIX for snapshotters talking to local databases.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
UMask=0077

# A backup should not slow the machine down.
Nice=19
CPUSchedulingPolicy=batch
IOSchedulingClass=idle
"""


def render_timer() -> str:
    return f"""\
# Written by `s3-sysbackup write-config`. Enable with: systemctl enable --now {TIMER_NAME}
[Unit]
Description=Daily s3-sysbackup run

[Timer]
OnCalendar=daily
# A run missed while the machine was off happens at the next boot.
Persistent=true
# Hosts sharing a package do not all call the API at midnight.
RandomizedDelaySec=1h
Unit={SERVICE_NAME}

[Install]
WantedBy=timers.target
"""


def write_units(systemd_dir: Path, settings: UnitSettings) -> list[Path]:
    systemd_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((SERVICE_NAME, render_service(settings)), (TIMER_NAME, render_timer())):
        path = systemd_dir / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
        written.append(path)
    return written
