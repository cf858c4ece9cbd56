"""Collective failures are recognised by torch.distributed's exception types; gloo's plain
RuntimeError is the one documented fallback read from the message, and a bug is never mistaken for one."""

import subprocess
import sys

import pytest
import torch.distributed as dist

from distributed import REPO, env, free_port
from mtpeft.trainer.loop import is_collective_error

GLOO_PEER_DIED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                  "[127.0.0.1]:27569: Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                "waiting 5000ms for recv operation to complete")  # both as torch 2.13 raised them (see below)


@pytest.mark.parametrize("cls", [dist.DistError, dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError,
                                 dist.QueueEmptyError])
def test_torch_distributed_errors_by_type_whatever_the_message(cls):
    assert is_collective_error(cls("watchdog caught collective operation timeout"))
    assert is_collective_error(cls(""))


def test_gloo_plain_runtime_errors_by_message():
    assert is_collective_error(RuntimeError(GLOO_PEER_DIED)) and is_collective_error(RuntimeError(GLOO_TIMEOUT))


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied; socket, peer and connection in a message of a bug"),
    RuntimeError("the data loader timed out"),
    ValueError(GLOO_PEER_DIED),
    type("OutOfMemory", (RuntimeError,), {})(GLOO_TIMEOUT),
])
def test_other_errors_are_not_collective_failures(exc):
    assert not is_collective_error(exc)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_what_gloo_raises_when_a_peer_dies_or_hangs_is_recognised(mode):
    port = str(free_port())
    script = str(REPO / "tests" / "dist_scripts" / "gloo_failure.py")
    procs = [subprocess.Popen([sys.executable, script, str(rank), port, mode], env=env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    try:
        out, err = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    results = [line.split() for line in out.splitlines() if line.startswith("RESULT")]
    assert results and results[0][2] == "True", (out, err[-2000:])


def test_resume_log_keeps_readable_lines_up_to_the_checkpoint(tmp_path, capsys):
    """A line cut by a crash, NUL bytes a file system left after a power loss, a byte that is not
    UTF-8 or a record without a whole-number step was a traceback on resume; each is dropped, named
    in one notice, and the steps past the checkpoint go as before."""
    import json

    from mtpeft.trainer.loop import truncate_log

    log = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    log.write_bytes(b"\n".join([good[0].encode(), b'{"step": 2, "lo', good[1].encode(), b"\xff\xfe",
                                b'{"step": "2"}', good[2].encode(), b"\x00\x00\x00\x00"]) + b"\n")
    truncate_log(log, 2)
    assert log.read_text() == good[0] + "\n" + good[1] + "\n"
    out = capsys.readouterr().out
    assert "dropped 4 line(s) that cannot be read (line 2, 4, 5, ...)" in out
    truncate_log(log, 2)  # a clean log: nothing to say
    assert log.read_text() == good[0] + "\n" + good[1] + "\n" and capsys.readouterr().out == ""
