"""heap.pin_mmap_threshold: pins glibc's threshold where there is a glibc, and is harmless elsewhere."""

from __future__ import annotations

import ctypes.util
import gc
import platform

import pytest
from s3_sysbackup import heap
from s3_sysbackup.heap import cyclic_gc_paused


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


def test_the_cyclic_collector_is_paused_for_a_phase_and_restored_after():
    assert gc.isenabled()
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()
    with pytest.raises(ValueError), cyclic_gc_paused():
        raise ValueError("a failing phase")
    assert gc.isenabled()
