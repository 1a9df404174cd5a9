"""Settings: read from the environment, validated, with a message naming the bad variable."""

from __future__ import annotations

import pytest
from sysbackup_backend.errors import SettingsError
from sysbackup_backend.settings import load_settings

BASE = {"BUCKET_NAME": "b", "BLOB_INDEX_TABLE": "i", "MANIFEST_TABLE": "m", "JOBS_TABLE": "j"}


def test_defaults_and_parsing() -> None:
    settings = load_settings(
        {
            **BASE,
            "LOCK_MODE": "compliance",
            "DAYS_RETAINED": "7",
            "RESTORE_PRINCIPAL_ARNS": " arn:aws:iam::1:role/a , ,arn:aws:iam::1:role/b",
        }
    )
    assert settings.retention.lock_mode == "COMPLIANCE"
    assert (settings.retention.days_retained, settings.retention.max_days_retained) == (7, 3650)
    assert settings.restore_principal_arns == {"arn:aws:iam::1:role/a", "arn:aws:iam::1:role/b"}
    assert settings.upload_url_expiry_seconds == 900


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({**BASE, "BUCKET_NAME": ""}, "BUCKET_NAME"),
        ({key: value for key, value in BASE.items() if key != "JOBS_TABLE"}, "JOBS_TABLE"),
        ({**BASE, "LOCK_MODE": "FOREVER"}, "LOCK_MODE"),
        ({**BASE, "DAYS_RETAINED": "thirty"}, "DAYS_RETAINED"),
        ({**BASE, "DAYS_RETAINED": "-1"}, "DAYS_RETAINED"),
        ({**BASE, "DAYS_RETAINED": "40", "MAX_DAYS_RETAINED": "30"}, "MAX_DAYS_RETAINED"),
        ({**BASE, "UPLOAD_URL_EXPIRY_SECONDS": "0"}, "UPLOAD_URL_EXPIRY_SECONDS"),
        ({**BASE, "RESTORE_PRINCIPAL_ARNS": "restore-role"}, "RESTORE_PRINCIPAL_ARNS"),
    ],
)
def test_bad_environment_is_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(env)
