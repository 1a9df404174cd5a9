"""Settings of every function, read once from the environment and validated."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from sysbackup_domain.retention import LOCK_MODES, RetentionPolicy

from .errors import SettingsError

DEFAULT_UPLOAD_URL_EXPIRY_SECONDS = 900
# Downloads are fetched right after the call; a short life limits what a leaked URL exposes.
DEFAULT_DOWNLOAD_URL_EXPIRY_SECONDS = 300
# How far past the need a pack lock goes (template parameter FoldWindowSeconds): see sysbackup_domain.keep.
DEFAULT_FOLD_WINDOW_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Settings:
    bucket_name: str
    blob_index_table: str
    manifest_table: str
    jobs_table: str
    retention: RetentionPolicy
    upload_url_expiry_seconds: int
    download_url_expiry_seconds: int
    restore_principal_arns: frozenset[str]
    # A presigned pack is locked this far past the default retain_until, so the commit that follows
    # (within the window) finds its lock sufficient and asks the extender nothing.
    fold_window: timedelta = timedelta(seconds=DEFAULT_FOLD_WINDOW_SECONDS)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(f"environment variable {name} is required")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        if default is None:
            raise SettingsError(f"environment variable {name} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"environment variable {name} must be positive, got {value}")
    return value


def non_negative_int(env: Mapping[str, str], name: str, default: int) -> int:
    """An integer >= 0 from the environment, default when unset or blank; SettingsError otherwise."""
    raw = str(env.get(name, "")).strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"environment variable {name} must not be negative, got {value}")
    return value


def _non_negative_seconds(env: Mapping[str, str], name: str, default: int) -> timedelta:
    return timedelta(seconds=non_negative_int(env, name, default))


def _test_retention_seconds(env: Mapping[str, str]) -> int | None:
    """RETENTION_SECONDS (tests only): "0" (the template default) or unset means days_retained days."""
    if env.get("RETENTION_SECONDS", "").strip() in ("", "0"):
        return None
    return _positive_int(env, "RETENTION_SECONDS")


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; SettingsError names the first bad variable."""
    lock_mode = env.get("LOCK_MODE", "GOVERNANCE").strip().upper()
    if lock_mode not in LOCK_MODES:
        raise SettingsError(f"environment variable LOCK_MODE must be one of {LOCK_MODES}, got {lock_mode!r}")
    days_retained = _positive_int(env, "DAYS_RETAINED", 30)
    max_days_retained = _positive_int(env, "MAX_DAYS_RETAINED", 3650)
    if max_days_retained < days_retained:
        raise SettingsError(
            f"MAX_DAYS_RETAINED ({max_days_retained}) must not be below DAYS_RETAINED ({days_retained})"
        )
    restore_arns = frozenset(
        arn.strip() for arn in env.get("RESTORE_PRINCIPAL_ARNS", "").split(",") if arn.strip()
    )
    for arn in restore_arns:
        if not arn.startswith("arn:"):
            raise SettingsError(f"RESTORE_PRINCIPAL_ARNS holds something that is not an ARN: {arn!r}")
    return Settings(
        bucket_name=_required(env, "BUCKET_NAME"),
        blob_index_table=_required(env, "BLOB_INDEX_TABLE"),
        manifest_table=_required(env, "MANIFEST_TABLE"),
        jobs_table=_required(env, "JOBS_TABLE"),
        retention=RetentionPolicy(
            days_retained=days_retained,
            max_days_retained=max_days_retained,
            lock_mode=lock_mode,
            retention_seconds=_test_retention_seconds(env),
        ),
        upload_url_expiry_seconds=_positive_int(
            env, "UPLOAD_URL_EXPIRY_SECONDS", DEFAULT_UPLOAD_URL_EXPIRY_SECONDS
        ),
        download_url_expiry_seconds=_positive_int(
            env, "DOWNLOAD_URL_EXPIRY_SECONDS", DEFAULT_DOWNLOAD_URL_EXPIRY_SECONDS
        ),
        restore_principal_arns=restore_arns,
        fold_window=_non_negative_seconds(env, "FOLD_WINDOW_SECONDS", DEFAULT_FOLD_WINDOW_SECONDS),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (Lambda reuses the process across invocations)."""
    return load_settings(os.environ)
