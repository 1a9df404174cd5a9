"""The stack's daemon: function workers, the API gateway, SQS pollers and a control port.

Started detached by `LocalStack.start`; reads `S/stack.json`; everything it starts shares its process
group, so `local down` ends them all with one signal. The control port (loopback, JSON) serves the CLI
and tests: invoke a function, wait until idle, register a test route.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .gateway import ApiGateway, InvocationOutcome, RouteTable, make_http_server
from .identities import KIND_FUNCTION, ROLE_IDENTITY_KINDS, Identity, IdentityRegistry
from .ports import wait_for_http
from .sqs import SqsPoller
from .template import REGION, FunctionSpec, HttpRoute, parse_template

log = logging.getLogger("sysbackup_local.supervisor")
# wait_idle: this many checks in a row, this far apart, must find every queue empty and every poller idle.
QUIET_CHECKS = 2
QUIET_CHECK_SECONDS = 0.2


def function_environment(
    spec_env: dict[str, str], function_name: str, access_key: str, secret_key: str, stack: dict[str, Any]
) -> dict[str, str]:
    """What a function's process sees: template env, local endpoints, its own credentials."""
    endpoints = stack["endpoints"]
    repo = Path(stack["repo"])
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "POWERTOOLS_"))
    }
    # `!Ref` of a queue is its URL in AWS; the template reader only knows names, the stack knows the URLs.
    queue_urls = {queue["name"]: queue["url"] for queue in stack.get("queues", {}).values()}
    environment.update({name: queue_urls.get(value, value) for name, value in spec_env.items()})
    environment.update(
        {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(Path(stack["state_dir"]) / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_S3": endpoints["s3"],
            "AWS_ENDPOINT_URL_DYNAMODB": endpoints["moto"],
            "AWS_ENDPOINT_URL_SQS": endpoints["moto"],
            "AWS_ENDPOINT_URL_SNS": endpoints["moto"],
            "AWS_ENDPOINT_URL_EVENTS": endpoints["moto"],
            "AWS_ENDPOINT_URL_EVENTBRIDGE": endpoints["moto"],
            "AWS_ENDPOINT_URL_GLACIER": endpoints["moto"],
            "AWS_LAMBDA_FUNCTION_NAME": function_name,
            # No X-Ray daemon here.
            "POWERTOOLS_TRACE_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
            # What the SharedLayer provides in Lambda.
            "PYTHONPATH": os.pathsep.join([str(repo / "domain"), str(repo / "backend")]),
        }
    )
    return environment


def idle_environments(ports: list[int]) -> queue.LifoQueue[int]:
    """A function's free workers: an invocation takes the one used last. Lambda, too, reuses a warm
    environment before it starts (cold) another; taking them in turn would make every environment
    pay its cold start once (locally 0.3-0.45 s: a second call as slow as the first)."""
    idle: queue.LifoQueue[int] = queue.LifoQueue()
    for port in ports:
        idle.put(port)
    return idle


class Supervisor:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.stack: dict[str, Any] = json.loads((state_dir / "stack.json").read_text())
        self.template = parse_template(Path(self.stack["template"]), self.stack.get("parameters"))
        self.registry = IdentityRegistry(state_dir / "identities.json")
        self.logs = state_dir / "logs"
        self.children: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, list[int]] = {}  # function -> its workers' ports
        # Execution environments per function (Lambda runs invocations concurrently).
        self.concurrency = int(self.stack.get("concurrency", 1))
        self.routes = RouteTable()
        self.pollers: list[SqsPoller] = []
        self._moto = dict(
            endpoint_url=self.stack["endpoints"]["moto"],
            region_name=REGION,
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(retries={"max_attempts": 3}),
        )
        self.sqs = boto3.client("sqs", **self._moto)
        self._idle_workers: dict[str, queue.LifoQueue[int]] = {}
        self.stopping = threading.Event()
        # Per function: invocations and summed billed milliseconds (Lambda rounds each up to 1 ms);
        # the bench reads them from the control port to model the Lambda bill of a run.
        self.usage: dict[str, dict[str, int]] = {}
        self._usage_lock = threading.Lock()

    # ------------------------------------------------------------------ workers
    def start_worker(
        self,
        name: str,
        app: Path,
        handler: str,
        memory: int,
        timeout: int,
        env: dict[str, str],
        instances: int = 1,
    ) -> None:
        """`instances` execution environments for one function (see `idle_environments`)."""
        ports = []
        for instance in range(instances):
            port_file = self.state_dir / "run" / f"{name}-{instance}.port"
            port_file.parent.mkdir(exist_ok=True)
            port_file.unlink(missing_ok=True)
            log_file = (self.logs / f"{name}.log").open("ab")
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "sysbackup_local.worker",
                    "--function-name", name, "--app", str(app), "--handler", handler,
                    "--memory", str(memory), "--timeout", str(timeout), "--port-file", str(port_file),
                    "--state-dir", str(self.state_dir),
                ],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(app.parent),
            )  # fmt: skip
            self.children.append(process)
            port = _wait_for_port_file(port_file, process, timeout=30)
            wait_for_http(f"http://127.0.0.1:{port}/", timeout=30, process=process)
            ports.append(port)
        self.workers[name] = ports
        self._idle_workers[name] = idle_environments(ports)

    def start_function(self, spec: FunctionSpec) -> None:
        identity = self.function_identity(spec)
        env = function_environment(
            spec.environment, spec.logical_id, identity.access_key, identity.secret_key, self.stack
        )
        app = Path(self.stack["repo"]) / "functions" / spec.folder / "app.py"
        self.start_worker(
            spec.logical_id, app, spec.handler, spec.memory_mb, spec.timeout_seconds, env, self.concurrency
        )
        for route in spec.routes:
            self.routes.add(route, spec.logical_id)

    def function_identity(self, spec: FunctionSpec) -> Identity:
        """A function runs as its template role's identity (GcFunction as `gc`), else its own."""
        kind = ROLE_IDENTITY_KINDS.get(spec.role_logical_id or "")
        return self.registry.get(kind) if kind else self.registry.get(KIND_FUNCTION, spec.logical_id)

    def invoke(self, function: str, event: dict[str, Any]) -> InvocationOutcome:
        idle = self._idle_workers.get(function)
        if idle is None:
            return InvocationOutcome(
                error={"errorType": "ResourceNotFound", "errorMessage": f"no function {function}"}
            )
        request = json.dumps({"event": event, "request_id": str(uuid.uuid4())}).encode()
        # One invocation at a time per worker, as in one Lambda execution environment.
        port = idle.get()
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/invoke", data=request, method="POST"),
                timeout=930,
            ) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError) as error:
            return InvocationOutcome(error={"errorType": "WorkerUnavailable", "errorMessage": str(error)})
        finally:
            idle.put(port)
            self._count_invocation(function, time.perf_counter() - started)
        return InvocationOutcome(result=answer.get("result"), error=answer.get("error"))

    def _count_invocation(self, function: str, seconds: float) -> None:
        with self._usage_lock:
            usage = self.usage.setdefault(function, {"invocations": 0, "billed_ms": 0})
            usage["invocations"] += 1
            usage["billed_ms"] += max(1, int(seconds * 1000 + 0.999))

    def usage_snapshot(self) -> dict[str, dict[str, int]]:
        with self._usage_lock:
            return {function: dict(usage) for function, usage in self.usage.items()}

    # ------------------------------------------------------------------ SQS event sources
    def start_event_sources(self) -> None:
        """One poller per SQS trigger in the template (VerifyQueue, RetentionQueue), as Lambda's mappings."""
        for spec in self.template.functions.values():
            for trigger in spec.sqs_triggers:
                queue = self.stack["queues"][trigger.queue_logical_id]
                poller = SqsPoller(
                    self.sqs, queue["url"], queue["arn"], spec.logical_id,
                    trigger.batch_size, trigger.report_batch_item_failures, self.invoke,
                )  # fmt: skip
                self.pollers.append(poller)
                threading.Thread(target=poller.run, daemon=True, name=f"sqs-{spec.logical_id}").start()

    def wait_idle(self, timeout: float) -> bool:
        """True once every queue with a poller is empty and no poller is handling a batch.

        Every message the stack's functions send (a commit's verify request, lock extension requests) is
        in its queue before the call that sent it answers, so nothing can still be on its way.
        """
        if any(poller.held for poller in self.pollers):
            raise RuntimeError("deliveries are held: the queues cannot drain (release them first)")
        deadline = time.monotonic() + timeout
        quiet_checks = 0
        while time.monotonic() < deadline:
            if self._queues_drained() and not any(poller.busy for poller in self.pollers):
                quiet_checks += 1
                if quiet_checks >= QUIET_CHECKS:
                    return True
            else:
                quiet_checks = 0
            time.sleep(QUIET_CHECK_SECONDS)
        return False

    def _queues_drained(self) -> bool:
        for poller in self.pollers:
            attributes = self.sqs.get_queue_attributes(
                QueueUrl=poller.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]
            if int(attributes.get("ApproximateNumberOfMessages", "0")):
                return False
        return True

    def hold_deliveries(self, hold: bool) -> dict[str, Any]:
        """Holds back (or releases) every SQS event source mapping; messages still reach the queues."""
        if not hold:
            for poller in self.pollers:
                poller.release()
            return {"held": False}
        if not all(poller.hold() for poller in self.pollers):
            raise RuntimeError("a function was still handling a batch after 30 s")
        return {"held": True}

    # ------------------------------------------------------------------ control
    def register_function(self, request: dict[str, Any]) -> dict[str, Any]:
        """Adds a function and its routes at run time (tests use it for an echo route)."""
        name = str(request["name"])
        env = function_environment(request.get("environment", {}), name, "none", "none", self.stack)
        self.start_worker(
            name,
            Path(request["app"]),
            "app.lambda_handler",
            128,
            int(request.get("timeout", 10)),
            env,
            int(request.get("instances", self.concurrency)),
        )
        for route in request.get("routes", []):
            self.routes.add(HttpRoute(str(route["method"]).upper(), str(route["path"])), name)
        return {"function": name}

    def control_server(self, port: int) -> ThreadingHTTPServer:
        supervisor = self

        class ControlHandler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _reply(self, status: int, payload: Any) -> None:
                body = json.dumps(payload, default=str).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                routes = [
                    {"route": route.route_key, "function": function}
                    for route, function in supervisor.template.routes()
                ]
                self._reply(
                    200,
                    {
                        "workers": supervisor.workers,
                        "routes": routes,
                        "usage": supervisor.usage_snapshot(),
                    },
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                try:
                    if self.path.startswith("/invoke/"):
                        outcome = supervisor.invoke(self.path.removeprefix("/invoke/"), request)
                        self._reply(200, {"result": outcome.result, "error": outcome.error})
                    elif self.path == "/idle":
                        self._reply(200, {"idle": supervisor.wait_idle(float(request.get("timeout", 60)))})
                    elif self.path == "/functions":
                        self._reply(200, supervisor.register_function(request))
                    elif self.path == "/deliveries":
                        self._reply(200, supervisor.hold_deliveries(bool(request.get("hold"))))
                    else:
                        self._reply(404, {"message": "unknown control path"})
                except Exception as error:
                    log.exception("control request %s failed", self.path)
                    self._reply(500, {"message": f"{type(error).__name__}: {error}"})

        server = ThreadingHTTPServer(("127.0.0.1", port), ControlHandler)
        server.daemon_threads = True
        return server

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        # Bind first (port 0: the kernel picks), so nothing can take these ports while workers start.
        gateway = ApiGateway(self.routes, self.registry.by_access_key, self.invoke)
        api_server = make_http_server(gateway, 0)
        control = self.control_server(0)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        for spec in self.template.functions.values():
            self.start_function(spec)
        self.start_event_sources()
        threading.Thread(target=api_server.serve_forever, daemon=True, name="api-gateway").start()
        threading.Thread(target=control.serve_forever, daemon=True, name="control").start()
        ready = {
            "api": api_server.server_address[1],
            "control": control.server_address[1],
            "workers": self.workers,
        }
        temporary = self.state_dir / "supervisor.ready.tmp"
        temporary.write_text(json.dumps(ready))
        temporary.replace(self.state_dir / "supervisor.ready")
        stop.wait()
        self.shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        for poller in self.pollers:
            poller.stop()
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()


def _wait_for_port_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode} before listening (see its log)")
        time.sleep(0.05)
    raise RuntimeError(f"worker did not report its port within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the local stack's daemon (started by `local up`)")
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = Supervisor(args.state_dir)
    try:
        supervisor.run()
    except Exception:
        log.exception("the supervisor failed")
        supervisor.shutdown()
        (args.state_dir / "supervisor.failed").write_text("see logs/supervisor.log")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
