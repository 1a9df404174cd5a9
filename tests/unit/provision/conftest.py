"""The provisioning tests' fixtures, defined in provision_testkit (a uniquely named module to import from)."""

from provision_testkit import aws, deployed_package  # noqa: F401
