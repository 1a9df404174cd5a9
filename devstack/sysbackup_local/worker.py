"""One function's worker process: loads `functions/<folder>/app.py` and runs invocations one at a time.

Like a Lambda execution environment it has its own environment variables (set by whoever starts it),
keeps the module loaded between invocations, and runs one invocation at a time. The supervisor talks to it
over loopback HTTP: `POST /invoke` with `{"event", "request_id"}` answers `{"result"}` or `{"error"}`.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from .template import ACCOUNT_ID, REGION

# Development aid: when set (in the environment `local up` starts from), every invocation runs under
# cProfile and leaves `<dir>/<function>-<request id>.prof` (read with `python -m pstats`).
PROFILE_DIR_ENV = "SYSBACKUP_LOCAL_PROFILE_DIR"


class LambdaContext:
    """The attributes of Lambda's context object that handlers and powertools read."""

    def __init__(self, function_name: str, memory_mb: int, timeout_seconds: int, request_id: str) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function_name}"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = f"local/{request_id}"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class InvocationTimeout(Exception):
    pass


class FunctionRuntime:
    """Holds the loaded handler; loading is retried on the next invocation if it failed."""

    def __init__(
        self, function_name: str, app_path: Path, handler: str, memory_mb: int, timeout: int
    ) -> None:
        self.function_name = function_name
        self.app_path = app_path
        self.handler_name = handler.split(".", 1)[1] if "." in handler else "lambda_handler"
        self.memory_mb = memory_mb
        self.timeout = timeout
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            if not self.app_path.exists():
                raise FileNotFoundError(f"{self.app_path} does not exist")
            # Lambda puts the function's folder first on sys.path, so app.py may import its siblings.
            sys.path.insert(0, str(self.app_path.parent))
            spec = importlib.util.spec_from_file_location("app", self.app_path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["app"] = module
            spec.loader.exec_module(module)
            self._module = module
        return self._module

    def invoke(self, event: Any, request_id: str) -> Any:
        module = self._load()
        handler = getattr(module, self.handler_name)
        context = LambdaContext(self.function_name, self.memory_mb, self.timeout, request_id)

        def on_timeout(signum: int, frame: FrameType | None) -> None:
            raise InvocationTimeout(f"Task timed out after {self.timeout:.2f} seconds")

        previous = signal.signal(signal.SIGALRM, on_timeout)
        signal.alarm(self.timeout)
        try:
            profile_dir = os.environ.get(PROFILE_DIR_ENV)
            if profile_dir:
                return self._profiled(handler, event, context, Path(profile_dir) / f"{request_id}.prof")
            return handler(event, context)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    def _profiled(self, handler: Any, event: Any, context: LambdaContext, out: Path) -> Any:
        profiler = cProfile.Profile()
        try:
            return profiler.runcall(handler, event, context)
        finally:
            out.parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(out.with_name(f"{self.function_name}-{out.name}"))


# Lambda's limit for a synchronous invocation's response.
MAX_RESPONSE_BYTES = 6 * 1024 * 1024


class ResponsePayloadError(Exception):
    """What Lambda reports instead of the result (Runtime.MarshalError, response size too large)."""


def check_response_payload(result: Any) -> None:
    """Fails like Lambda for results it could not return: not JSON (e.g. Decimal), or over 6 MB."""
    try:
        encoded = json.dumps(result)
    except (TypeError, ValueError) as error:
        raise ResponsePayloadError(f"Runtime.MarshalError: Unable to marshal response: {error}") from None
    if len(encoded.encode()) > MAX_RESPONSE_BYTES:
        raise ResponsePayloadError(
            f"Function.ResponseSizeTooLarge: response payload size ({len(encoded)} bytes) exceeded "
            f"maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."
        )


def _make_handler(runtime: FunctionRuntime) -> type[BaseHTTPRequestHandler]:
    class WorkerRequestHandler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return  # the function's own log is what matters

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(200, {"function": runtime.function_name})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            request_id = request.get("request_id") or str(uuid.uuid4())
            print(f"START RequestId: {request_id}", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                result = runtime.invoke(request.get("event"), request_id)
                check_response_payload(result)
                payload: dict[str, Any] = {"result": result}
            except BaseException as error:  # a handler crash must not kill the worker
                traceback.print_exc()
                payload = {
                    "error": {
                        "errorType": type(error).__name__,
                        "errorMessage": str(error),
                        "stackTrace": traceback.format_exception(error),
                    }
                }
            elapsed = (time.monotonic() - started) * 1000
            print(f"END RequestId: {request_id} Duration: {elapsed:.2f} ms", file=sys.stderr, flush=True)
            sys.stdout.flush()
            self._reply(200, payload)

    return WorkerRequestHandler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one local Lambda function worker")
    parser.add_argument("--function-name", required=True)
    parser.add_argument("--app", required=True, type=Path)
    parser.add_argument("--handler", default="app.lambda_handler")
    parser.add_argument("--memory", type=int, default=128)
    parser.add_argument("--timeout", type=int, default=3)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --port-file)")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here")
    # Unused by the worker; names the stack on its command line so `ps` and `local down` checks can find it.
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    runtime = FunctionRuntime(args.function_name, args.app.resolve(), args.handler, args.memory, args.timeout)
    server = HTTPServer(("127.0.0.1", args.port), _make_handler(runtime))
    if args.port_file is not None:
        # Port 0 lets the kernel choose; the supervisor learns the port from this file (no race for a port).
        temporary = args.port_file.with_suffix(".tmp")
        temporary.write_text(str(server.server_address[1]))
        temporary.replace(args.port_file)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
