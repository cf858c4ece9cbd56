"""Unlinking DeepSpeed's shared-memory workspace name: the object made under that name is gone, and a
mapping made before keeps working (the end-to-end check, a real 2-rank run leaving nothing in
/dev/shm, is in tests/trainer/test_zero3_training.py)."""

import mmap
import os

import pytest

from mtpeft.launch.deepspeed_shm import SHM_ROOT, release_workspace_name, workspace_name

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm")


def test_the_name_is_the_one_deepspeed_builds(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29611")
    # shm.cpp: "%s_%d_%s_%s" of (deepspeed_allreduce_buffer, getuid(), addr, port), then "_%d" of rank
    assert workspace_name(1) == f"deepspeed_allreduce_buffer_{os.getuid()}_10.0.0.7_29611_1"


def test_release_unlinks_the_name_and_keeps_the_mapping(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", f"test{os.getpid()}")
    path = SHM_ROOT / workspace_name(0)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # what shm_open does on Linux
    try:
        os.ftruncate(fd, 4096)
        view = mmap.mmap(fd, 4096)
        view[:5] = b"ranks"
        assert release_workspace_name(0) and not path.exists()
        assert view[:5] == b"ranks"  # the mapping outlives the name
        view.close()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    assert not release_workspace_name(0)  # nothing to unlink: no error
