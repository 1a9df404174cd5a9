"""A host's configuration directory as write-config lays it out: `conf`, pickers.d/, snapshots.d/, examples/.

`conf` follows the seed's format plus the `[api]` section hosts actually use; `[s3]` and
`[cloudformation]` are written for reference (hosts never call S3 or CloudFormation themselves).

Examples: one picker is installed live because it is what anyone expects a system backup to hold and is
harmless (/etc). Everything else goes to `examples/pickers.d/` and `examples/snapshots.d/`, outside the
directories archive runs, so nothing runs (or dumps a database) until the administrator has read it and
copied it in; and archive does not warn about them (it warns about non-executable files in snapshots.d,
which is where a forgotten chmod would otherwise lose a dump).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..config import DEFAULT_CACHE_DIR, DEFAULT_LOCK_TIMEOUT_S
from .exports import BUCKET_EXPORT, export_name
from .files import write_atomically

CREDENTIALS_FILE_NAME = "credentials"


@dataclass(frozen=True)
class HostConfig:
    package: str
    region: str
    api_endpoint: str
    bucket: str | None
    host_role_arn: str | None
    cache_dir: Path = DEFAULT_CACHE_DIR
    assume_role_arn: str | None = None  # written active: the keys then sign only through this role


def render_conf(config: HostConfig, written_at: datetime | None = None) -> str:
    stamp = (written_at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if config.assume_role_arn:
        role_line = f"role_arn = {config.assume_role_arn}"
    else:
        role_line = f"# role_arn = {config.host_role_arn or 'arn:aws:iam::ACCOUNT:role/...'}"
    bucket_line = f"bucket = {config.bucket}" if config.bucket else "# bucket ="
    return f"""\
# s3-sysbackup configuration, written by `s3-sysbackup write-config` for package {config.package}
# ({config.region}) at {stamp}. Format: Python configparser; see the project README.

[aws]
# Keys from exactly this file (relative to this directory), never from the environment.
credentials_file = {CREDENTIALS_FILE_NAME}
# profile = default
# With role_arn, those keys assume that role, the session named after the IAM user: the host role
# (short-lived credentials; its trust policy pins the name, so hosts cannot swap identities), or, on
# a recovery machine with an administrator's keys, the restore role (reads any host's backups).
{role_line}
region = {config.region}

[api]
# Hosts only ever call this API (IAM-signed); they hold no rights on the bucket.
endpoint = {config.api_endpoint}
region = {config.region}

[s3]
# For reference: the package's bucket, found from its CloudFormation export.
{bucket_line}

[cloudformation]
region = {config.region}
export = {export_name(config.package, BUCKET_EXPORT)}

[content]
# Seconds to wait for a shared lock on a file being written by another program.
lock_timeout = {DEFAULT_LOCK_TIMEOUT_S:g}
# Ask for longer retention than the stack's default (never shorter):
# days_retained = 90
# The only place the backup service writes (the systemd unit allows exactly this directory).
cache_dir = {config.cache_dir}
"""


# (relative path, content, executable)
EXAMPLE_SCRIPTS: tuple[tuple[str, str, bool], ...] = (
    (
        "pickers.d/10-etc",
        """\
#!/bin/sh
# Picker: prints absolute paths, one a line. A directory is backed up whole (other filesystems
# mounted inside it are not entered unless picked themselves). Executables here run in name order.
echo /etc
""",
        True,
    ),
    (
        "examples/pickers.d/50-home",
        """\
#!/bin/sh
# Example picker: copy it into ../../pickers.d/ to use it.
# Home directories without caches; `find` prints every file to keep, so anything can be left out.
find /home /root -xdev \\( -name .cache -o -name node_modules -o -name '*.tmp' \\) -prune \\
    -o \\( -type f -o -type l \\) -print
""",
        True,
    ),
    (
        "examples/snapshots.d/packages",
        """\
#!/bin/sh
# Example snapshotter: copy it into ../../snapshots.d/ to use it.
# Called as `packages 3`: the snapshot goes to file descriptor $1, stdout is its description, and a
# `::restore-through::` line says how to restore it (the stream on stdin).
set -eu
if command -v dpkg >/dev/null; then
    echo "Debian package selections"
    echo "::restore-through::dpkg --set-selections && apt-get dselect-upgrade"
    dpkg --get-selections >&"${1:-1}"
else
    echo "installed RPM packages"
    echo "::restore-through::xargs dnf install -y"
    rpm -qa --qf '%{NAME}\\n' >&"${1:-1}"
fi
""",
        True,
    ),
)


# The project's ready snapshotters (PostgreSQL, MySQL/MariaDB, SQLite), present in a source checkout:
# uploader/s3_sysbackup/provision/host_config.py -> uploader/examples/snapshots.d.
PROJECT_SNAPSHOTTERS = Path(__file__).resolve().parents[2] / "examples" / "snapshots.d"


def example_scripts() -> list[tuple[str, str, bool]]:
    """(relative path, text, executable): the built-in examples plus the project's snapshotters."""
    examples = list(EXAMPLE_SCRIPTS)
    if PROJECT_SNAPSHOTTERS.is_dir():
        for script in sorted(PROJECT_SNAPSHOTTERS.iterdir()):
            if script.is_file():
                text = script.read_text(encoding="utf-8")
                examples.append((f"examples/snapshots.d/{script.name}", text, True))
    return examples


def write_examples(config_dir: Path) -> list[Path]:
    """The live /etc picker and the examples that are not there yet; an admin's files are never replaced."""
    (config_dir / "snapshots.d").mkdir(parents=True, exist_ok=True)
    written = []
    for relative, text, executable in example_scripts():
        path = config_dir / relative
        if path.exists():
            continue
        write_atomically(path, text.encode("utf-8"), 0o755 if executable else 0o644)
        written.append(path)
    return written
