"""wait_idle: the stack is idle once every SQS-triggered function's queue is empty and no batch is running."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from sysbackup_local.supervisor import Supervisor


@dataclass
class FakePoller:
    queue_url: str
    busy: bool = False
    held: bool = False


@dataclass
class FakeSqs:
    waiting: dict[str, int] = field(default_factory=dict)

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:
        assert AttributeNames == ["ApproximateNumberOfMessages"]
        return {"Attributes": {"ApproximateNumberOfMessages": str(self.waiting.get(QueueUrl, 0))}}


def supervisor_with(pollers: list[FakePoller], sqs: FakeSqs) -> Supervisor:
    """The supervisor's idle logic only, without a stack behind it."""
    supervisor = object.__new__(Supervisor)
    supervisor.pollers = pollers  # type: ignore[assignment]
    supervisor.sqs = sqs
    return supervisor


def test_empty_queues_and_idle_pollers_are_idle() -> None:
    supervisor = supervisor_with([FakePoller("verify"), FakePoller("retention")], FakeSqs())
    assert supervisor.wait_idle(timeout=5)


def test_a_waiting_message_or_a_running_batch_is_not_idle() -> None:
    assert not supervisor_with([FakePoller("verify")], FakeSqs({"verify": 1})).wait_idle(timeout=0.5)
    assert not supervisor_with([FakePoller("verify", busy=True)], FakeSqs()).wait_idle(timeout=0.5)


def test_idle_once_the_verifier_has_handled_the_commits_message() -> None:
    poller = FakePoller("verify")
    sqs = FakeSqs({"verify": 1})
    supervisor = supervisor_with([poller], sqs)

    def deliver() -> None:
        poller.busy, sqs.waiting["verify"] = True, 0  # received: invisible, being handled
        threading.Timer(0.5, lambda: setattr(poller, "busy", False)).start()

    threading.Timer(0.3, deliver).start()
    assert supervisor.wait_idle(timeout=10)
    assert not poller.busy and sqs.waiting["verify"] == 0


def test_held_deliveries_can_never_drain() -> None:
    supervisor = supervisor_with([FakePoller("verify", held=True)], FakeSqs())
    with pytest.raises(RuntimeError, match="held"):
        supervisor.wait_idle(timeout=5)
