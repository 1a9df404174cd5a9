"""Fixtures for tests against a running local stack (SeaweedFS, moto server, local API gateway)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysbackup_local.stack import LocalHost, LocalStack

_host_numbers = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the stack."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the whole session; stopped at the end even when tests fail."""
    root = tmp_path_factory.mktemp("local-stack")
    started = LocalStack.start(root / "state", root / "config")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def host_config(stack: LocalStack, tmp_path: Path) -> LocalHost:
    """A fresh host (its own identity and config dir), so tests do not see each other's backups."""
    name = f"host-{os.getpid()}-{next(_host_numbers)}"
    config_dir = tmp_path / "config"
    identity = stack.add_host(name, config_dir)
    return LocalHost(name=name, config_dir=config_dir, identity=identity)
