"""argv: RANK PORT MODE (die | hang). Two gloo ranks; rank 1 dies or hangs after one all-reduce, rank 0's
next all-reduce fails, and rank 0 prints what ``is_collective_error`` says of the exception torch raised."""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from mtpeft.trainer.loop import is_collective_error

rank, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
t = torch.ones(4)
dist.all_reduce(t)
if rank == 1:
    if mode == "hang":
        time.sleep(20)
    os._exit(0)
try:
    dist.all_reduce(t)
except Exception as exc:  # noqa: BLE001 - what torch raised is the subject
    print(f"RESULT {type(exc).__name__} {is_collective_error(exc)}", flush=True)
os._exit(0)
