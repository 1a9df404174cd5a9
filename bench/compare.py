"""`make bench-compare`: s3-sysbackup and restic side by side on one local stack's SeaweedFS.

Both tools back up the same data to the same S3 server (restic into its own buckets, with its own
SeaweedFS user). Per case it prints wall seconds, MB/s, peak RSS, and every billed request counted
by the servers, not by the clients:

- S3 requests: SeaweedFS's Prometheus counter `SeaweedFS_s3_request_total`, per bucket and type
  (ours includes the backend's own HEADs and the verifier's GETs);
- API calls and Lambda invocations (and billed milliseconds): the local stack's daemon counts every
  invocation (`usage` on its control port);
- DynamoDB requests (with modelled RRU/WRU) and SQS messages: moto's request recorder.

Ours also runs work after the CLI exits (the verifier re-reads each large new pack its commit queued;
small ones the commit verifies itself): the bench waits for the stack to be idle before reading the
counters, so that work is billed to the case, not timed.
The modelled cost uses public us-east-1 prices (PRICES below); idle SQS long polls and storage are
left out. Cases: the Python standard library tree (first backup, no-change run, one-file change,
restore), a generated tree of 100k small files (first backup, no-change run), a sparse file (zeros:
it measures read/hash/chunk speed and memory, not upload, since every chunk dedups to one) and a
generated pseudo-random stream (AES-CTR keystream; ours through a snapshotter, restic through
`--stdin`): the honest memory test.

    .venv/bin/python bench/compare.py [--tree DIR] [--small-files N] [--sparse-gib G] [--stream-gib G]
                                      [--only CASES] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import compileall
import configparser
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devstack"))

from sysbackup_local.stack import LocalStack  # noqa: E402

CLI = [sys.executable, "-m", "s3_sysbackup.cli"]
RESTIC_PASSWORD = "bench-only-password"
RESTIC_USER = "bench-restic"
MIB = 2**20

# Public AWS prices, us-east-1, USD (checked 2026-11): per request unless said otherwise.
PRICES: dict[str, float] = {
    "s3 PUT/COPY/POST/LIST": 0.005 / 1000,
    "s3 GET/HEAD/other": 0.0004 / 1000,
    "api gateway HTTP API request": 1.00 / 1_000_000,
    "lambda request": 0.20 / 1_000_000,
    "lambda GB-second (x86)": 0.0000166667,
    "dynamodb on-demand RRU": 0.125 / 1_000_000,
    "dynamodb on-demand WRU": 0.625 / 1_000_000,
    "sqs standard request": 0.40 / 1_000_000,
}
S3_WRITE_TYPES = {"PUT", "POST", "COPY", "LIST"}  # SeaweedFS's `type` labels billed at the PUT rate
# SQS requests one delivered message costs in AWS: S3's SendMessage, Lambda's ReceiveMessage, DeleteMessage.
SQS_REQUESTS_PER_MESSAGE = 3


# -- counters ---------------------------------------------------------------------------------


@dataclass
class Usage:
    """What one case cost, as the servers counted it."""

    s3: Counter[str] = field(default_factory=Counter)  # SeaweedFS request type -> count
    api_calls: int = 0
    lambda_invocations: int = 0
    gb_s_by_function: Counter[str] = field(default_factory=Counter)  # Lambda GB-s, per function
    dynamodb: Counter[str] = field(default_factory=Counter)  # operation -> requests
    rru: float = 0.0
    wru: float = 0.0
    sqs_messages: int = 0

    @property
    def s3_requests(self) -> int:
        return sum(self.s3.values())

    @property
    def lambda_gb_s(self) -> float:
        return sum(self.gb_s_by_function.values())

    @property
    def dynamodb_requests(self) -> int:
        return sum(self.dynamodb.values())

    @property
    def billed_requests(self) -> int:
        """Every request AWS would bill (a delivered SQS message counts as its three requests)."""
        return (
            self.s3_requests
            + self.api_calls
            + self.lambda_invocations
            + self.dynamodb_requests
            + self.sqs_messages * SQS_REQUESTS_PER_MESSAGE
        )

    def cost(self) -> float:
        s3_writes = sum(n for kind, n in self.s3.items() if kind in S3_WRITE_TYPES)
        return (
            s3_writes * PRICES["s3 PUT/COPY/POST/LIST"]
            + (self.s3_requests - s3_writes) * PRICES["s3 GET/HEAD/other"]
            + self.api_calls * PRICES["api gateway HTTP API request"]
            + self.lambda_invocations * PRICES["lambda request"]
            + self.lambda_gb_s * PRICES["lambda GB-second (x86)"]
            + self.rru * PRICES["dynamodb on-demand RRU"]
            + self.wru * PRICES["dynamodb on-demand WRU"]
            + self.sqs_messages * SQS_REQUESTS_PER_MESSAGE * PRICES["sqs standard request"]
        )


def scrape_s3_requests(metrics_url: str) -> dict[str, Counter[str]]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return parse_s3_requests(response.read().decode())


def parse_s3_requests(text: str) -> dict[str, Counter[str]]:
    """bucket -> request type -> count (any status), from SeaweedFS's Prometheus text."""
    counts: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        if not line.startswith("SeaweedFS_s3_request_total{"):
            continue
        labels_text, value = line[len("SeaweedFS_s3_request_total{") :].rsplit("} ", 1)
        labels = dict(part.split("=", 1) for part in labels_text.split(","))
        bucket, kind = labels["bucket"].strip('"'), labels["type"].strip('"')
        counts.setdefault(bucket, Counter())[kind] += int(float(value))
    return counts


