"""Operations promises of template.yaml: alarms reach the admin's topic, stale hosts are checked daily,
and what create-resources / write-config assume about the stack (exports, capabilities) holds.

The template is translated offline as in test_template.py (its helpers are reused), so SAM's generated
roles, schedule rules and permissions are what is checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import tomllib
from s3_sysbackup.provision import exports as package_exports
from s3_sysbackup.provision.sam import CAPABILITIES
from test_template import (
    REPO_ROOT,
    allowed,
    function_role,
    load_sam_template,
    render,
    role_statements,
    translate,
)

DEAD_LETTER_ALARM_METRIC = ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
ERRORS_METRIC = ("AWS/Lambda", "Errors")


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    return load_sam_template()


@pytest.fixture(scope="module")
def cfn(sam_template: dict[str, Any]) -> dict[str, Any]:
    return translate(sam_template)


@pytest.fixture(scope="module")
def resources(cfn: dict[str, Any]) -> dict[str, Any]:
    return cfn["Resources"]


def of_type(resources: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {logical_id: body for logical_id, body in resources.items() if body["Type"] == kind}


def alarms_on(resources: dict[str, Any], namespace: str, metric: str) -> dict[str, str]:
    """Rendered dimension value (queue name, function) -> alarm logical id, for one metric."""
    watched = {}
    for logical_id, alarm in of_type(resources, "AWS::CloudWatch::Alarm").items():
        properties = alarm["Properties"]
        if (properties["Namespace"], properties["MetricName"]) == (namespace, metric):
            for dimension in properties["Dimensions"]:
                watched[render(dimension["Value"])] = logical_id
    return watched


def references(value: Any) -> Iterator[str]:
    """Logical ids a template value refers to (Ref, GetAtt, ${X} / ${X.Attr} in Sub)."""
    if isinstance(value, dict):
        if "Ref" in value and isinstance(value["Ref"], str):
            yield value["Ref"]
        if "Fn::GetAtt" in value:
            target = value["Fn::GetAtt"]
            yield (target[0] if isinstance(target, list) else target.split(".")[0])
        if "Fn::Sub" in value:
            text = value["Fn::Sub"] if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"][0]
            for part in text.split("${")[1:]:
                yield part.split("}")[0].split(".")[0]
        for item in value.values():
            yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


# ---------------------------------------------------------------- alarms


def test_every_dead_letter_queue_has_an_alarm(resources: dict[str, Any]) -> None:
    dead_letter_queues = {
        render(queue["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]).removeprefix("${").split(".")[0]
        for queue in of_type(resources, "AWS::SQS::Queue").values()
        if "RedrivePolicy" in queue["Properties"]
    }
    assert dead_letter_queues
    watched = alarms_on(resources, *DEAD_LETTER_ALARM_METRIC)
    for queue in dead_letter_queues:
        assert f"${{{queue}.QueueName}}" in watched, f"{queue} has no alarm"


def scheduled_functions(sam_template: dict[str, Any]) -> set[str]:
    return {
        logical_id
        for logical_id, resource in sam_template["Resources"].items()
        if resource["Type"] == "AWS::Serverless::Function"
        and any(
            event["Type"] in ("Schedule", "ScheduleV2")
            for event in (resource["Properties"].get("Events") or {}).values()
        )
    }


def test_every_scheduled_function_has_an_errors_alarm(
    sam_template: dict[str, Any], resources: dict[str, Any]
) -> None:
    """A scheduled run has no queue to dead-letter into: only an Errors alarm tells anyone it failed."""
    scheduled = scheduled_functions(sam_template)
    assert {"StaleHostsFunction"} <= scheduled
    watched = alarms_on(resources, *ERRORS_METRIC)
    for function in scheduled:
        assert f"${{{function}}}" in watched, f"{function} failures would go unnoticed"


def topic_subscriptions(resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        logical_id: body
        for logical_id, body in of_type(resources, "AWS::SNS::Subscription").items()
        if render(body["Properties"]["TopicArn"]) == "${AlarmTopic}"
    }


def test_alarms_notify_the_topic_the_admin_address_subscribes_to(resources: dict[str, Any]) -> None:
    for alarm in of_type(resources, "AWS::CloudWatch::Alarm").values():
        assert [render(action) for action in alarm["Properties"]["AlarmActions"]] == ["${AlarmTopic}"]
    # No inline subscription: it would tie the address to the topic's own existence.
    assert "Subscription" not in resources["AlarmTopic"].get("Properties", {})
    ((logical_id, subscription),) = topic_subscriptions(resources).items()
    assert subscription["Condition"] == "HasAlarmEmail", logical_id
    properties = subscription["Properties"]
    assert (properties["Protocol"], properties["Endpoint"]) == ("email", {"Ref": "AlarmEmail"})


def test_the_subscription_condition_is_an_address_being_given(
    sam_template: dict[str, Any], cfn: dict[str, Any]
) -> None:
    expected = {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmEmail"}, ""]}]}
    assert cfn["Conditions"]["HasAlarmEmail"] == expected
    assert sam_template["Parameters"]["AlarmEmail"]["Default"] == ""


def test_topic_alarms_stale_host_check_and_export_exist_without_an_address(
    cfn: dict[str, Any], resources: dict[str, Any]
) -> None:
    """Only the e-mail subscription depends on AlarmEmail; the topic and whatever uses it always exist."""
    assert "Condition" not in resources["AlarmTopic"]
    assert "Condition" not in cfn["Outputs"]["AlarmTopicArn"]
    users = {
        logical_id: body.get("Condition")
        for logical_id, body in {**resources, **cfn["Outputs"]}.items()
        if "AlarmTopic" in set(references(body.get("Properties", body.get("Value"))))
    }
    subscriptions = set(topic_subscriptions(resources))
    assert {"StaleHostsFunction", "AlarmTopicArn", *subscriptions} <= set(users)
    assert len(of_type(resources, "AWS::CloudWatch::Alarm")) >= 5
    unconditional = {
        logical_id: condition for logical_id, condition in users.items() if logical_id not in subscriptions
    }
    assert all(condition is None for condition in unconditional.values()), unconditional
    # Nor do the stale-host check's generated parts (role, schedule rule, permission, log group).
    conditional = {
        logical_id
        for logical_id, body in {**resources, **cfn["Outputs"]}.items()
        if body.get("Condition") == "HasAlarmEmail"
    }
    assert conditional == subscriptions


# ---------------------------------------------------------------- stale-host check


def test_stale_host_check_runs_daily(resources: dict[str, Any]) -> None:
    rules = [
        rule
        for rule in of_type(resources, "AWS::Events::Rule").values()
        if any(
            render(target["Arn"]) == "${StaleHostsFunction.Arn}" for target in rule["Properties"]["Targets"]
        )
    ]
    (rule,) = rules
    expression = rule["Properties"]["ScheduleExpression"]
    assert expression in ("rate(1 day)",) or (
        expression.startswith("cron(") and expression.split()[2:4] == ["*", "*"]
    ), expression


def test_stale_host_check_reads_heads_lists_hosts_and_publishes_only(resources: dict[str, Any]) -> None:
    role = function_role(resources, "StaleHostsFunction")
    assert allowed(role, "dynamodb:") == {"dynamodb:batchgetitem": {"${ManifestTable.Arn}"}}
    assert allowed(role, "iam:") == {"iam:getgroup": {"${HostsGroup.Arn}"}}
    assert allowed(role, "sns:") == {"sns:publish": {"${AlarmTopic}"}}
    services = {action.split(":")[0] for statement in role_statements(role) for action in statement["Action"]}
    assert services == {"dynamodb", "iam", "sns"}


def test_stale_host_check_is_configured_from_the_stack(
    sam_template: dict[str, Any], resources: dict[str, Any]
) -> None:
    variables = resources["StaleHostsFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["ALARM_TOPIC_ARN"] == {"Ref": "AlarmTopic"}
    assert variables["HOSTS_GROUP"] == {"Ref": "HostsGroup"}
    assert variables["STALE_AFTER_HOURS"] == {"Ref": "StaleAfterHours"}
    # "A host that has not backed up in 2 days" is the default.
    assert sam_template["Parameters"]["StaleAfterHours"]["Default"] == 48


def test_the_schedule_sample_event_is_what_the_rule_sends() -> None:
    event = json.loads((REPO_ROOT / "events" / "stale_hosts-daily-check.json").read_text())
    assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.events"
    assert "StaleHostsFunction" in event["resources"][0]


# ---------------------------------------------------------------- what the provisioning commands assume


def export_suffixes(cfn: dict[str, Any]) -> set[str]:
    names = [render(output["Export"]["Name"]) for output in cfn["Outputs"].values()]
    # Every export embeds the package name, so several packages coexist in one region.
    assert all(name.startswith("${PackageName}-") for name in names), names
    return {name.removeprefix("${PackageName}-") for name in names}


def test_write_config_reads_exports_the_template_defines(cfn: dict[str, Any]) -> None:
    exported = export_suffixes(cfn)
    for suffix in (
        package_exports.BUCKET_EXPORT,
        package_exports.API_ENDPOINT_EXPORT,
        package_exports.HOSTS_GROUP_EXPORT,
        package_exports.HOST_ROLE_EXPORT,
        package_exports.RESTORE_ROLE_EXPORT,
    ):
        assert suffix in exported


def test_package_name_rule_matches_the_template_parameter(sam_template: dict[str, Any]) -> None:
    assert sam_template["Parameters"]["PackageName"]["AllowedPattern"] == package_exports.PACKAGE_NAME.pattern
    assert sam_template["Parameters"]["PackageName"]["Default"] == package_exports.DEFAULT_PACKAGE


def test_samconfig_defaults_agree_with_create_resources() -> None:
    samconfig = tomllib.loads((REPO_ROOT / "samconfig.toml").read_text())
    deploy = samconfig["default"]["deploy"]["parameters"]
    assert deploy["capabilities"].split() == list(CAPABILITIES)
    assert samconfig["default"]["global"]["parameters"]["stack_name"] == package_exports.DEFAULT_PACKAGE
    assert f'PackageName="{package_exports.DEFAULT_PACKAGE}"' in deploy["parameter_overrides"]
