"""The function worker's Lambda-like behaviour, in-process."""

from __future__ import annotations

import decimal
import pstats
from pathlib import Path

import pytest
from sysbackup_local.worker import (
    MAX_RESPONSE_BYTES,
    PROFILE_DIR_ENV,
    FunctionRuntime,
    InvocationTimeout,
    ResponsePayloadError,
    check_response_payload,
)


def test_results_lambda_could_not_return_are_errors() -> None:
    check_response_payload({"ok": [1, "two", None]})
    with pytest.raises(ResponsePayloadError, match="MarshalError"):
        check_response_payload({"count": decimal.Decimal("1")})
    with pytest.raises(ResponsePayloadError, match="ResponseSizeTooLarge"):
        check_response_payload("x" * MAX_RESPONSE_BYTES)


def test_the_handler_gets_a_context_and_keeps_its_module_between_calls(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "CALLS = []\n"
        "def lambda_handler(event, context):\n"
        "    CALLS.append(event)\n"
        "    return {'calls': len(CALLS), 'id': context.aws_request_id, 'name': context.function_name,\n"
        "            'memory': context.memory_limit_in_mb, 'arn': context.invoked_function_arn,\n"
        "            'left': context.get_remaining_time_in_millis()}\n"
    )
    runtime = FunctionRuntime("ProbeFunction", app, "app.lambda_handler", memory_mb=256, timeout=5)

    first = runtime.invoke({"n": 1}, "req-1")
    second = runtime.invoke({"n": 2}, "req-2")

    assert (first["calls"], second["calls"]) == (1, 2)
    assert second["id"] == "req-2"
    assert second["name"] == "ProbeFunction"
    assert second["memory"] == 256
    assert second["arn"].endswith(":function:ProbeFunction")
    assert 0 < second["left"] <= 5000


def test_a_handler_past_its_timeout_is_interrupted(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import time\ndef lambda_handler(event, context):\n    time.sleep(5)\n")
    runtime = FunctionRuntime("Slow", app, "app.lambda_handler", memory_mb=128, timeout=1)

    with pytest.raises(InvocationTimeout, match=r"Task timed out after 1\.00 seconds"):
        runtime.invoke({}, "req")


def test_a_missing_app_fails_each_invocation_until_it_exists(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    runtime = FunctionRuntime("Later", app, "app.lambda_handler", memory_mb=128, timeout=2)

    with pytest.raises(FileNotFoundError):
        runtime.invoke({}, "req")
    app.write_text("def lambda_handler(event, context):\n    return 'here'\n")

    assert runtime.invoke({}, "req") == "here"


def test_with_a_profile_dir_each_invocation_leaves_its_profile(tmp_path: Path, monkeypatch) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "def busy():\n    return sum(range(1000))\n\ndef lambda_handler(event, context):\n    return busy()\n"
    )
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "profiles"))
    runtime = FunctionRuntime("Profiled", app, "app.lambda_handler", memory_mb=128, timeout=5)

    assert runtime.invoke({}, "req-1") == sum(range(1000))

    profile = tmp_path / "profiles" / "Profiled-req-1.prof"
    called = {name for _, _, name in pstats.Stats(str(profile)).stats}  # type: ignore[attr-defined]
    assert "busy" in called