def dynamodb_capacity(operation: str, body: dict[str, Any]) -> tuple[float, float]:
    """Modelled (RRU, WRU) of one request: items taken as <= 4 KB read / sized by the body on write.

    Query/Scan results are not recorded, so each counts as one 4 KB read (a lower bound).
    """

    def write_units(item: Any) -> float:
        return float(max(1, math.ceil(len(json.dumps(item)) / 1024)))

    def read_units(request: dict[str, Any]) -> float:
        return 1.0 if request.get("ConsistentRead") else 0.5

    if operation in ("GetItem", "Query", "Scan"):
        return read_units(body), 0.0
    if operation == "BatchGetItem":
        return sum(
            read_units(table) * len(table.get("Keys", [])) for table in body.get("RequestItems", {}).values()
        ), 0.0
    if operation in ("PutItem", "UpdateItem", "DeleteItem"):
        return 0.0, write_units(body.get("Item", body.get("Key", {})))
    if operation == "BatchWriteItem":
        requests = [r for table in body.get("RequestItems", {}).values() for r in table]
        return 0.0, sum(write_units(r.get("PutRequest", {}).get("Item", r)) for r in requests)
    if operation == "TransactWriteItems":
        items = body.get("TransactItems", [])
        return 0.0, sum(2 * write_units(next(iter(item.values()), {}).get("Item", {})) for item in items)
    if operation == "TransactGetItems":
        return 2.0 * len(body.get("TransactItems", [])), 0.0
    return 0.0, 0.0  # control-plane calls (DescribeTable, ...)


