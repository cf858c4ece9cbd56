"""A lock file left in the torch-extensions cache by a killed DeepSpeed op build: named in one error
line before a run starts (it would otherwise wait on it forever); a build in progress is left alone."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builders import demo_config_file
from mtpeft.cli import main
from mtpeft.errors import LaunchError
import mtpeft.launch.extension_lock as extension_lock
from mtpeft.launch.extension_lock import check_extension_locks, extensions_root, filesystem_type

def _fake_build(root: Path, op: str = "deepspeed_shm_comm", age_s: float = 3600) -> Path:
    folder = root / op
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("rule cxx\n")
    lock = folder / "lock"
    lock.touch()
    for p in (folder / "build.ninja", lock):
        os.utime(p, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_lock_is_named(tmp_path):
    lock = _fake_build(tmp_path)
    with pytest.raises(LaunchError, match=rf"{lock}: a DeepSpeed op build was interrupted .*\(rm {lock}\)"):
        check_extension_locks(tmp_path)
    assert lock.exists()  # never removed for the user


def test_a_lock_held_by_a_live_build_is_waited_on(tmp_path):
    lock = _fake_build(tmp_path)
    fd = os.open(lock, os.O_RDONLY)  # torch's builder keeps its lock open while it builds
    try:
        assert check_extension_locks(tmp_path) == []
    finally:
        os.close(fd)


def test_on_a_local_disk_an_unheld_lock_is_stale_within_seconds(tmp_path):
    assert filesystem_type(tmp_path) not in extension_lock.SHARED_FILE_SYSTEMS
    _fake_build(tmp_path, age_s=30)
    with pytest.raises(LaunchError, match=r"has not changed for 30 s"):
        check_extension_locks(tmp_path)


def test_on_a_shared_file_system_another_node_may_be_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(extension_lock, "filesystem_type", lambda path: "nfs4")
    lock = _fake_build(tmp_path, age_s=60)
    assert check_extension_locks(tmp_path) == [lock]
    assert capsys.readouterr().err.startswith(f"note: waiting for {lock}")
    hour_ago = time.time() - 3600
    os.utime(lock.parent / "build.ninja", (hour_ago, hour_ago))
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.raises(LaunchError, match=r"has not changed for 60 min"):
        check_extension_locks(tmp_path)


def test_a_young_lock_nobody_here_holds_is_a_note(tmp_path, capsys):
    lock = _fake_build(tmp_path, age_s=5)
    assert check_extension_locks(tmp_path) == [lock]
    err = capsys.readouterr().err
    assert err.startswith(f"note: waiting for {lock}") and "error" not in err


def test_the_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root().name.startswith("py") and extensions_root().parent.name == "torch_extensions"


def _hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_run_stops_with_one_error_line_before_it_starts(tmp_path, capsys, monkeypatch, command):
    cache = tmp_path / "extensions"
    lock = _fake_build(cache)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = demo_config_file(tmp_path, output__dir=str(tmp_path / "run"))
    before = _hashes(tmp_path)
    argv = ["train", str(cfg)] if command == "train" else ["demo", "--config", str(cfg), "--out", str(tmp_path / "d")]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {lock}: a DeepSpeed op build"), err
    assert _hashes(tmp_path) == before
    assert not (tmp_path / "d").exists()


def test_a_lock_released_while_proc_is_read_is_a_load_that_ended(tmp_path, monkeypatch, capsys):
    """The race CI hit: another rank loads the built op (torch takes the lock for a moment, the build
    files are old) and lets go while this rank reads /proc."""
    lock = _fake_build(tmp_path, age_s=360)
    lock.touch()  # taken just now

    def released_while_looking(path):
        path.unlink()
        return []

    monkeypatch.setattr(extension_lock, "holders", released_while_looking)
    assert check_extension_locks(tmp_path) == []
    assert capsys.readouterr().err == ""


def test_a_lock_taken_again_while_proc_is_read_is_left_alone(tmp_path, monkeypatch):
    lock = _fake_build(tmp_path, age_s=360)

    def taken_again(path):
        path.unlink()
        path.touch()  # another process's turn: a new file
        return []

    monkeypatch.setattr(extension_lock, "holders", taken_again)
    assert check_extension_locks(tmp_path) == []
    assert lock.exists()


def test_a_lock_between_close_and_remove_is_not_reported(tmp_path, capsys):
    """torch closes its lock, then removes it: a fresh unheld lock that goes within moments was a load."""
    lock = _fake_build(tmp_path, age_s=360)
    lock.touch()
    timer = threading.Timer(0.1, lock.unlink)
    timer.start()
    try:
        assert check_extension_locks(tmp_path) == []
    finally:
        timer.join()
    assert capsys.readouterr().err == ""


def test_a_stale_lock_is_still_named_when_other_processes_load_ops_beside_it(tmp_path):
    """Another op's lock coming and going does not hide a stale one."""
    stale = _fake_build(tmp_path, op="cpu_adam")
    _fake_build(tmp_path, op="deepspeed_shm_comm")
    (tmp_path / "deepspeed_shm_comm" / "lock").unlink()
    with pytest.raises(LaunchError, match=rf"{stale}: a DeepSpeed op build was interrupted"):
        check_extension_locks(tmp_path)


def test_torch_loads_in_another_process_never_look_stale(tmp_path):
    """Another process takes and releases the lock through torch's own FileBaton, as each load of a built
    op does, while this one checks over and over."""
    lock = _fake_build(tmp_path, age_s=360)
    lock.unlink()
    loader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
        "end = time.time() + 2\nwhile time.time() < end:\n"
        "    b = FileBaton(sys.argv[1])\n    if b.try_acquire():\n        time.sleep(0.002)\n        b.release()\n"
    ), str(lock)])
    try:
        checks = 0
        while loader.poll() is None:
            assert check_extension_locks(tmp_path) == []
            checks += 1
    finally:
        loader.wait()
    assert checks > 10 and not lock.exists()
