"""heap.pin_mmap_threshold: pins glibc's threshold where there is a glibc, and is harmless elsewhere."""

from __future__ import annotations

import ctypes.util
import platform

import pytest
from s3_sysbackup import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_pins_the_threshold_on_glibc() -> None:
    assert heap.pin_mmap_threshold() is True


def test_without_a_c_library_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert heap.pin_mmap_threshold() is False


def test_a_library_without_mallopt_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMallopt:
        def __init__(self, name: str) -> None:
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert heap.pin_mmap_threshold() is False
