"""Long-running work (a commit whose tree walk outlasts one API call) in JobsTable."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zstandard
from botocore.exceptions import ClientError

from .dynamo import is_condition_failure

JOB_RUNNING = "running"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"
JOB_TTL_SECONDS = 7 * 24 * 3600
# DynamoDB items stop at 400 KB; a large walk frontier is spread over extra part items.
_PART_BYTES = 300 * 1024


@dataclass(frozen=True)
class Job:
    job_id: str
    kind: str
    host: str
    state: str
    version: int
    request: dict[str, Any]  # read back only while running
    progress: bytes
    result: dict[str, Any] | None  # {"status": int, "body": {...}} once finished


def new_job_id() -> str:
    return str(uuid.uuid4())


def _part_id(job_id: str, token: str, number: int) -> str:
    return f"{job_id}#{token}#{number}"


class JobStore:
    def __init__(self, table_name: str, client: Any) -> None:
        self.table_name = table_name
        self.client = client

    def create(self, kind: str, host: str, request: dict[str, Any], progress: bytes) -> Job:
        job = Job(
            job_id=new_job_id(),
            kind=kind,
            host=host,
            state=JOB_RUNNING,
            version=0,
            request=request,
            progress=progress,
            result=None,
        )
        token, part_count = self._write_parts(job.job_id, progress)
        # A commit body may be megabytes (warnings, snapshot descriptions): it gets parts of its own.
        request_token, request_part_count = self._write_parts(
            job.job_id, zstandard.ZstdCompressor(level=3).compress(json.dumps(request).encode())
        )
        self.client.put_item(
            TableName=self.table_name,
            Item={
                "job_id": job.job_id,
                "kind": kind,
                "host": host,
                "state": JOB_RUNNING,
                "version": 0,
                "request_token": request_token,
                "request_part_count": request_part_count,
                "parts_token": token,
                "part_count": part_count,
                "expires_at": int(time.time()) + JOB_TTL_SECONDS,
            },
            ConditionExpression="attribute_not_exists(job_id)",
        )
        return job

    def load(self, job_id: str) -> Job | None:
        if "#" in job_id:
            return None
        item = self.client.get_item(
            TableName=self.table_name, Key={"job_id": job_id}, ConsistentRead=True
        ).get("Item")
        if item is None:
            return None
        version = int(item["version"])
        progress = b""
        request: dict[str, Any] = {}
        if item["state"] == JOB_RUNNING:
            progress = self._read_parts(job_id, item["parts_token"], int(item["part_count"]))
            packed = self._read_parts(job_id, item["request_token"], int(item["request_part_count"]))
            request = json.loads(zstandard.ZstdDecompressor().decompress(packed))
        return Job(
            job_id=job_id,
            kind=item["kind"],
            host=item["host"],
            state=item["state"],
            version=version,
            request=request,
            progress=progress,
            result=json.loads(item["result_json"]) if "result_json" in item else None,
        )

    def save_progress(self, job: Job, progress: bytes) -> bool:
        """Store a newer frontier; False if another poll advanced the job meanwhile (its work stands)."""
        token, part_count = self._write_parts(job.job_id, progress)
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"job_id": job.job_id},
                UpdateExpression="SET version = :next, parts_token = :token, part_count = :parts",
                ConditionExpression="version = :current AND #state = :running",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":next": job.version + 1,
                    ":current": job.version,
                    ":token": token,
                    ":parts": part_count,
                    ":running": JOB_RUNNING,
                },
            )
        except ClientError as error:
            if is_condition_failure(error):
                return False
            raise
        return True

    def finish_item(self, job: Job, state: str, result: dict[str, Any]) -> dict[str, Any]:
        """A transact item that closes the job, conditional on nobody else having advanced it."""
        return {
            "Update": {
                "TableName": self.table_name,
                "Key": {"job_id": job.job_id},
                "UpdateExpression": "SET #state = :state, result_json = :result, version = :next",
                "ConditionExpression": "version = :current AND #state = :running",
                "ExpressionAttributeNames": {"#state": "state"},
                "ExpressionAttributeValues": {
                    ":state": state,
                    ":result": json.dumps(result, sort_keys=True),
                    ":next": job.version + 1,
                    ":current": job.version,
                    ":running": JOB_RUNNING,
                },
            }
        }

    def finish(self, job: Job, state: str, result: dict[str, Any]) -> bool:
        """Close the job on its own (a failed commit); False if it was advanced or closed meanwhile."""
        try:
            self.client.update_item(**self.finish_item(job, state, result)["Update"])
        except ClientError as error:
            if is_condition_failure(error):
                return False
            raise
        return True

    def _write_parts(self, job_id: str, progress: bytes) -> tuple[str, int]:
        """Write progress under a fresh token; returns (token, part count).

        A fresh token per write means a racing poll never overwrites the parts the winner points at; the
        loser's parts expire with the TTL.
        """
        token = secrets.token_hex(4)
        pieces = [progress[i : i + _PART_BYTES] for i in range(0, len(progress), _PART_BYTES)] or [b""]
        expires_at = int(time.time()) + JOB_TTL_SECONDS
        for number, piece in enumerate(pieces):
            self.client.put_item(
                TableName=self.table_name,
                Item={
                    "job_id": _part_id(job_id, token, number),
                    "data": piece,
                    "expires_at": expires_at,
                },
            )
        return token, len(pieces)

    def _read_parts(self, job_id: str, token: str, part_count: int) -> bytes:
        pieces = []
        for number in range(part_count):
            item = self.client.get_item(
                TableName=self.table_name,
                Key={"job_id": _part_id(job_id, token, number)},
                ConsistentRead=True,
            ).get("Item")
            if item is None:
                raise RuntimeError(f"job {job_id} lost part {number} of {token}")
            pieces.append(bytes(item["data"].value if hasattr(item["data"], "value") else item["data"]))
        return b"".join(pieces)
