"""The host's configuration directory: `conf` (configparser), `pickers.d/`, `snapshots.d/`.

Every problem is reported as a `ConfigError` naming the file, the section and the key, because the
person reading it is usually fixing a config by hand on a server.
"""

from __future__ import annotations

import configparser
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/s3-sysbackup")
DEFAULT_LOCK_TIMEOUT_S = 10.0
DEFAULT_PICKER_TIMEOUT_S = 300.0
DEFAULT_SNAPSHOT_TIMEOUT_S = 3600.0

# Sections the seed documents; [s3] and [cloudformation] are accepted for compatibility but the
# uploader never talks to S3 or CloudFormation itself (hosts only call the API).
KNOWN_SECTIONS: dict[str, frozenset[str]] = {
    "aws": frozenset({"profile", "credentials_file", "role_arn", "region"}),
    "s3": frozenset({"bucket"}),
    "cloudformation": frozenset({"region", "export"}),
    "content": frozenset(
        {"lock_timeout", "days_retained", "cache_dir", "picker_timeout", "snapshot_timeout", "workers"}
    ),
    "api": frozenset({"endpoint", "region"}),
}


class ConfigError(ValueError):
    """The configuration is missing or wrong; the message says where."""


@dataclass(frozen=True)
class AwsSettings:
    profile: str | None
    credentials_file: Path | None
    role_arn: str | None
    region: str | None


@dataclass(frozen=True)
class ApiSettings:
    endpoint: str
    region: str


@dataclass(frozen=True)
class ContentSettings:
    lock_timeout_s: float
    days_retained: int | None
    cache_dir: Path
    picker_timeout_s: float
    snapshot_timeout_s: float
    workers: int


@dataclass(frozen=True)
class Config:
    config_dir: Path
    aws: AwsSettings
    api: ApiSettings
    content: ContentSettings

    @property
    def pickers_dir(self) -> Path:
        return self.config_dir / "pickers.d"

    @property
    def snapshots_dir(self) -> Path:
        return self.config_dir / "snapshots.d"


class _Reader:
    """Typed getters over one parsed `conf` file that name file/section/key in every error."""

    def __init__(self, path: Path, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser

    def where(self, section: str, key: str) -> str:
        return f"{self.path}: [{section}] {key}"

    def text(self, section: str, key: str, default: str | None = None) -> str | None:
        if not self.parser.has_option(section, key):
            return default
        value = self.parser.get(section, key).strip()
        return value or default

    def required(self, section: str, key: str) -> str:
        value = self.text(section, key)
        if value is None:
            raise ConfigError(f"{self.where(section, key)} is required")
        return value

    def number(self, section: str, key: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.text(section, key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(
                f"{self.where(section, key)} must be a number of seconds, got {raw!r}"
            ) from None
        if value < minimum or value != value:  # NaN never compares equal to itself
            raise ConfigError(f"{self.where(section, key)} must be >= {minimum:g}, got {raw!r}")
        return value

    def integer(self, section: str, key: str, default: int | None, *, minimum: int) -> int | None:
        raw = self.text(section, key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{self.where(section, key)} must be a whole number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{self.where(section, key)} must be >= {minimum}, got {raw!r}")
        return value


def load_config(config_dir: str | Path) -> Config:
    """Read and validate `<config_dir>/conf`."""
    config_dir = Path(config_dir)
    path = config_dir / "conf"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (is --config-dir right?)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except configparser.Error as error:
        raise ConfigError(f"{path}: not a valid configparser file: {error}") from None
    _warn_unknown(path, parser)
    reader = _Reader(path, parser)
    return Config(
        config_dir=config_dir,
        aws=_aws_settings(reader, config_dir),
        api=_api_settings(reader),
        content=_content_settings(reader),
    )


def _warn_unknown(path: Path, parser: configparser.ConfigParser) -> None:
    # A typo silently falling back to a default is how backups quietly change; say so loudly, but
    # do not refuse: tools that write configs (write-config, the local stack) may add settings.
    for section in parser.sections():
        known = KNOWN_SECTIONS.get(section)
        if known is None:
            logger.warning("%s: unknown section [%s] ignored", path, section)
            continue
        for key in parser.options(section):
            if key not in known:
                logger.warning("%s: [%s] %s is not a known setting, ignored", path, section, key)


def _aws_settings(reader: _Reader, config_dir: Path) -> AwsSettings:
    credentials_file = reader.text("aws", "credentials_file")
    role_arn = reader.text("aws", "role_arn")
    if role_arn is not None and credentials_file is None:
        raise ConfigError(f"{reader.where('aws', 'role_arn')} is only used together with credentials_file")
    if role_arn is not None and not role_arn.startswith("arn:"):
        raise ConfigError(f"{reader.where('aws', 'role_arn')} must be an ARN, got {role_arn!r}")
    credentials_path = None
    if credentials_file is not None:
        # Relative paths are relative to the config directory, so a config dir can be moved whole.
        credentials_path = (config_dir / credentials_file).resolve()
    return AwsSettings(
        profile=reader.text("aws", "profile"),
        credentials_file=credentials_path,
        role_arn=role_arn,
        region=reader.text("aws", "region"),
    )


def _api_settings(reader: _Reader) -> ApiSettings:
    endpoint = reader.required("api", "endpoint").rstrip("/")
    if not endpoint.startswith(("https://", "http://")):
        raise ConfigError(f"{reader.where('api', 'endpoint')} must be an http(s) URL, got {endpoint!r}")
    region = reader.text("api", "region") or reader.text("aws", "region")
    if region is None:
        raise ConfigError(f"{reader.where('api', 'region')} is required (the region the API is signed for)")
    return ApiSettings(endpoint=endpoint, region=region)


def _content_settings(reader: _Reader) -> ContentSettings:
    cache_dir = reader.text("content", "cache_dir")
    return ContentSettings(
        lock_timeout_s=reader.number("content", "lock_timeout", DEFAULT_LOCK_TIMEOUT_S),
        days_retained=reader.integer("content", "days_retained", None, minimum=1),
        cache_dir=Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR,
        picker_timeout_s=reader.number("content", "picker_timeout", DEFAULT_PICKER_TIMEOUT_S, minimum=0.1),
        snapshot_timeout_s=reader.number(
            "content", "snapshot_timeout", DEFAULT_SNAPSHOT_TIMEOUT_S, minimum=0.1
        ),
        workers=reader.integer("content", "workers", 4, minimum=1) or 4,
    )
