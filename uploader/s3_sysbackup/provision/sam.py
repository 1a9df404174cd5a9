"""`sam build` + `sam deploy` of template.yaml as one package's stack."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .aws import ProvisionError

# The restore role and hosts group have fixed names (the functions learn the role's ARN without a cycle).
CAPABILITIES = ("CAPABILITY_IAM", "CAPABILITY_NAMED_IAM")
# Next to the source checkout this module lives in: uploader/s3_sysbackup/provision/sam.py -> repo root.
CHECKOUT_TEMPLATE = Path(__file__).resolve().parents[3] / "template.yaml"


@dataclass(frozen=True)
class DeployPlan:
    template: Path
    package: str
    region: str
    parameters: dict[str, str] = field(default_factory=dict)
    confirm_changeset: bool = False

    @property
    def build_dir(self) -> Path:
        return self.template.parent / ".aws-sam" / "build"

    def build_command(self, sam: str) -> list[str]:
        return [sam, "build", "--template-file", str(self.template), "--build-dir", str(self.build_dir)]

    def deploy_command(self, sam: str) -> list[str]:
        overrides = {"PackageName": self.package, **self.parameters}
        return [
            sam,
            "deploy",
            "--template-file",
            str(self.build_dir / "template.yaml"),
            "--stack-name",
            self.package,
            "--region",
            self.region,
            "--capabilities",
            *CAPABILITIES,
            "--parameter-overrides",
            *(f"{key}={value}" for key, value in overrides.items()),
            # sam's managed artifacts bucket, one prefix per package.
            "--resolve-s3",
            "--s3-prefix",
            self.package,
            "--confirm-changeset" if self.confirm_changeset else "--no-confirm-changeset",
            # Re-running create-resources on an up-to-date stack is not an error.
            "--no-fail-on-empty-changeset",
        ]


def find_template(explicit: Path | None) -> Path:
    """--template, else the checkout's template.yaml, else ./template.yaml."""
    candidates = [explicit] if explicit is not None else [CHECKOUT_TEMPLATE, Path.cwd() / "template.yaml"]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(candidate) for candidate in candidates if candidate is not None)
    raise ProvisionError(f"no SAM template found (tried {tried}); pass --template")


def find_sam() -> str:
    sam = shutil.which("sam")
    if sam is None:
        raise ProvisionError("`sam` (AWS SAM CLI) is not on PATH: pip install aws-sam-cli")
    return sam


def parse_parameters(pairs: Sequence[str]) -> dict[str, str]:
    """`Key=Value` strings (repeatable --parameter) to a dict; PackageName comes from --package only."""
    parameters: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.isidentifier():
            raise ProvisionError(f"--parameter {pair!r} is not KEY=VALUE")
        if key == "PackageName":
            raise ProvisionError("set the package name with --package, not --parameter PackageName=...")
        parameters[key] = value
    return parameters


def run_step(command: list[str], cwd: Path) -> None:
    """Run one sam step with its output on our terminal; a failure names the step."""
    try:
        completed = subprocess.run(command, cwd=cwd, check=False)
    except OSError as error:
        raise ProvisionError(f"cannot run {command[0]}: {error}") from error
    if completed.returncode != 0:
        raise ProvisionError(f"`sam {command[1]}` failed with exit status {completed.returncode}")
