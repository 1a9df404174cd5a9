"""Daily check (EventBridge schedule): which hosts have not committed a backup for a while?

A per-host CloudWatch alarm would need every host known when the stack is deployed. The hosts are known
at run time instead: they are the members of the package's hosts group (one IAM user per host; a host
using the host role signs as its own user name too). Each host's `HEAD` item in the ManifestTable names
its current manifest, whose id starts with the commit's server time (`YYYYMMDDTHHMMSSZ-...`). So one
GetGroup (paged) and one BatchGetItem per 100 hosts give every host's last backup, without a Scan; and a
host that never backed up at all is caught too (once its user is older than the limit). A retired host
is removed by deleting its IAM user, which also revokes its access.

Stale hosts go to the alarm topic in one message, and to a `StaleHosts` metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext
from sysbackup_backend.catalogue import HEAD_ID
from sysbackup_backend.clients import dynamodb_client
from sysbackup_backend.dynamo import batch_get
from sysbackup_backend.settings import get_settings

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)

DEFAULT_STALE_AFTER_HOURS = 48
MANIFEST_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class HostHead:
    host: str
    user_created: datetime
    last_backup: datetime | None  # None: no manifest yet (or a HEAD that is not a manifest id)


@dataclass(frozen=True)
class CheckSettings:
    topic_arn: str
    hosts_group: str
    stale_after: timedelta


def check_settings() -> CheckSettings:
    topic_arn = os.environ.get("ALARM_TOPIC_ARN", "")
    if not topic_arn.startswith("arn:"):
        raise RuntimeError(f"ALARM_TOPIC_ARN must be an SNS topic ARN, got {topic_arn!r}")
    raw_hours = os.environ.get("STALE_AFTER_HOURS", str(DEFAULT_STALE_AFTER_HOURS))
    try:
        hours = int(raw_hours)
    except ValueError:
        raise RuntimeError(f"STALE_AFTER_HOURS must be a whole number of hours, got {raw_hours!r}") from None
    if hours < 1:
        raise RuntimeError(f"STALE_AFTER_HOURS must be >= 1, got {hours}")
    hosts_group = os.environ.get("HOSTS_GROUP", "")
    if not hosts_group:
        raise RuntimeError("HOSTS_GROUP (the package's hosts IAM group) is not set")
    return CheckSettings(topic_arn, hosts_group, timedelta(hours=hours))


def commit_time(manifest_id: str) -> datetime | None:
    try:
        return datetime.strptime(manifest_id[:16], MANIFEST_TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def host_users(iam: Any, group: str) -> dict[str, datetime]:
    """Host name -> its IAM user's creation time, for every member of the hosts group."""
    users: dict[str, datetime] = {}
    for page in iam.get_paginator("get_group").paginate(GroupName=group):
        for user in page.get("Users", []):
            users[str(user["UserName"])] = user["CreateDate"]
    return users


def host_heads(client: Any, table: str, users: dict[str, datetime]) -> list[HostHead]:
    keys = [{"host": host, "manifest_id": HEAD_ID} for host in sorted(users)]
    current = {str(item["host"]): str(item.get("current", "")) for item in batch_get(client, table, keys)}
    return [
        HostHead(host, created, commit_time(current[host]) if host in current else None)
        for host, created in users.items()
    ]


def stale_hosts(heads: list[HostHead], now: datetime, settings: CheckSettings) -> list[HostHead]:
    """Hosts whose last commit is older than the limit, or that never committed though old enough."""
    cutoff = now - settings.stale_after
    stale = [head for head in heads if (head.last_backup or head.user_created) < cutoff]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(stale, key=lambda head: (head.last_backup or oldest, head.host))


def alarm_message(stale: list[HostHead], now: datetime, settings: CheckSettings) -> tuple[str, str]:
    """(subject, body) for the topic: e-mail subscribers read it as is."""
    hours = int(settings.stale_after.total_seconds() // 3600)
    subject = f"s3-sysbackup: {len(stale)} host(s) without a backup for {hours} h"
    lines = [
        f"Hosts whose last committed backup is older than {hours} hours (checked {now:%Y-%m-%d %H:%M} UTC):"
    ]
    for head in stale:
        if head.last_backup is None:
            lines.append(f"  {head.host}: no backup since its IAM user was made {head.user_created:%Y-%m-%d}")
        else:
            age_days = (now - head.last_backup).total_seconds() / 86400
            lines.append(
                f"  {head.host}: last backup {head.last_backup:%Y-%m-%d %H:%M} UTC ({age_days:.1f} days ago)"
            )
    lines.append("Check the host's s3-sysbackup.service journal (journalctl -u s3-sysbackup).")
    lines.append("A retired host: delete its IAM user (that also revokes its access).")
    return subject[:100], "\n".join(lines)  # SNS subjects are at most 100 characters


@lru_cache(maxsize=1)
def sns_client() -> Any:
    return boto3.client("sns")


@lru_cache(maxsize=1)
def iam_client() -> Any:
    return boto3.client("iam")


@tracer.capture_method
def run_check(now: datetime) -> list[HostHead]:
    settings = check_settings()
    users = host_users(iam_client(), settings.hosts_group)
    heads = host_heads(dynamodb_client(), get_settings().manifest_table, users)
    stale = stale_hosts(heads, now, settings)
    metrics.add_metric(name="HostsChecked", unit=MetricUnit.Count, value=len(heads))
    metrics.add_metric(name="StaleHosts", unit=MetricUnit.Count, value=len(stale))
    if stale:
        subject, body = alarm_message(stale, now, settings)
        sns_client().publish(TopicArn=settings.topic_arn, Subject=subject, Message=body)
        logger.warning("stale hosts reported", extra={"hosts": [head.host for head in stale]})
    else:
        logger.info("every host backed up recently", extra={"hosts": len(heads)})
    return stale


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def lambda_handler(event: EventBridgeEvent, context: LambdaContext) -> dict[str, Any]:
    # The scheduled event's own time, so a delayed or replayed invocation judges the hosts as of then.
    now = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    stale = run_check(now)
    return {"hosts_stale": [head.host for head in stale]}
