"""The local stack: SeaweedFS rights per identity, object lock, presigned uploads, queues, up/down."""

from __future__ import annotations

import base64
import configparser
import datetime as dt
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError
from sysbackup_local.stack import LocalHost, LocalStack, StackError
from test_issue3_support import api_client, build_pack, pack_registry, upload_pack


def refused(call: Callable[[], Any]) -> str:
    """The S3 error code of a call that must fail."""
    with pytest.raises(ClientError) as error:
        call()
    return str(error.value.response["Error"]["Code"])


def lock_until(days: int = 1) -> dt.datetime:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


def put_locked(stack: LocalStack, key: str, body: bytes = b"pack", mode: str = "GOVERNANCE") -> str:
    """Puts an object under lock as the upload function's identity; returns its version id."""
    s3 = stack.s3_client("UploadApiFunction")
    response = s3.put_object(
        Bucket=stack.bucket, Key=key, Body=body, ObjectLockMode=mode, ObjectLockRetainUntilDate=lock_until()
    )
    return str(response["VersionId"])


def test_the_bucket_is_versioned_with_object_lock(stack: LocalStack) -> None:
    admin = stack.s3_client("admin")

    assert admin.get_bucket_versioning(Bucket=stack.bucket)["Status"] == "Enabled"
    assert (
        admin.get_object_lock_configuration(Bucket=stack.bucket)["ObjectLockConfiguration"][
            "ObjectLockEnabled"
        ]
        == "Enabled"
    )


def test_tables_and_queues_follow_the_template(stack: LocalStack) -> None:
    dynamodb = stack.dynamodb
    for table in stack.template.tables.values():
        described = dynamodb.describe_table(TableName=table.name)["Table"]
        assert described["KeySchema"] == table.key_schema
    # The pack registry lists a host's packs through its ByHost index (GET /packs).
    registry = dynamodb.describe_table(TableName=stack.info["tables"]["BlobIndexTable"])["Table"]
    [by_host] = [index for index in registry["GlobalSecondaryIndexes"] if index["IndexName"] == "ByHost"]
    assert [key["AttributeName"] for key in by_host["KeySchema"]] == ["host", "pk"]
    sqs = stack.client("sqs")
    verify = stack.info["queues"]["VerifyQueue"]["url"]
    attributes = sqs.get_queue_attributes(QueueUrl=verify, AttributeNames=["All"])["Attributes"]
    assert (
        json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
        == (stack.info["queues"]["VerifyDeadLetterQueue"]["arn"])
    )


def test_the_host_key_is_refused_everything_by_s3(stack: LocalStack, host_config: LocalHost) -> None:
    key = f"packs/{uuid.uuid4().hex}"
    version = put_locked(stack, key)
    host = stack.s3_client(host_config.identity)
    bucket = stack.bucket

    assert refused(lambda: host.get_object(Bucket=bucket, Key=key)) == "AccessDenied"
    assert (
        refused(lambda: host.put_object(Bucket=bucket, Key=f"packs/{uuid.uuid4().hex}", Body=b"x"))
        == "AccessDenied"
    )
    assert refused(lambda: host.delete_object(Bucket=bucket, Key=key)) == "AccessDenied"
    assert refused(lambda: host.delete_object(Bucket=bucket, Key=key, VersionId=version)) == "AccessDenied"
    assert refused(lambda: host.list_objects_v2(Bucket=bucket)) == "AccessDenied"
    assert (
        refused(lambda: host.get_object_retention(Bucket=bucket, Key=key, VersionId=version))
        == "AccessDenied"
    )
    assert (
        refused(
            lambda: host.put_object_retention(
                Bucket=bucket,
                Key=key,
                VersionId=version,
                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": lock_until(2)},
            )
        )
        == "AccessDenied"
    )
    # The object is still there, untouched.
    assert stack.s3_client("UploadApiFunction").get_object(Bucket=bucket, Key=key)["Body"].read() == b"pack"


def test_the_host_key_cannot_create_s3_users(stack: LocalStack, host_config: LocalHost) -> None:
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=stack.endpoints["s3"],
        region_name="us-east-1",
        aws_access_key_id=host_config.identity.access_key,
        aws_secret_access_key=host_config.identity.secret_key,
    )

    with pytest.raises(ClientError):
        iam.create_user(UserName=f"sneaky-{uuid.uuid4().hex[:8]}")