class MotoRecording:
    """moto server's request recorder (`/moto-api/recorder/...`), read from where it was last read."""

    def __init__(self, stack: LocalStack) -> None:
        self.endpoint = stack.endpoints["moto"]
        self.path = stack.state_dir / "moto_recording"  # moto's default file name, in its cwd
        urllib.request.urlopen(
            urllib.request.Request(f"{self.endpoint}/moto-api/recorder/start-recording", method="POST"),
            timeout=10,
        ).close()
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_requests(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(service, operation, JSON body) of every request recorded since the last call."""
        for entry in self._new_entries():
            target = {k.lower(): v for k, v in entry["headers"].items()}.get("x-amz-target", "")
            if "." not in target:
                continue
            prefix, operation = target.split(".", 1)
            body_text = entry.get("body") or ""
            if entry.get("body_encoded"):
                body_text = base64.b64decode(body_text).decode("utf-8", "replace")
            try:
                body = json.loads(body_text) if body_text else {}
            except ValueError:
                body = {}
            service = "dynamodb" if prefix.startswith("DynamoDB") else "sqs" if "SQS" in prefix else prefix
            yield service, operation, body

    def _new_entries(self) -> Iterator[dict[str, Any]]:
        """Recorded entries past the offset. moto's threads append each entry and its newline in two
        writes, so lines interleave: entries are decoded one JSON object after another instead. (The
        file is ASCII: json.dumps escapes the rest, so characters and bytes count alike.)"""
        if not self.path.exists():
            return
        start = self.offset
        with self.path.open("rb") as stream:
            stream.seek(start)
            text = stream.read().decode("ascii", "replace")
        decoder = json.JSONDecoder()
        position = 0
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position >= len(text):
                break
            try:
                entry, position = decoder.raw_decode(text, position)
            except ValueError:
                break  # an entry still being written: read it next time
            self.offset = start + position
            yield entry


@dataclass
class Snapshot:
    s3: dict[str, Counter[str]]
    lambda_usage: dict[str, dict[str, int]]


class Meter:
    """Takes counter snapshots around a case and turns the difference into a Usage."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.recording = MotoRecording(stack)
        self.memory_mb = {f.logical_id: f.memory_mb for f in stack.template.functions.values()}
        self.api_functions = {f.logical_id for f in stack.template.functions.values() if f.routes}

    def snapshot(self) -> Snapshot:
        return Snapshot(
            scrape_s3_requests(self.stack.endpoints["metrics"]), self.stack.daemon_status()["usage"]
        )

    def start(self) -> Snapshot:
        list(self.recording.new_requests())  # skip whatever happened between cases
        return self.snapshot()

    def usage_since(self, before: Snapshot, buckets: set[str]) -> Usage:
        self.stack.wait_idle(timeout=600)  # the verifier's work belongs to the case that caused it
        after = self.snapshot()
        usage = Usage()
        for bucket in buckets:
            usage.s3.update(after.s3.get(bucket, Counter()))
            usage.s3.subtract(before.s3.get(bucket, Counter()))
        usage.s3 = +usage.s3
        for function, now in after.lambda_usage.items():
            if function not in self.memory_mb:
                continue  # a function a test put on the stack (not the product's bill)
            then = before.lambda_usage.get(function, {"invocations": 0, "billed_ms": 0})
            invocations = now["invocations"] - then["invocations"]
            usage.lambda_invocations += invocations
            gb_s = (now["billed_ms"] - then["billed_ms"]) / 1000 * self.memory_mb[function] / 1024
            if gb_s:
                usage.gb_s_by_function[function] += gb_s
            if function in self.api_functions:
                usage.api_calls += invocations
        for service, operation, body in self.recording.new_requests():
            if service == "dynamodb":
                usage.dynamodb[operation] += 1
                rru, wru = dynamodb_capacity(operation, body)
                usage.rru += rru
                usage.wru += wru
            elif service == "sqs" and operation == "SendMessage":
                usage.sqs_messages += 1
            elif service == "sqs" and operation == "SendMessageBatch":
                usage.sqs_messages += len(body.get("Entries", []))
        return usage


def restic_only(s3: Counter[str]) -> Usage:
    return Usage(s3=s3)


# -- the two tools ----------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    usage: Usage
    stored_bytes: int  # added to the tool's buckets by this case


def run_measured(
    command: list[str], env: dict[str, str] | None = None, stdin: Any = None
) -> tuple[float, float]:
    """Run one process; (wall seconds, its peak RSS in MiB, its waited-for children included).

    Linux carries a process's RSS high-water mark across fork and exec, so a child of this ~100 MB
    process would never report less than ~100 MB: GNU time, a small process, forks the command."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        started = time.perf_counter()
        measured = ["/usr/bin/time", "-f", "%M", "-o", report.name, *command]
        process = subprocess.run(measured, env=env, stdin=stdin, stdout=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - started
        if process.returncode not in (0, 2):  # 2: ours committed with warnings
            raise SystemExit(f"{' '.join(command[:4])} ... failed with status {process.returncode}")
        peak_kib = int(report.read().split()[-1])  # GNU time notes a non-zero status on a line before
    return elapsed, peak_kib / 1024


def bucket_bytes(s3: Any, bucket: str) -> int:
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(item["Size"] for item in page.get("Contents", []))
    return total


class Ours:
    """One s3-sysbackup host per dataset (its own config dir, cache and parent chain)."""

    name = "s3-sysbackup"

    def __init__(self, stack: LocalStack, meter: Meter, work: Path, dataset: str) -> None:
        self.stack, self.meter = stack, meter
        self.config_dir = work / f"ours-{dataset}"
        stack.add_host(f"bench-{dataset}", self.config_dir)
        conf = configparser.ConfigParser()
        conf.read(self.config_dir / "conf")
        conf["content"]["cache_dir"] = str(work / "ours-cache")
        with (self.config_dir / "conf").open("w") as stream:
            conf.write(stream)

    def pick(self, path: Path) -> None:
        _write_script(self.config_dir / "pickers.d" / "bench", f"echo '{path}'")

    def snapshot_stream(self, generator: str) -> None:
        _write_script(self.config_dir / "snapshots.d" / "bench-stream", f'{generator} >&"$1"')

    def backup(self) -> Run:
        return self._measure(["archive", "-q"])

    def restore(self, target: Path) -> Run:
        return self._measure(["restore", "latest", "--target", str(target)])

    def _measure(self, args: list[str]) -> Run:
        admin = self.stack.s3_client("admin")
        stored_before = bucket_bytes(admin, self.stack.bucket)
        before = self.meter.start()
        seconds, rss = run_measured([*CLI, "--config-dir", str(self.config_dir), *args])
        usage = self.meter.usage_since(before, {self.stack.bucket})
        return Run(seconds, rss, usage, bucket_bytes(admin, self.stack.bucket) - stored_before)


class Restic:
    """restic with one repository (bucket) per dataset and its own cache, as a user would run it."""

    name = "restic"

    def __init__(
        self, stack: LocalStack, meter: Meter, work: Path, dataset: str, key: dict[str, str]
    ) -> None:
        self.stack, self.meter = stack, meter
        self.bucket = f"restic-{dataset}"
        self.s3 = stack.s3_client("admin")
        self.s3.create_bucket(Bucket=self.bucket)
        self.env = os.environ | {
            "RESTIC_REPOSITORY": f"s3:{stack.endpoints['s3']}/{self.bucket}",
            "RESTIC_PASSWORD": RESTIC_PASSWORD,
            "RESTIC_CACHE_DIR": str(work / "restic-cache"),
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        subprocess.run(["restic", "init", "-q"], env=self.env, check=True, stdout=subprocess.DEVNULL)
        self.paths: list[str] = []

    def pick(self, path: Path) -> None:
        self.paths = [str(path)]

    def backup(self) -> Run:
        return self._measure(["backup", "-q", *self.paths])

    def backup_stream(self, generator: str) -> Run:
        with subprocess.Popen(["sh", "-c", generator], stdout=subprocess.PIPE) as source:
            run = self._measure(
                ["backup", "-q", "--stdin", "--stdin-filename", "stream.bin"], stdin=source.stdout
            )
        return run

    def restore(self, target: Path) -> Run:
        return self._measure(["restore", "-q", "latest", "--target", str(target)])

    def _measure(self, args: list[str], stdin: Any = None) -> Run:
        stored_before = bucket_bytes(self.s3, self.bucket)
        before = self.meter.start()
        seconds, rss = run_measured(["restic", *args], env=self.env, stdin=stdin)
        after = scrape_s3_requests(self.stack.endpoints["metrics"])
        s3 = after.get(self.bucket, Counter())
        s3.subtract(before.s3.get(self.bucket, Counter()))
        return Run(seconds, rss, restic_only(+s3), bucket_bytes(self.s3, self.bucket) - stored_before)


def restic_user(stack: LocalStack, buckets: list[str]) -> dict[str, str]:
    """A SeaweedFS IAM user with full rights on restic's buckets only (made through the embedded IAM API)."""
    admin = stack.identity("admin")
    iam = boto3.client(
        "iam",
        endpoint_url=stack.endpoints["s3"],
        region_name="us-east-1",
        aws_access_key_id=admin.access_key,
        aws_secret_access_key=admin.secret_key,
    )
    iam.create_user(UserName=RESTIC_USER)
    key = iam.create_access_key(UserName=RESTIC_USER)["AccessKey"]
    resources = [f"arn:aws:s3:::{b}" for b in buckets] + [f"arn:aws:s3:::{b}/*" for b in buckets]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": resources}],
    }
    iam.put_user_policy(UserName=RESTIC_USER, PolicyName="bench", PolicyDocument=json.dumps(policy))
    time.sleep(1)  # SeaweedFS reloads identities asynchronously
    return {"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]}


# -- data -------------------------------------------------------------------------------------


def _write_script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def copy_tree(source: Path, target: Path) -> None:
    """A private copy (the one-file change must not touch the source), without site-packages."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))


def generate_small_files(target: Path, count: int, seed: int = 4) -> None:
    """`count` files of 64 B to 2 KiB (half text-like, half random) in directories of 1000."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)
    ]
    for index in range(count):
        directory = target / f"d{index // 1000:04d}"
        if index % 1000 == 0:
            directory.mkdir(parents=True)
        size = rng.randint(64, 2048)
        text_like = b" ".join(rng.choice(words) for _ in range(size // 6))
        content = rng.randbytes(size) if index % 2 else text_like
        (directory / f"f{index:06d}.dat").write_bytes(content)


def tree_bytes(tree: Path) -> int:
    return sum(
        (Path(d) / name).lstat().st_size
        for d, _, names in os.walk(tree)
        for name in names
        if (Path(d) / name).is_file() and not (Path(d) / name).is_symlink()
    )


def stream_generator(size: int) -> str:
    """A shell pipeline writing `size` pseudo-random (incompressible, never repeating) bytes fast."""
    return f"openssl enc -aes-128-ctr -nosalt -pass pass:bench -in /dev/zero 2>/dev/null | head -c {size}"


def change_one_file(tree: Path) -> Path:
    """Append a line to one mid-sized file (what a config edit looks like)."""
    files = sorted(
        (p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.stat().st_size
    )
    if not files:
        raise SystemExit(f"{tree} holds no regular file to change")
    victim = files[len(files) // 2]  # a median-sized file
    with victim.open("a") as stream:
        stream.write(f"\n# changed by the bench at {time.time_ns()}\n")
    return victim


# -- report -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    megabytes: float
    ours: Run
    restic: Run


def case_lines(case: Case) -> list[tuple[str, float, float, str]]:
    """(metric, ours, restic, format) for one case."""
    o, r = case.ours, case.restic

    def rate(run: Run) -> float:
        return case.megabytes / run.seconds if run.seconds else 0.0

    return [
        ("wall seconds", o.seconds, r.seconds, ".2f"),
        ("MB/s", rate(o), rate(r), ".1f"),
        ("peak RSS MiB", o.peak_rss_mib, r.peak_rss_mib, ".1f"),
        ("S3 requests", o.usage.s3_requests, r.usage.s3_requests, ".0f"),
        *(
            (f"  S3 {kind}", o.usage.s3[kind], r.usage.s3[kind], ".0f")
            for kind in sorted(set(o.usage.s3) | set(r.usage.s3))
        ),
        ("API calls", o.usage.api_calls, r.usage.api_calls, ".0f"),
        ("Lambda invocations", o.usage.lambda_invocations, r.usage.lambda_invocations, ".0f"),
        ("Lambda GB-s", o.usage.lambda_gb_s, r.usage.lambda_gb_s, ".3f"),
        ("DynamoDB requests", o.usage.dynamodb_requests, r.usage.dynamodb_requests, ".0f"),
        ("DynamoDB RRU / WRU", o.usage.rru + o.usage.wru, 0.0, ".1f"),
        ("SQS messages", o.usage.sqs_messages, r.usage.sqs_messages, ".0f"),
        ("billed requests, all", o.usage.billed_requests, r.usage.billed_requests, ".0f"),
        ("MiB stored (added)", o.stored_bytes / MIB, r.stored_bytes / MIB, ".1f"),
        ("modelled cost, micro-USD", o.usage.cost() * 1e6, r.usage.cost() * 1e6, ".2f"),
    ]


def format_case(case: Case) -> str:
    lines = [
        f"### {case.name} ({case.megabytes:.1f} MB)",
        "",
        "| metric | s3-sysbackup | restic | ours/restic |",
    ]
    lines.append("| --- | ---: | ---: | ---: |")
    for metric, ours, restic, fmt in case_lines(case):
        if metric == "DynamoDB RRU / WRU":
            ours_text = f"{case.ours.usage.rru:.1f} / {case.ours.usage.wru:.1f}"
            lines.append(f"| {metric} | {ours_text} | 0 / 0 | - |")
            continue
        ratio = f"{ours / restic:.2f}" if restic else ("-" if not ours else "inf")
        lines.append(f"| {metric} | {ours:{fmt}} | {restic:{fmt}} | {ratio} |")
    return "\n".join(lines)


def format_dynamodb_detail(case: Case) -> str:
    detail = ", ".join(f"{op} {n}" for op, n in sorted(case.ours.usage.dynamodb.items()))
    return f"DynamoDB operations: {detail or 'none'}"


def format_lambda_detail(case: Case) -> str:
    by_function = case.ours.usage.gb_s_by_function.most_common()
    detail = ", ".join(f"{function} {gb_s:.3f}" for function, gb_s in by_function)
    return f"Lambda GB-s by function: {detail or 'none'}"


# -- main -------------------------------------------------------------------------------------

ALL_CASES = ("tree", "restore", "small", "sparse", "stream")


def precompile() -> None:
    """Bytecode for our packages, as an installed package has: with PYTHONDONTWRITEBYTECODE set (as it
    is here) every CLI run would otherwise compile its sources again, a cost restic's binary never pays."""
    for package in ("uploader", "domain", "backend", "devstack", "functions"):
        compileall.compile_dir(REPO / package, quiet=1)


def ensure_tools() -> None:
    if not Path("/usr/bin/time").exists():
        print("GNU time missing: apt-get install -y time", flush=True)
        subprocess.run(["apt-get", "install", "-y", "time"], check=True)
    ensure_restic()


def ensure_restic() -> None:
    if shutil.which("restic"):
        return
    print("restic missing: apt-get install -y restic", flush=True)
    subprocess.run(
        ["apt-get", "install", "-y", "restic"],
        check=True,
        env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parser.add_argument("--tree", type=Path, default=stdlib, help="tree to back up (default: the stdlib)")
    parser.add_argument("--small-files", type=int, default=100_000, help="files in the generated tree")
    parser.add_argument("--sparse-gib", type=float, default=10.0, help="size of the sparse file")
    # 1 GiB keeps the case a few minutes on a small machine (nothing per chunk reaches DynamoDB any more).
    parser.add_argument("--stream-gib", type=float, default=1.0, help="size of the generated stream")
    parser.add_argument("--only", default=",".join(ALL_CASES), help=f"comma-separated subset of {ALL_CASES}")
    parser.add_argument(
        "--work", type=Path, help="work directory (default: a new one in /tmp, removed after)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return parser.parse_args(argv)


@dataclass
class Bench:
    stack: LocalStack
    meter: Meter
    work: Path  # stack state, configs, caches, restores
    data: Path  # the data backed up: a directory whose ancestors nothing else touches
    restic_key: dict[str, str]

    def tools(self, dataset: str) -> tuple[Ours, Restic]:
        return (
            Ours(self.stack, self.meter, self.work, dataset),
            Restic(self.stack, self.meter, self.work, dataset, self.restic_key),
        )


def stable_data_root() -> Path:
    """Where the data goes. Both tools record the picked path's ancestors, so a busy /tmp (whose
    mtime changes whenever anyone makes a file there) would turn every no-change run into a
    one-tree change: /srv, when writable, is left alone by everyone else."""
    parent = Path("/srv")
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        parent = Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="s3sb-compare-data-", dir=parent))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    if only - set(ALL_CASES):
        raise SystemExit(f"unknown cases {sorted(only - set(ALL_CASES))}; choose from {ALL_CASES}")
    ensure_tools()
    precompile()
    work = args.work or Path(tempfile.mkdtemp(prefix="s3sb-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    data = stable_data_root()
    datasets = ["tree", "small", "sparse", "stream"]
    stack = LocalStack.start(work / "stack", work / "ours-default")
    cases: list[Case] = []
    print_header()
    try:
        meter = Meter(stack)
        bench = Bench(stack, meter, work, data, restic_user(stack, [f"restic-{d}" for d in datasets]))
        planned: list[Iterator[Case]] = []
        if only & {"tree", "restore"}:
            planned.append(tree_cases(bench, args.tree, "restore" in only))
        if "small" in only:
            planned.append(small_cases(bench, args.small_files))
        if "sparse" in only:
            planned.append(sparse_cases(bench, int(args.sparse_gib * 2**30)))
        if "stream" in only:
            planned.append(stream_cases(bench, int(args.stream_gib * 2**30)))
        for case in itertools.chain.from_iterable(planned):
            cases.append(case)
            print_case(case)  # as it comes: a long run that fails late keeps what it measured
            if args.json:
                args.json.write_text(json.dumps([case_json(c) for c in cases], indent=2) + "\n")
    finally:
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nprices (USD):", ", ".join(f"{name} {price:.3g}" for name, price in PRICES.items()))
    return 0


def tree_cases(bench: Bench, source: Path, with_restore: bool) -> Iterator[Case]:
    tree = bench.data / "tree"
    copy_tree(source, tree)
    megabytes = tree_bytes(tree) / 1e6
    ours, restic = bench.tools("tree")
    ours.pick(tree)
    restic.pick(tree)
    time.sleep(1.1)  # past the parent cache's racy window: files copied just now are settled
    label = f"stdlib tree {source.name}"
    yield Case(f"first backup, {label}", megabytes, ours.backup(), restic.backup())
    yield Case(f"no-change run, {label}", megabytes, ours.backup(), restic.backup())
    change_one_file(tree)
    yield Case(f"one-file change, {label}", megabytes, ours.backup(), restic.backup())
    if with_restore:
        ours_target, restic_target = bench.work / "restored-ours", bench.work / "restored-restic"
        ours_run = ours.restore(ours_target)
        restic_run = restic.restore(restic_target)
        check_restored(tree, ours_target, restic_target)
        yield Case(f"restore, {label}", megabytes, ours_run, restic_run)


def check_restored(source: Path, *restored: Path) -> None:
    """Both restores hold the tree (byte totals agree; the uploader's own tests check exactness)."""
    expected = tree_bytes(source)
    for target in restored:
        nested = target / str(source).lstrip("/")
        got = tree_bytes(nested if nested.exists() else target)
        if got != expected:
            raise SystemExit(f"restore into {target} holds {got} bytes, expected {expected}")


def small_cases(bench: Bench, count: int) -> Iterator[Case]:
    tree = bench.data / "small"
    generate_small_files(tree, count)
    megabytes = tree_bytes(tree) / 1e6
    ours, restic = bench.tools("small")
    ours.pick(tree)
    restic.pick(tree)
    time.sleep(1.1)
    label = f"{count} small files"
    yield Case(f"first backup, {label}", megabytes, ours.backup(), restic.backup())
    yield Case(f"no-change run, {label}", megabytes, ours.backup(), restic.backup())


def sparse_cases(bench: Bench, size: int) -> Iterator[Case]:
    sparse_dir = bench.data / "sparse"
    sparse_dir.mkdir(parents=True)
    with (sparse_dir / "big.sparse").open("wb") as stream:
        stream.truncate(size)
    ours, restic = bench.tools("sparse")
    ours.pick(sparse_dir)
    restic.pick(sparse_dir)
    yield Case(f"{size / 2**30:g} GiB sparse file (zeros)", size / 1e6, ours.backup(), restic.backup())


def stream_cases(bench: Bench, size: int) -> Iterator[Case]:
    generator = stream_generator(size)
    ours, restic = bench.tools("stream")
    ours.snapshot_stream(generator)
    name = f"{size / 2**30:g} GiB generated stream"
    yield Case(name, size / 1e6, ours.backup(), restic.backup_stream(generator))


def case_json(case: Case) -> dict[str, Any]:
    return {
        "case": case.name,
        "megabytes": case.megabytes,
        "lines": {metric: {"ours": o, "restic": r} for metric, o, r, _ in case_lines(case)},
        "dynamodb_operations": dict(case.ours.usage.dynamodb),
        "lambda_gb_s_by_function": dict(case.ours.usage.gb_s_by_function),
    }


def print_header() -> None:
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
    print(f"restic: {version}\ncommand: bench/compare.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)


def print_case(case: Case) -> None:
    details = f"{format_dynamodb_detail(case)}\n{format_lambda_detail(case)}"
    print(f"\n{format_case(case)}\n\n{details}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
