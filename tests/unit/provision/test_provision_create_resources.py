"""create-resources runs the real `sam build` / `sam deploy` command lines and prints the stack's outputs.

`sam` is replaced by a small executable on PATH that records its argv and working directory (a real
process, so the exact command line and environment are what a user's sam would get); the outputs come
from moto's CloudFormation, where a stand-in stack with the template's exports was created.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from provision_testkit import REGION, DeployedPackage, deploy_stand_in
from s3_sysbackup.cli import main

FAKE_SAM = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_SAM_EXIT_" + sys.argv[1].upper(), "0")))
"""


@pytest.fixture
def sam_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sam-calls.jsonl"
    sam = bin_dir / "sam"
    sam.write_text(FAKE_SAM.format(python=sys.executable, log=str(log)))
    sam.chmod(sam.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def template(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    path = project / "template.yaml"
    path.write_text("Transform: AWS::Serverless-2016-10-31\nResources: {}\n")
    return path


def sam_calls(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def expected_deploy(template: Path, package: str, *extra_parameters: str) -> list[str]:
    return [
        "deploy",
        "--template-file",
        str(template.parent / ".aws-sam" / "build" / "template.yaml"),
        "--stack-name",
        package,
        "--region",
        REGION,
        "--capabilities",
        "CAPABILITY_IAM",
        "CAPABILITY_NAMED_IAM",
        "--parameter-overrides",
        f"PackageName={package}",
        *extra_parameters,
        "--resolve-s3",
        "--s3-prefix",
        package,
        "--no-confirm-changeset",
        "--no-fail-on-empty-changeset",
    ]


def test_builds_then_deploys_the_package_and_prints_its_exports(
    sam_log: Path, template: Path, aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    package = "pkg-two"
    deploy_stand_in(package)  # what sam deploy would have left behind
    status = main(
        [
            "create-resources",
            "--package",
            package,
            "--region",
            REGION,
            "--template",
            str(template),
            "--parameter",
            "AlarmEmail=ops@example.com",
        ]
    )
    assert status == 0
    calls = sam_calls(sam_log)
    assert [call["argv"] for call in calls] == [
        [
            "build",
            "--template-file",
            str(template),
            "--build-dir",
            str(template.parent / ".aws-sam" / "build"),
        ],
        expected_deploy(template, package, "AlarmEmail=ops@example.com"),
    ]
    # sam reads samconfig.toml and builds relative paths from the template's directory.
    assert {call["cwd"] for call in calls} == {str(template.parent)}
    printed = capsys.readouterr().out
    assert f"package {package} in {REGION}" in printed
    for export in ("BucketName", "ApiEndpoint", "HostRoleArn"):
        assert f"(export {package}-{export})" in printed
    assert f"{package}-123456789012-{REGION}" in printed


def test_a_failed_build_stops_before_deploy(
    sam_log: Path,
    template: Path,
    aws: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_SAM_EXIT_BUILD", "3")
    assert main(["create-resources", "--region", REGION, "--template", str(template)]) == 1
    assert [call["argv"][0] for call in sam_calls(sam_log)] == ["build"]
    assert "`sam build` failed with exit status 3" in capsys.readouterr().err


def test_a_failed_deploy_is_reported_and_no_outputs_are_read(
    sam_log: Path,
    template: Path,
    deployed_package: DeployedPackage,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_SAM_EXIT_DEPLOY", "1")
    package = deployed_package.package
    status = main(["create-resources", "--package", package, "--region", REGION, "--template", str(template)])
    assert status == 1
    captured = capsys.readouterr()
    assert "`sam deploy` failed" in captured.err
    assert "BucketName" not in captured.out


def test_dry_run_prints_the_commands_and_runs_nothing(
    sam_log: Path, template: Path, aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create-resources", "--dry-run", "--region", REGION, "--template", str(template)]) == 0
    assert sam_calls(sam_log) == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sam build --template-file ")
    assert lines[1].split()[1:] == expected_deploy(template, "s3-sysbackup")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--package", "Bad_Name"], "package name 'Bad_Name'"),
        (["--package=-leading"], "package name '-leading'"),
        (["--parameter", "PackageName=other"], "--package"),
        (["--parameter", "no-equals-sign"], "KEY=VALUE"),
    ],
)
def test_bad_arguments_are_refused_before_sam_runs(
    sam_log: Path,
    template: Path,
    aws: None,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    status = main(["create-resources", "--region", REGION, "--template", str(template), *arguments])
    assert status == 1
    assert message in capsys.readouterr().err
    assert sam_calls(sam_log) == []


def test_a_missing_template_is_named(tmp_path: Path, aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "template.yaml"
    assert main(["create-resources", "--region", REGION, "--template", str(missing), "--dry-run"]) == 1
    assert str(missing) in capsys.readouterr().err
