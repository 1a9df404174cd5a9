"""`LocalStack`: starts, describes and stops one local stack (see docs/LOCAL_STACK.md)."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .identities import (
    DEFAULT_HOST,
    KIND_ADMIN,
    KIND_FUNCTION,
    KIND_GC,
    KIND_HOST,
    KIND_RESTORE,
    Identity,
    IdentityRegistry,
    host_principal_arn,
    new_identity,
    restore_principal_arn,
    validate_host_name,
)
from .ports import NotReady, free_port, wait_for_http
from .template import ACCOUNT_ID, REGION, StackTemplate, parse_template

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 90.0
PORT_NAMES = (
    "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
    "moto", "metrics",
)  # fmt: skip
# Processes the stack starts directly; each leads its own process group.
PROCESS_MARKERS = {"weed": "weed", "moto": "moto_server", "supervisor": "sysbackup_local.supervisor"}


@dataclass(frozen=True)
class LocalHost:
    """A host of the local stack: its name, its config directory and its identity."""

    name: str
    config_dir: Path
    identity: Identity


class StackError(RuntimeError):
    """The stack cannot start, is not running, or was asked something it cannot do."""


def _venv_tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} not found next to {sys.executable} or on PATH (install the `local` extra)")
    return found


def _process_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and is still the process we started (its command line names `marker`)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z" and marker in cmdline


def _stop_process_group(pid: int, marker: str, grace: float = 8.0) -> None:
    # The leader may be gone while its group lives on (a crashed daemon's workers): signal the group anyway.
    if not _process_alive(pid, marker) and not _group_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _process_alive(pid, marker) and not _group_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class LocalStack:
    """A running local stack, described by `S/stack.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        path = self.state_dir / "stack.json"
        if not path.exists():
            raise StackError(f"no stack in {self.state_dir} (run `s3-sysbackup local up` first)")
        self.info: dict[str, Any] = json.loads(path.read_text())
        self.registry = IdentityRegistry(self.state_dir / "identities.json")
        self.template: StackTemplate = parse_template(
            Path(self.info["template"]), self.info.get("parameters")
        )

    # ------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        state_dir: Path,
        config_dir: Path,
        host: str = DEFAULT_HOST,
        template_path: Path | None = None,
        repo: Path = REPO_ROOT,
        parameters: dict[str, str] | None = None,
        concurrency: int = 2,
    ) -> LocalStack:
        """Starts a stack; `parameters` override template parameter defaults (e.g. {"DaysRetained": "1"});
        `concurrency` is how many invocations of one function may run at once (worker processes each)."""
        if concurrency < 1:
            raise StackError("concurrency must be at least 1")
        state_dir = Path(state_dir).resolve()
        validate_host_name(host)
        if (state_dir / "stack.json").exists() and LocalStack(state_dir).is_running():
            raise StackError(f"a stack already runs from {state_dir}; `local down` it first")
        # Every `up` starts empty: moto keeps nothing, so SeaweedFS must not either.
        for stale in ("stack.json", "identities.json", "supervisor.ready", "supervisor.failed"):
            (state_dir / stale).unlink(missing_ok=True)
        for stale_dir in ("weed-data", "run"):
            shutil.rmtree(state_dir / stale_dir, ignore_errors=True)
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        template_path = (template_path or repo / "template.yaml").resolve()
        template = parse_template(template_path, parameters)
        registry = IdentityRegistry(state_dir / "identities.json")
        identities = _create_service_identities(registry, template)
        info: dict[str, Any] = {
            "version": 1,
            "state_dir": str(state_dir),
            "repo": str(repo),
            "template": str(template_path),
            "parameters": dict(parameters or {}),
            "concurrency": concurrency,
            "weed": _venv_tool("weed"),
            "ports": {},
            "pids": {},
            "bucket": template.bucket.name,
            "endpoints": {},
            # Keys and secrets of every identity (0600); hosts are appended by add-host.
            "identities_file": str(registry.path),
        }
        (state_dir / "aws-config").write_text("[default]\ns3 =\n    addressing_style = path\n")
        try:
            _write_seaweed_identities(state_dir / "seaweed-identities.json", identities, template.bucket.name)
            _start_storage(state_dir, info)
            stack = cls(state_dir)
            stack._provision()
            info = stack.info
            info["pids"]["supervisor"] = _start_supervisor(state_dir).pid
            _write_json(state_dir / "stack.json", info)
            stack.info = info
            stack._wait_for_supervisor()
            stack.add_host(host, config_dir)
        except BaseException:
            LocalStack._stop_pids(info.get("pids", {}))
            raise
        return stack

    def _admin_s3(self) -> Any:
        return self.s3_client(self.registry.get(KIND_ADMIN))

    def _provision(self) -> None:
        """Creates what template.yaml declares: the lock bucket, the tables, the queues."""
        bucket = self.template.bucket
        s3 = self._admin_s3()
        _retry(lambda: s3.create_bucket(Bucket=bucket.name, ObjectLockEnabledForBucket=bucket.object_lock))
        if bucket.object_lock:
            s3.put_bucket_versioning(Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"})
        if bucket.default_lock_mode and bucket.default_lock_days:
            s3.put_object_lock_configuration(
                Bucket=bucket.name,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {
                        "DefaultRetention": {
                            "Mode": bucket.default_lock_mode,
                            "Days": bucket.default_lock_days,
                        }
                    },
                },
            )
        dynamodb = self.dynamodb
        for table in self.template.tables.values():
            indexes = (
                {"GlobalSecondaryIndexes": table.global_secondary_indexes}
                if table.global_secondary_indexes
                else {}
            )
            dynamodb.create_table(
                TableName=table.name,
                KeySchema=table.key_schema,
                AttributeDefinitions=table.attribute_definitions,
                BillingMode="PAY_PER_REQUEST",
                **indexes,
            )
            if table.ttl_attribute:
                dynamodb.update_time_to_live(
                    TableName=table.name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": table.ttl_attribute},
                )
        sqs = self.client("sqs")
        queues: dict[str, dict[str, str]] = {}
        # Dead-letter queues first: a redrive policy names its target's ARN.
        ordered = sorted(
            self.template.queues.values(), key=lambda queue: queue.dead_letter_logical_id is not None
        )
        for queue in ordered:
            attributes = {"VisibilityTimeout": str(queue.visibility_timeout)}
            if queue.dead_letter_logical_id:
                attributes["RedrivePolicy"] = json.dumps(
                    {
                        "deadLetterTargetArn": queues[queue.dead_letter_logical_id]["arn"],
                        "maxReceiveCount": str(queue.max_receive_count),
                    }
                )
            url = sqs.create_queue(QueueName=queue.name, Attributes=attributes)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            queues[queue.logical_id] = {"name": queue.name, "url": url, "arn": arn}
        self.info["queues"] = queues
        self.info["tables"] = {table.logical_id: table.name for table in self.template.tables.values()}
        _write_json(self.state_dir / "stack.json", self.info)

    def _wait_for_supervisor(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pid = self.info["pids"]["supervisor"]
        while time.monotonic() < deadline:
            ready_file = self.state_dir / "supervisor.ready"
            if ready_file.exists():
                ready = json.loads(ready_file.read_text())
                for name in ("api", "control"):
                    self.info["ports"][name] = ready[name]
                    self.info["endpoints"][name] = f"http://127.0.0.1:{ready[name]}"
                _write_json(self.state_dir / "stack.json", self.info)
                wait_for_http(self.endpoints["control"] + "/", timeout=10)
                return
            if (self.state_dir / "supervisor.failed").exists() or not _process_alive(
                pid, PROCESS_MARKERS["supervisor"]
            ):
                raise StackError(
                    f"the stack's daemon failed; see {self.state_dir / 'logs' / 'supervisor.log'}"
                )
            time.sleep(0.1)
        raise StackError("the stack's daemon did not come up in time")

    # ------------------------------------------------------------------ stop
    @staticmethod
    def _stop_pids(pids: dict[str, int]) -> None:
        # The daemon first: its workers and pollers talk to SeaweedFS and moto until they end.
        for name in ("supervisor", "weed", "moto"):
            if name in pids:
                _stop_process_group(int(pids[name]), PROCESS_MARKERS[name])

    def stop(self) -> None:
        """Ends every process of this stack; safe to call again."""
        LocalStack._stop_pids(self.info.get("pids", {}))
        self.info["stopped"] = True
        _write_json(self.state_dir / "stack.json", self.info)

    def is_running(self) -> bool:
        pids = self.info.get("pids", {})
        return any(_process_alive(int(pid), PROCESS_MARKERS[name]) for name, pid in pids.items())

    def processes(self) -> dict[str, bool]:
        return {
            name: _process_alive(int(pid), PROCESS_MARKERS[name])
            for name, pid in self.info.get("pids", {}).items()
        }

    # ------------------------------------------------------------------ hosts
    def add_host(self, name: str, config_dir: Path) -> Identity:
        """A new host: a SeaweedFS user with no rights, an API principal, and its config directory."""
        validate_host_name(name)
        if name in (KIND_RESTORE, KIND_GC, KIND_ADMIN):
            raise StackError(f"{name!r} names a service identity; choose another host name")
        if any(item.kind == KIND_HOST and item.name == name for item in self.registry.all()):
            raise StackError(f"host {name!r} already exists in this stack")
        iam = boto3.client("iam", **self._client_kwargs(self.endpoints["s3"], self.registry.get(KIND_ADMIN)))
        user_name = f"host-{name}"
        iam.create_user(UserName=user_name)
        key = iam.create_access_key(UserName=user_name)["AccessKey"]
        identity = Identity(
            name=name,
            kind=KIND_HOST,
            access_key=key["AccessKeyId"],
            secret_key=key["SecretAccessKey"],
            principal_arn=host_principal_arn(name),
        )
        self.registry.add(identity)
        write_host_config(Path(config_dir), identity, self)
        return identity

    # ------------------------------------------------------------------ clients
    @property
    def endpoints(self) -> dict[str, str]:
        return dict(self.info["endpoints"])

    @property
    def bucket(self) -> str:
        return str(self.info["bucket"])

    def identity(self, who: str) -> Identity:
        """`restore`, `gc`, `admin`, a function (logical id or folder) or a host name."""
        if who in (KIND_RESTORE, KIND_GC, KIND_ADMIN):
            return self.registry.get(who)
        for item in self.registry.all():
            if item.kind == KIND_HOST and item.name == who:
                return item
        return self.registry.get(KIND_FUNCTION, self.template.function(who).logical_id)

    def credentials(self, who: str) -> dict[str, str]:
        identity = self.identity(who)
        return {"aws_access_key_id": identity.access_key, "aws_secret_access_key": identity.secret_key}

    @staticmethod
    def _client_kwargs(endpoint: str, identity: Identity | None) -> dict[str, Any]:
        return {
            "endpoint_url": endpoint,
            "region_name": REGION,
            "aws_access_key_id": identity.access_key if identity else "local",
            "aws_secret_access_key": identity.secret_key if identity else "local",
            "config": Config(
                signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 2}
            ),
        }

    def s3_client(self, who: str | Identity) -> Any:
        identity = who if isinstance(who, Identity) else self.identity(who)
        return boto3.client("s3", **self._client_kwargs(self.endpoints["s3"], identity))

    def client(self, service: str) -> Any:
        """A moto-backed client (DynamoDB, SQS, SNS, EventBridge, Glacier); moto takes any key."""
        return boto3.client(service, **self._client_kwargs(self.endpoints["moto"], None))

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    # ------------------------------------------------------------------ daemon
    def _control(self, path: str, payload: Any, timeout: float = 120) -> Any:
        request = urllib.request.Request(
            self.endpoints["control"] + path,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def daemon_status(self) -> dict[str, Any]:
        """What the daemon runs: worker ports, served routes, the metadata tail's pid."""
        with urllib.request.urlopen(self.endpoints["control"] + "/", timeout=30) as response:
            return dict(json.loads(response.read()))

    def invoke(self, function: str, event: dict[str, Any]) -> Any:
        """Runs a function's handler in its worker; returns its result or raises with its error."""
        name = (
            function if function in self._extra_functions() else self.template.function(function).logical_id
        )
        answer = self._control(f"/invoke/{name}", event, timeout=960)
        if answer.get("error"):
            error = answer["error"]
            raise StackError(f"{name} failed: {error.get('errorType')}: {error.get('errorMessage')}")
        return answer.get("result")

    def _extra_functions(self) -> set[str]:
        return set(self.info.get("extra_functions", []))

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every queue a function is triggered by is empty and no function is still handling a batch."""
        if not self._control("/idle", {"timeout": timeout}, timeout=timeout + 10).get("idle"):
            raise StackError(f"the stack was still busy after {timeout:.0f}s")

    @contextlib.contextmanager
    def deliveries_held(self) -> Iterator[None]:
        """SQS-triggered functions (verifier, lock extender) do not run inside the block; messages wait in
        their queues and are delivered after it, as if the event source mappings were disabled meanwhile."""
        self._control("/deliveries", {"hold": True})
        try:
            yield
        finally:
            self._control("/deliveries", {"hold": False})

    def register_function(
        self,
        name: str,
        app: Path,
        routes: list[tuple[str, str]],
        environment: dict[str, str] | None = None,
        timeout_seconds: int = 10,
        instances: int | None = None,
    ) -> None:
        """Runs an extra function (tests: an echo route); not part of template.yaml.

        `instances` worker processes (default: the stack's concurrency) serve its invocations."""
        self._control(
            "/functions",
            {
                "name": name,
                "app": str(Path(app).resolve()),
                "routes": [{"method": method, "path": path} for method, path in routes],
                "environment": environment or {},
                "timeout": timeout_seconds,
                "instances": instances or int(self.info.get("concurrency", 1)),
            },
        )
        self.info.setdefault("extra_functions", []).append(name)
        _write_json(self.state_dir / "stack.json", self.info)

    def status(self) -> dict[str, Any]:
        """What runs where: processes, endpoints, resources, identities (secrets stay in identities.json)."""
        try:
            workers = self.daemon_status()["workers"] if self.is_running() else {}
        except OSError:
            workers = {}
        return {
            "workers": {
                name: [f"http://127.0.0.1:{port}" for port in ports] for name, ports in workers.items()
            },
            "identities": [
                {
                    "name": item.name,
                    "kind": item.kind,
                    "access_key": item.access_key,
                    "principal": item.principal_arn,
                }
                for item in self.registry.all()
            ],
            "state_dir": str(self.state_dir),
            "processes": self.processes(),
            "endpoints": self.endpoints,
            "bucket": self.bucket,
            "tables": self.info.get("tables", {}),
            "queues": {name: queue["url"] for name, queue in self.info.get("queues", {}).items()},
            "hosts": [item.name for item in self.registry.all() if item.kind == KIND_HOST],
            "state_files": {
                "stack": str(self.state_dir / "stack.json"),
                "logs": str(self.state_dir / "logs"),
            },
        }


def _retry(action: Any, attempts: int = 50, delay: float = 0.2) -> Any:
    """SeaweedFS answers HTTP before its filer and volume are ready for writes; retry briefly."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
    return None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.chmod(temporary, 0o600)
    temporary.replace(path)


def _create_service_identities(registry: IdentityRegistry, template: StackTemplate) -> list[Identity]:
    identities = [
        registry.add(new_identity(KIND_ADMIN, KIND_ADMIN)),
        registry.add(new_identity(KIND_GC, KIND_GC)),
        registry.add(
            replace(
                new_identity(KIND_RESTORE, KIND_RESTORE),
                principal_arn=restore_principal_arn(template.restore_role_name),
            )
        ),
    ]
    for function in template.functions.values():
        identities.append(registry.add(new_identity(function.logical_id, KIND_FUNCTION)))
    return identities


def _write_seaweed_identities(path: Path, identities: list[Identity], bucket: str) -> None:
    config = {
        "identities": [
            {
                "name": identity.name,
                "credentials": [{"accessKey": identity.access_key, "secretKey": identity.secret_key}],
                "actions": identity.seaweed_actions(bucket),
            }
            for identity in identities
        ]
    }
    _write_json(path, config)


def _start_detached(
    command: list[str], log_name: str, state_dir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_file = (state_dir / "logs" / log_name).open("ab")
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: `down` signals the whole group
        cwd=str(state_dir),
        env=env,
    )
    log_file.close()
    return process


def _start_storage(state_dir: Path, info: dict[str, Any], attempts: int = 3) -> None:
    """SeaweedFS and moto on fresh ports; another program may grab a picked port first, so retry."""
    for attempt in range(1, attempts + 1):
        ports = {name: free_port() for name in PORT_NAMES}
        info["ports"] = ports
        info["endpoints"] = {
            "s3": f"http://127.0.0.1:{ports['s3']}",
            "moto": f"http://127.0.0.1:{ports['moto']}",
            "filer": f"http://127.0.0.1:{ports['filer']}",
            "master": f"http://127.0.0.1:{ports['master']}",
            # weed's Prometheus metrics (S3 requests by action and bucket: what the bench counts).
            "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics",
        }
        weed = _start_weed(state_dir, info)
        info["pids"]["weed"] = weed.pid
        moto = _start_moto(state_dir, ports["moto"])
        info["pids"]["moto"] = moto.pid
        _write_json(state_dir / "stack.json", info)
        try:
            wait_for_http(info["endpoints"]["moto"] + "/moto-api/", timeout=STARTUP_TIMEOUT, process=moto)
            wait_for_http(info["endpoints"]["filer"] + "/", timeout=STARTUP_TIMEOUT, process=weed)
            wait_for_http(info["endpoints"]["s3"] + "/", timeout=STARTUP_TIMEOUT, process=weed)
            return
        except NotReady:
            LocalStack._stop_pids(info["pids"])
            if attempt == attempts:
                raise


def _start_weed(state_dir: Path, info: dict[str, Any]) -> subprocess.Popen[bytes]:
    ports = info["ports"]
    data = state_dir / "weed-data"
    data.mkdir(exist_ok=True)
    command = [
        info["weed"], "server",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        "-filer", "-s3",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        # Optional listeners with fixed default ports would collide between stacks.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={state_dir / 'seaweed-identities.json'}",
        # add-host creates host users through the embedded IAM API (admin identity only).
        "-s3.iam.readOnly=false",
        f"-metricsPort={ports['metrics']}", "-metricsIp=127.0.0.1",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-filer.localSocket={state_dir / 'filer.sock'}", f"-s3.localSocket={state_dir / 's3.sock'}",
    ]  # fmt: skip
    return _start_detached(command, "weed.log", state_dir)


def _start_moto(state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    # moto names resources with this account id, like the ARNs the gateway hands out.
    env = os.environ | {"MOTO_ACCOUNT_ID": ACCOUNT_ID}
    command = [_venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    return _start_detached(command, "moto.log", state_dir, env=env)


def _start_supervisor(state_dir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "sysbackup_local.supervisor", "--state-dir", str(state_dir)]
    return _start_detached(command, "supervisor.log", state_dir)


def write_host_config(config_dir: Path, identity: Identity, stack: LocalStack) -> None:
    """The host's `conf` (seed format plus `[api]`), its 0600 credentials, and empty pickers.d/snapshots.d."""
    config_dir = config_dir.resolve()
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "pickers.d").mkdir(exist_ok=True)
    (config_dir / "snapshots.d").mkdir(exist_ok=True)
    credentials_path = config_dir / "credentials"
    credentials = configparser.ConfigParser()
    credentials["default"] = {
        "aws_access_key_id": identity.access_key,
        "aws_secret_access_key": identity.secret_key,
    }
    fd = os.open(credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        credentials.write(stream)
    os.chmod(credentials_path, 0o600)
    parameters = stack.template.parameters
    conf = configparser.ConfigParser()
    conf["aws"] = {"credentials_file": str(credentials_path), "profile": "default", "region": REGION}
    conf["s3"] = {"bucket": stack.bucket}
    conf["cloudformation"] = {
        "region": REGION,
        "export": f"{parameters.get('PackageName', 's3-sysbackup')}-BucketName",
    }
    conf["content"] = {"lock_timeout": "30", "days_retained": parameters.get("DaysRetained", "30")}
    conf["api"] = {"endpoint": stack.endpoints["api"], "region": REGION}
    with (config_dir / "conf").open("w") as stream:
        conf.write(stream)


__all__ = ["DEFAULT_HOST", "LocalHost", "LocalStack", "NotReady", "StackError", "write_host_config"]
