"""The local stack runs gc as the gc identity and feeds the retention worker from its queue, both from
template.yaml (the role and the SQS event), with no special case for either function."""

from __future__ import annotations

from pathlib import Path

from sysbackup_local.identities import KIND_FUNCTION, KIND_GC, IdentityRegistry, new_identity
from sysbackup_local.supervisor import Supervisor, function_environment
from sysbackup_local.template import parse_template

REPO = Path(__file__).resolve().parents[3]


def test_gc_runs_under_its_template_role_and_the_extender_on_its_queue() -> None:
    template = parse_template(REPO / "template.yaml")
    assert template.function("gc").role_logical_id == "GcRole"
    assert template.function("verify_pack").role_logical_id is None
    (trigger,) = template.function("extend_retention").sqs_triggers
    assert trigger.queue_logical_id == "RetentionQueue" and trigger.report_batch_item_failures
    assert template.queues["RetentionQueue"].dead_letter_logical_id == "RetentionDeadLetterQueue"


def test_a_function_gets_its_roles_identity(tmp_path: Path) -> None:
    template = parse_template(REPO / "template.yaml")
    registry = IdentityRegistry(tmp_path / "identities.json")
    gc = registry.add(new_identity(KIND_GC, KIND_GC))
    verifier = registry.add(new_identity("VerifyPackFunction", KIND_FUNCTION))
    supervisor = Supervisor.__new__(Supervisor)  # only the registry is needed to pick identities
    supervisor.registry = registry
    assert supervisor.function_identity(template.function("gc")) == gc
    assert supervisor.function_identity(template.function("verify_pack")) == verifier


def test_a_queue_reference_in_the_environment_becomes_the_queue_url(tmp_path: Path) -> None:
    template = parse_template(REPO / "template.yaml")
    url = "http://127.0.0.1:5000/000000000000/s3-sysbackup-RetentionQueue"
    stack = {
        "endpoints": {"s3": "http://s3", "moto": "http://moto"},
        "repo": str(REPO),
        "state_dir": str(tmp_path),
        "queues": {"RetentionQueue": {"name": "s3-sysbackup-RetentionQueue", "url": url, "arn": "arn"}},
    }
    env = function_environment(template.function("gc").environment, "GcFunction", "k", "s", stack)
    assert env["RETENTION_QUEUE_URL"] == url
    assert env["BUCKET_NAME"] == template.bucket.name  # other values pass through untouched
