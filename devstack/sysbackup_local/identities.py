"""Who exists in the local stack: access keys, their secrets, their S3 rights and their API principal.

The registry lives in `S/identities.json` so the CLI, the test process and the stack's daemon share it;
`add-host` appends to it and the API gateway re-reads it when it changes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .template import ACCOUNT_ID

DEFAULT_HOST = "local-host"  # the first host `local up` makes

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

KIND_ADMIN = "admin"
KIND_FUNCTION = "function"
KIND_GC = "gc"
KIND_RESTORE = "restore"
KIND_HOST = "host"

# Template roles whose functions run as a shared service identity rather than their own.
ROLE_IDENTITY_KINDS = {"GcRole": KIND_GC}

# SeaweedFS identity actions (see docs/LOCAL_STACK.md: only these coarse names are recognised).
FUNCTION_ACTIONS = ("Read", "Write", "List", "Tagging", "PutObjectRetention", "GetObjectRetention")
GC_EXTRA_ACTIONS = ("BypassGovernanceRetention",)


@dataclass(frozen=True)
class Identity:
    name: str  # host name, function logical id, "gc", "restore" or "admin"
    kind: str
    access_key: str
    secret_key: str
    principal_arn: str | None  # what the API gateway puts in requestContext.authorizer.iam.userArn

    def seaweed_actions(self, bucket: str) -> list[str]:
        if self.kind == KIND_ADMIN:
            return ["Admin", "Read", "Write", "List", "Tagging"]
        if self.kind == KIND_FUNCTION:
            return [f"{action}:{bucket}" for action in FUNCTION_ACTIONS]
        if self.kind == KIND_GC:
            return [f"{action}:{bucket}" for action in FUNCTION_ACTIONS + GC_EXTRA_ACTIONS]
        return []  # hosts and the restore principal hold nothing on the bucket


def host_principal_arn(host: str) -> str:
    return f"arn:aws:iam::{ACCOUNT_ID}:user/s3-sysbackup/hosts/{host}"


def restore_principal_arn(role_name: str) -> str:
    return f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role_name}/admin"


def validate_host_name(name: str) -> str:
    if not HOST_NAME.match(name):
        raise ValueError(f"host name {name!r} must match {HOST_NAME.pattern}")
    return name


def new_access_key(prefix: str) -> str:
    # AWS keys are 20 upper-case characters; a recognisable prefix helps reading logs.
    return (prefix + secrets.token_hex(10).upper())[:20]


def new_identity(name: str, kind: str, principal_arn: str | None = None) -> Identity:
    prefix = {
        KIND_HOST: "AKIAHOST",
        KIND_FUNCTION: "AKIAFUNC",
        KIND_GC: "AKIAGC",
        KIND_RESTORE: "AKIARESTORE",
    }
    return Identity(
        name=name,
        kind=kind,
        access_key=new_access_key(prefix.get(kind, "AKIALOCAL")),
        secret_key=secrets.token_urlsafe(30),
        principal_arn=principal_arn,
    )


class IdentityRegistry:
    """identities.json, read and written under an advisory lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached_mtime: int | None = None
        self._cached: list[Identity] = []

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_suffix(".lock")
        with lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _read(self) -> list[Identity]:
        if not self.path.exists():
            return []
        return [Identity(**item) for item in json.loads(self.path.read_text())["identities"]]

    def _write(self, identities: list[Identity]) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"identities": [asdict(item) for item in identities]}, indent=2))
        os.chmod(temporary, 0o600)
        temporary.replace(self.path)

    def all(self) -> list[Identity]:
        """Current identities; re-read only when the file changed (the gateway calls this per request)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime != self._cached_mtime:
            with self._locked():
                self._cached = self._read()
                self._cached_mtime = mtime
        return list(self._cached)

    def add(self, identity: Identity) -> Identity:
        with self._locked():
            identities = self._read()
            if any(item.name == identity.name and item.kind == identity.kind for item in identities):
                raise ValueError(f"{identity.kind} {identity.name!r} already exists")
            identities.append(identity)
            self._write(identities)
        return identity

    def by_access_key(self, access_key: str) -> Identity | None:
        return next((item for item in self.all() if item.access_key == access_key), None)

    def get(self, kind: str, name: str | None = None) -> Identity:
        for item in self.all():
            if item.kind == kind and (name is None or item.name == name):
                return item
        raise KeyError(f"no {kind} identity {name or ''}".strip())
