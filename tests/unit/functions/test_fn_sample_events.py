"""The sample events in events/ (what `sam local invoke` and the docs use) run through the handlers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sysbackup_backend import api, settings
from sysbackup_testkit import FakeLambdaContext, load_function, response_json

EVENTS = Path(__file__).resolve().parents[3] / "events"

# event file -> (function, expected status)
API_EVENTS = {
    "upload_api-packs-presign.json": ("upload_api", 200),
    "manifest_api-manifests-create.json": ("manifest_api", 409),  # its parent is not this host's head
    "manifest_api-manifests-get.json": ("manifest_api", 404),
    "manifest_api-manifests-list.json": ("manifest_api", 200),
    "manifest_api-manifests-list-restore-role.json": ("manifest_api", 200),
    "manifest_api-jobs-get.json": ("manifest_api", 404),
    "restore_api-downloads.json": ("restore_api", 200),
    "restore_api-downloads-restore-role.json": ("restore_api", 200),
    "restore_api-packs-list.json": ("restore_api", 200),
    "restore_api-packs-list-restore-role.json": ("restore_api", 200),
}


@pytest.fixture
def template_restore_role(backend: api.Services, monkeypatch: pytest.MonkeyPatch) -> None:
    # The samples' restore sessions belong to the template's role name, "<package>-restore".
    monkeypatch.setenv("RESTORE_PRINCIPAL_ARNS", "arn:aws:iam::123456789012:role/s3-sysbackup-restore")
    settings.get_settings.cache_clear()
    api.services.cache_clear()


@pytest.mark.parametrize("name", sorted(API_EVENTS))
def test_sample_api_event(name: str, template_restore_role: None) -> None:
    function, expected_status = API_EVENTS[name]
    event = json.loads((EVENTS / name).read_text())
    response = load_function(function).lambda_handler(event, FakeLambdaContext())
    assert response["statusCode"] == expected_status, response_json(response)


def test_every_api_sample_is_run() -> None:
    api_samples = {path.name for path in EVENTS.glob("*.json") if '"routeKey"' in path.read_text()}
    assert api_samples == set(API_EVENTS)


@pytest.mark.parametrize("name", ["verify_pack-verify-requested.json"])
def test_sample_sqs_event(name: str, backend: Any) -> None:
    event = json.loads((EVENTS / name).read_text())
    # The sample names packs that have no registry item here: nothing to verify, nothing to retry.
    assert load_function("verify_pack").lambda_handler(event, FakeLambdaContext()) == {
        "batchItemFailures": []
    }