def test_only_gc_may_bypass_governance(stack: LocalStack, host_config: LocalHost) -> None:
    others = [name for name in stack.template.functions] + ["restore", host_config.name]
    for who in others:
        key = f"packs/{uuid.uuid4().hex}"
        version = put_locked(stack, key)
        client = stack.s3_client(who)
        code = refused(
            lambda client=client, key=key, version=version: client.delete_object(
                Bucket=stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            )
        )
        assert code == "AccessDenied", who

    key = f"packs/{uuid.uuid4().hex}"
    version = put_locked(stack, key)
    gc = stack.s3_client("gc")
    assert (
        refused(lambda: gc.delete_object(Bucket=stack.bucket, Key=key, VersionId=version)) == "AccessDenied"
    )
    gc.delete_object(Bucket=stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True)
    assert refused(lambda: gc.head_object(Bucket=stack.bucket, Key=key, VersionId=version)) in (
        "404",
        "NoSuchVersion",
    )


def test_compliance_locks_hold_even_for_gc(stack: LocalStack) -> None:
    key = f"packs/{uuid.uuid4().hex}"
    version = put_locked(stack, key, mode="COMPLIANCE")
    gc = stack.s3_client("gc")

    code = refused(
        lambda: gc.delete_object(
            Bucket=stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
        )
    )

    assert code == "AccessDenied"


def test_retention_may_be_extended_but_not_shortened(stack: LocalStack) -> None:
    key = f"packs/{uuid.uuid4().hex}"
    version = put_locked(stack, key)
    s3 = stack.s3_client("UploadApiFunction")

    s3.put_object_retention(
        Bucket=stack.bucket,
        Key=key,
        VersionId=version,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": lock_until(3)},
    )
    code = refused(
        lambda: s3.put_object_retention(
            Bucket=stack.bucket,
            Key=key,
            VersionId=version,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": lock_until(2)},
        )
    )

    assert code == "AccessDenied"
    kept = s3.get_object_retention(Bucket=stack.bucket, Key=key, VersionId=version)["Retention"][
        "RetainUntilDate"
    ]
    assert kept.date() == lock_until(3).date()


def presigned_pack_put(stack: LocalStack, key: str, body: bytes) -> tuple[str, dict[str, str]]:
    """A presigned PUT pinning what the upload function pins (docs/ARCHITECTURE.md)."""
    checksum = base64.b64encode(hashlib.sha256(body).digest()).decode()
    until = lock_until()
    url = stack.s3_client("UploadApiFunction").generate_presigned_url(
        "put_object",
        Params={
            "Bucket": stack.bucket,
            "Key": key,
            "ChecksumSHA256": checksum,
            "ObjectLockMode": "GOVERNANCE",
            "ObjectLockRetainUntilDate": until,
            "IfNoneMatch": "*",
        },
        ExpiresIn=300,
    )
    headers = {
        "x-amz-checksum-sha256": checksum,
        "x-amz-object-lock-mode": "GOVERNANCE",
        "x-amz-object-lock-retain-until-date": until.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "If-None-Match": "*",
    }
    return url, headers


def test_presigned_pack_uploads_are_pinned(stack: LocalStack) -> None:
    body = b"a pack's bytes"
    key = f"packs/{hashlib.sha256(body + uuid.uuid4().bytes).hexdigest()}"
    url, headers = presigned_pack_put(stack, key, body)

    assert requests.put(url, data=b"other bytes!!!", headers=headers, timeout=30).status_code == 400
    assert (
        requests.put(
            url, data=body, headers={**headers, "x-amz-object-lock-mode": "COMPLIANCE"}, timeout=30
        ).status_code
        == 403
    )
    without_condition = {name: value for name, value in headers.items() if name != "If-None-Match"}
    assert requests.put(url, data=body, headers=without_condition, timeout=30).status_code == 403
    assert requests.put(url, data=body, headers=headers, timeout=30).status_code == 200
    assert requests.put(url, data=body, headers=headers, timeout=30).status_code == 412

    head = stack.s3_client("UploadApiFunction").head_object(
        Bucket=stack.bucket, Key=key, ChecksumMode="ENABLED"
    )
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ChecksumSHA256"] == headers["x-amz-checksum-sha256"]


def _verifier_starts(stack: LocalStack) -> int:
    log = stack.state_dir / "logs" / "VerifyPackFunction.log"
    return log.read_text().count("START RequestId") if log.exists() else 0


