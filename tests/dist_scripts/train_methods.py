"""Run under ``deepspeed --num_gpus 2`` on CPU: train every PEFT method in turn, in one launch.

argv: CONFIG OUT_DIR METHOD... Each method is a full ``mtpeft.trainer.recipe.train`` run of the demo
tasks (ZeRO-3 engine, schedule, evaluation, export) into OUT_DIR/<method>; the process group is
reused between runs. A recipe hook (``after_model``) takes measurements on the model the run built,
with every parameter gathered: each task's loss on a fixed probe batch of its training data and the
tuner's tensors, before training; the same after training. Rank 0 writes OUT_DIR/<method>.json, and
the trained model's outputs on ``probe_batch()`` to OUT_DIR/<method>.pt for the export check.
"""

import json
import sys
import time
from pathlib import Path

import torch

from mtpeft.trainer.build import load_tokenizer
from mtpeft.trainer.loop import prepare_tasks
from mtpeft.trainer.recipe import Hooks, train
from mtpeft.config import load_config
from mtpeft.data.dist import DistContext
from mtpeft.launch.rank_exit import end_rank_process, leave_process_group
from mtpeft.tuners.gather import gathered

LR = {"prompt": 0.1, "prefix": 0.1, "ia3": 0.05}  # the studies use larger rates for these methods
PROBE_ROWS = 8
_built = {}


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed input whose outputs the test recomputes from the export."""
    ids = torch.randint(5, 1000, (2, 15), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return ids, mask


def _measure(model, cfg) -> dict:
    """Per-task probe losses (the same rows before and after training) and the tuner's tensors."""
    tok = load_tokenizer(cfg.model.name_or_path)
    params = model.tuner.named_tensors(model)
    with gathered(list(params.values())):  # before any forward: ZeRO-3's hooks re-partition after one
        tensors = {k: p.detach().clone() for k, p in params.items()}
    losses = {}
    with gathered(list(model.parameters())), torch.no_grad():
        was_training = model.training
        model.eval()
        for t in prepare_tasks(cfg):
            rows = [t.train_set[i] for i in range(PROBE_ROWS)]
            batch = t.kind.collate([t.kind.encode(r, tok, cfg.train.max_seq_len) for r in rows], tok.pad_token_id)
            losses[t.name] = float(t.kind.loss(model, t.name, batch, DistContext(0, 1)))
        model.train(was_training)
    return {"losses": losses, "tensors": tensors}


class MeasureBeforeTraining(Hooks):
    def after_model(self, recipe) -> None:
        _built.update(model=recipe.model, cfg=recipe.cfg, before=_measure(recipe.model, recipe.cfg))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, out = args[0], Path(args[1])
    for method in args[2:]:
        cfg = load_config(config, [f"peft.method={method}", f"output.dir={out / method}",
                                   f"train.lr={LR.get(method, 1e-2)}", "peft.num_virtual_tokens=8",
                                   "peft.bottleneck=16", "peft.r=8",
                                   *[f"tasks.{i}.max_eval_examples=4" for i in range(4)]])
        start = time.perf_counter()
        run_dir = train(cfg, hooks=[MeasureBeforeTraining()])
        seconds = time.perf_counter() - start
        model, before = _built["model"], _built["before"]
        after = _measure(model, cfg)
        moved = max((after["tensors"][k] - v).abs().max().item() for k, v in before["tensors"].items())
        ids, mask = probe_batch()
        model.eval()
        with torch.no_grad():  # every rank runs the same forwards: ZeRO-3 gathers inside them
            model.set_task("defect")
            outputs = {"pooled": model.pooled(ids, mask), "logits": model.lm_logits(ids, mask, task="codegen")}
        if torch.distributed.get_rank() == 0:
            torch.save(outputs, out / f"{method}.pt")
            (out / f"{method}.json").write_text(json.dumps({"run_dir": str(run_dir), "moved": moved,
                                                            "loss_before": before["losses"],
                                                            "loss_after": after["losses"], "seconds": seconds}))


if __name__ == "__main__":
    main()
    leave_process_group()
    end_rank_process()  # no teardown abort after the results are written (launch.rank_exit)
