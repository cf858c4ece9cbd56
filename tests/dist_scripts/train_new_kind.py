"""Run under ``deepspeed --num_gpus 2`` on CPU: register a task kind from its own file with one
registry line, then train a RunConfig that uses it (argv: CONFIG)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from focal_kind import FocalClassify  # noqa: E402

from mtpeft.config import load_config  # noqa: E402
from mtpeft.tasks.kinds import KINDS  # noqa: E402
from mtpeft.trainer.recipe import train  # noqa: E402
from mtpeft.launch.rank_exit import end_rank_process  # noqa: E402

KINDS[FocalClassify.name] = FocalClassify  # the one registry line

if __name__ == "__main__":
    train(load_config(sys.argv[-1]), leave_group=True)  # the launcher puts --local_rank=N first
    end_rank_process()  # no teardown abort after the run (launch.rank_exit)