def test_a_landed_pack_notifies_nothing_and_a_verify_message_reaches_the_verifier(
    stack: LocalStack, host_config: LocalHost
) -> None:
    """No S3 notification any more (docs/PACK_INDEX.md): the verifier runs on VerifyQueue messages only."""
    api = api_client(stack, host_config.identity)
    blob = os.urandom(4096)
    pack = build_pack([(hashlib.sha256(blob).hexdigest(), blob)])
    stack.wait_idle(timeout=60)
    before = _verifier_starts(stack)

    upload_pack(api, pack)
    stack.wait_idle(timeout=60)
    assert _verifier_starts(stack) == before
    assert pack_registry(stack)[pack.pack_id]["state"] == "presigned"

    verify = stack.info["queues"]["VerifyQueue"]["url"]
    message = {"packs": [pack.pack_id], "source": "test_local_stack"}
    stack.client("sqs").send_message(QueueUrl=verify, MessageBody=json.dumps(message))
    stack.wait_idle(timeout=60)

    assert _verifier_starts(stack) > before
    item = pack_registry(stack)[pack.pack_id]
    assert item["state"] == "verified" and item["blob_count"] == 1, item
    attributes = stack.client("sqs").get_queue_attributes(
        QueueUrl=verify, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"


def test_add_host_refuses_bad_duplicate_and_reserved_names(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    for name in ("bad name", "-dash-first", host_config.name, "gc", "restore"):
        with pytest.raises((ValueError, StackError)):
            stack.add_host(name, tmp_path / "c")


def test_the_host_config_dir_is_complete(stack: LocalStack, host_config: LocalHost) -> None:
    conf = configparser.ConfigParser()
    conf.read(host_config.config_dir / "conf")
    credentials_path = Path(conf["aws"]["credentials_file"])

    assert stat.S_IMODE(credentials_path.stat().st_mode) == 0o600
    credentials = configparser.ConfigParser()
    credentials.read(credentials_path)
    assert credentials[conf["aws"]["profile"]]["aws_access_key_id"] == host_config.identity.access_key
    assert conf["s3"]["bucket"] == stack.bucket
    assert conf["api"]["endpoint"] == stack.endpoints["api"]
    assert int(conf["content"]["days_retained"]) > 0
    assert (host_config.config_dir / "pickers.d").is_dir()
    assert (host_config.config_dir / "snapshots.d").is_dir()


def test_invoke_runs_a_function_in_its_own_environment(stack: LocalStack, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import os\n"
        "def lambda_handler(event, context):\n"
        "    return {'pid': os.getpid(), 'key': os.environ.get('AWS_ACCESS_KEY_ID'),\n"
        "            'name': context.function_name, 'remaining': context.get_remaining_time_in_millis(),\n"
        "            'event': event}\n"
    )
    stack.register_function("EnvProbeFunction", app, [])

    result = stack.invoke("EnvProbeFunction", {"hello": "world"})

    assert result["event"] == {"hello": "world"}
    assert result["name"] == "EnvProbeFunction"
    assert result["pid"] != os.getpid()
    assert 0 < result["remaining"] <= 10_000


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "local", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _start_cli(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "s3_sysbackup.cli", "local", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _processes_of(state_dir: Path) -> list[int]:
    """Live processes started for this state dir (named on their command line or running in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except (FileNotFoundError, PermissionError, ProcessLookupError, OSError):
            continue
        if state != "Z" and (str(state_dir) in cmdline or cwd.startswith(str(state_dir))):
            found.append(int(entry.name))
    return found


def test_two_stacks_run_at_once_and_down_leaves_no_processes(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    roots = (first, second)
    up = [
        _start_cli(
            "up",
            "--state-dir",
            str(root / "state"),
            "--config-dir",
            str(root / "config"),
            "--parameter",
            f"DaysRetained={days}",
        )
        for root, days in zip(roots, (2, 3), strict=True)
    ]
    try:
        outputs = [process.communicate(timeout=180) for process in up]
        for process, (_, err) in zip(up, outputs, strict=True):
            assert process.returncode == 0, err
        statuses = [json.loads(out) for out, _ in outputs]
        for root, days in zip(roots, (2, 3), strict=True):
            conf = configparser.ConfigParser()
            conf.read(root / "config" / "conf")
            assert conf["content"]["days_retained"] == str(days)
        assert statuses[0]["endpoints"]["api"] != statuses[1]["endpoints"]["api"]
        assert statuses[0]["endpoints"]["s3"] != statuses[1]["endpoints"]["s3"]
        for root in (first, second):
            status = _cli("status", "--state-dir", str(root / "state"))
            assert status.returncode == 0, status.stderr
            assert all(json.loads(status.stdout)["processes"].values())
            assert _processes_of(root / "state")
    finally:
        for root in (first, second):
            _cli("down", "--state-dir", str(root / "state"))

    for root in (first, second):
        assert _processes_of(root / "state") == []
        # Idempotent: a second down is fine.
        assert _cli("down", "--state-dir", str(root / "state")).returncode == 0


def test_a_handler_running_past_its_timeout_is_stopped(stack: LocalStack, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import time\n"
        "def lambda_handler(event, context):\n"
        "    time.sleep(event['sleep'])\n"
        "    return 'done'\n"
    )
    stack.register_function("SleepyFunction", app, [], timeout_seconds=1, instances=1)

    with pytest.raises(StackError, match="Task timed out after 1"):
        stack.invoke("SleepyFunction", {"sleep": 5})
    # The worker survives and serves the next invocation.
    assert stack.invoke("SleepyFunction", {"sleep": 0}) == "done"


def test_cli_invoke_runs_a_template_function_with_its_first_event(stack: LocalStack) -> None:
    result = _cli("invoke", "verify_pack", "--state-dir", str(stack.state_dir))

    assert result.returncode == 0, result.stderr
    assert "batchItemFailures" in json.loads(result.stdout)


def test_cli_add_host_and_status(stack: LocalStack, tmp_path: Path) -> None:
    name = f"cli-host-{uuid.uuid4().hex[:6]}"

    added = _cli("add-host", name, "--state-dir", str(stack.state_dir), "--config-dir", str(tmp_path / "c"))
    status = _cli("status", "--state-dir", str(stack.state_dir))

    assert added.returncode == 0, added.stderr
    assert (tmp_path / "c" / "conf").exists()
    assert name in json.loads(status.stdout)["hosts"]
    assert stack.identity(name).principal_arn.endswith(f"/hosts/{name}")


def test_down_ends_the_workers_even_when_the_daemon_died(tmp_path: Path) -> None:
    stack = LocalStack.start(tmp_path / "state", tmp_path / "config")
    try:
        workers = stack.daemon_status()["workers"]
        os.kill(stack.info["pids"]["supervisor"], signal.SIGKILL)
        # Workers outlive their daemon until `down`.
        orphans = _processes_of(stack.state_dir)
        assert len(orphans) >= sum(len(ports) for ports in workers.values()) + 2  # + weed + moto
    finally:
        stack.stop()

    assert _processes_of(stack.state_dir) == []


def test_an_expired_presigned_url_is_refused(stack: LocalStack) -> None:
    body = b"late pack"
    key = f"packs/{uuid.uuid4().hex}"
    url = stack.s3_client("UploadApiFunction").generate_presigned_url(
        "put_object", Params={"Bucket": stack.bucket, "Key": key}, ExpiresIn=1
    )
    time.sleep(2.5)

    response = requests.put(url, data=body, timeout=30)

    assert response.status_code == 403
    assert "expired" in response.text


def test_up_after_down_in_the_same_state_dir_starts_fresh(tmp_path: Path) -> None:
    first = LocalStack.start(tmp_path / "state", tmp_path / "config")
    first_host_key = first.identity("local-host").access_key
    try:
        first.s3_client("UploadApiFunction").put_object(Bucket=first.bucket, Key="packs/old", Body=b"old")
    finally:
        first.stop()

    second = LocalStack.start(tmp_path / "state", tmp_path / "config")
    try:
        listing = second.s3_client("UploadApiFunction").list_objects_v2(Bucket=second.bucket)
        assert listing.get("KeyCount", 0) == 0
        assert second.identity("local-host").access_key != first_host_key
    finally:
        second.stop()


def test_invocations_of_one_function_run_concurrently(stack: LocalStack, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import os, time\ndef lambda_handler(event, context):\n    time.sleep(1)\n    return os.getpid()\n"
    )
    stack.register_function("ConcurrentFunction", app, [], instances=2)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        pids = list(pool.map(lambda _: stack.invoke("ConcurrentFunction", {}), range(2)))
    elapsed = time.monotonic() - started

    assert len(set(pids)) == 2, "two execution environments"
    assert elapsed < 1.9


def test_cli_errors_are_one_line_messages(stack: LocalStack, tmp_path: Path) -> None:
    unknown_function = _cli("invoke", "no_such_function", "--state-dir", str(stack.state_dir))
    no_stack = _cli("status", "--state-dir", str(tmp_path / "nothing-here"))

    assert unknown_function.returncode == 2
    assert "no function 'no_such_function'" in unknown_function.stderr
    assert "Traceback" not in unknown_function.stderr
    assert no_stack.returncode == 2
    assert "no stack in" in no_stack.stderr
