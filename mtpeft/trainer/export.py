"""Export the shared PEFT module and the task heads, and load them back.

Layout of an export folder:
  adapter_model.safetensors  the tuner's tensors. For lora, ia3, prompt and prefix these are HF peft's
                             key names and ``adapter_config.json`` (peft's own config class) sits beside
                             them, so ``PeftModel.from_pretrained(base, DIR)`` loads the folder.
                             serial_adapter, parallel_adapter and mtl_lora have no HF peft counterpart:
                             their keys are the backbone module path + parameter name
                             (``<path>.adapter_down [b, in]``, ``.adapter_down_bias [b]``,
                             ``.adapter_up [out, b]``, ``.adapter_up_bias [out]``;
                             ``<path>.lora_A [r, in]``, ``.lora_B [out, r]``, ``.lora_T [tasks, r]``
                             with rows in ``peft.task_order``) and no adapter_config.json is written.
  heads.safetensors          ``<task>.<head parameter>`` for every task with a head.
  tasks.json                 the manifest: base model, quantization, ``peft`` (method, ``format``:
                             hf_peft | mtpeft, the method's settings, ``tensors``: key → shape),
                             per task its kind, format, head class and head tensor names, and
                             ``files``: the SHA-256 of every other file of the export (so a later
                             ``--force`` export into a folder shared with a user's files can tell
                             its own previous files from the user's).

Under ZeRO-3 each rank holds a slice of every trainable tensor, so the tensors are gathered
explicitly before rank 0 writes them (a consolidated 16-bit state dict would drop the 4-bit quant
state, and an ungathered save writes empty adapters). The export is written to a temporary folder
and renamed into place, so an interrupted export never replaces a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtpeft.config import RunConfig
from mtpeft.data.dist import DistContext
from mtpeft.errors import CheckpointError, UserError
from mtpeft.failed_writes import FREE_SPACE, writing
from mtpeft.output_folder import check_folder_is_ours, check_output_folder
from mtpeft.trainer.damaged import reading
from mtpeft.tuners.base import check_keys
from mtpeft.tuners.gather import gathered

ADAPTER_FILE = "adapter_model.safetensors"
HEADS_FILE = "heads.safetensors"
MANIFEST_FILE = "tasks.json"
PEFT_CONFIG_FILE = "adapter_config.json"
EXPORT_FILES = (ADAPTER_FILE, HEADS_FILE, MANIFEST_FILE, PEFT_CONFIG_FILE)


def check_export_target(out_dir: Path, run_dir: Path | None = None, force: bool = False, option: str = "--out") -> None:
    """Refuse an export folder that would cost the user a file: mtpeft replaces only a folder that is
    new, empty, or holds nothing but a previous export's files (``EXPORT_FILES``). With ``force`` it
    writes its files beside others' (also into the run folder itself), never over an existing file."""
    out_dir = Path(out_dir)
    if run_dir is not None and out_dir.resolve() == Path(run_dir).resolve() and not force:
        raise UserError(f"{option} {out_dir} is the run folder itself; exporting there would replace its checkpoints, "
                        f"config and logs: name a new folder (e.g. {out_dir / 'export2'}), or add --force to write "
                        f"the export files beside the run's own")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{option} {out_dir} is an existing file; name a folder to export into")
    check_output_folder(out_dir, option)
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
        if foreign and not force:
            raise UserError(f"{option} {out_dir} holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if
                            len(foreign) > 1 else "") + ", which an export did not write; an export replaces its "
                            "folder, so name a new or empty folder (or one holding only a previous export), or add "
                            "--force to write the export files beside them")
        if foreign:
            check_folder_is_ours(out_dir, option, set(EXPORT_FILES) - previous_export_files(out_dir), force=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def previous_export_files(out_dir: Path) -> set[str]:
    """The export files in ``out_dir`` that a previous export wrote, as its manifest proves: ``tasks.json``
    parses as an mtpeft manifest and every file it lists is there with the SHA-256 it recorded (empty
    when anything differs: nothing then says mtpeft wrote them)."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not (isinstance(files, dict) and set(files) <= set(EXPORT_FILES) - {MANIFEST_FILE}):
            return set()
        if all((Path(out_dir) / name).is_file() and _sha256(Path(out_dir) / name) == digest
               for name, digest in files.items()):
            return {MANIFEST_FILE, *files}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return set()


def _head_params(model) -> dict:
    return {f"{task}.{name}": p for task, head in model.heads.items() for name, p in head.named_parameters()}


def export(model, cfg: RunConfig, out_dir: Path, ctx: DistContext, force: bool = False) -> Path | None:
    """Write the adapter, ``heads.safetensors`` and ``tasks.json`` (+ ``adapter_config.json`` for HF peft
    methods); ``force``: into a folder holding others' files, beside them (``check_export_target``)."""
    tuner = model.tuner
    heads = _head_params(model)
    with gathered(list(tuner.named_tensors(model).values()) + list(heads.values())):
        if not ctx.is_main:
            return None
        adapter_t = tuner.export_tensors(model)
        heads_t = {k: p.detach().cpu().clone().contiguous() for k, p in heads.items()}
    out_dir = Path(out_dir)
    check_export_target(out_dir, force=force)
    beside = out_dir.is_dir() and any(p.name not in EXPORT_FILES or not p.is_file() for p in out_dir.iterdir())
    previous = previous_export_files(out_dir) if beside else set()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    then = (f"{'the previous export in ' + str(out_dir) + ' is unchanged' if out_dir.exists() else 'nothing was left'}"
            f"; {FREE_SPACE}")
    with writing(out_dir, then):
        # beside others' files: written inside the folder, then moved into place file by file; else a new
        # folder beside it that replaces it whole (never a user's folder)
        tmp = Path(tempfile.mkdtemp(dir=out_dir if beside else out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            peft_cfg = tuner.peft_config(model, cfg.model.name_or_path)
            if peft_cfg is not None:
                peft_cfg.save_pretrained(str(tmp))
            save_file(adapter_t, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
            save_file(heads_t, str(tmp / HEADS_FILE), metadata={"format": "pt"})
            files = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / MANIFEST_FILE).write_text(json.dumps({**_manifest(cfg, model, adapter_t), "files": files}, indent=2))
        except BaseException:  # a failed write (disk full, interrupt) leaves the previous export in charge
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if beside:  # others' files stay; of ours only a previous export's were there (check_export_target)
        written = {f.name for f in tmp.iterdir()}
        # the previous export's manifest first (it would vouch for a mix of files), then its files the new
        # export does not write (adapter_config.json after a switch to a method HF peft cannot read)
        for name in sorted((previous - written) | ({MANIFEST_FILE} & previous), key=lambda n: n != MANIFEST_FILE):
            (out_dir / name).unlink(missing_ok=True)
        for name in sorted(written - {MANIFEST_FILE}) + [MANIFEST_FILE]:  # the manifest last
            os.replace(tmp / name, out_dir / name)
        tmp.rmdir()
        return out_dir
    old = None
    if out_dir.exists():  # a previous export (check_export_target): set aside, then removed
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        old.rmdir()
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _manifest(cfg: RunConfig, model, adapter: dict) -> dict:
    tasks = []
    for t in cfg.tasks:
        head = model.heads[t.name] if t.name in model.heads else None
        tasks.append({"name": t.name, "kind": t.kind, "format": t.format,
                      "head": type(head).__name__ if head is not None else "lm_head",
                      "head_tensors": sorted(k for k in _head_params(model) if k.startswith(t.name + "."))})
    peft = {**model.tuner.manifest(), "tensors": {k: list(v.shape) for k, v in sorted(adapter.items())}}
    return {"base_model_name_or_path": cfg.model.name_or_path, "quant": cfg.model.quant, "peft": peft,
            "adapter_file": ADAPTER_FILE, "heads_file": HEADS_FILE, "tasks": tasks}


def load_export(model, export_dir: Path) -> None:
    """Load an export into a freshly built (non-ZeRO) MultitaskModel, checking every tensor is used."""
    export_dir = Path(export_dir)
    for name in (ADAPTER_FILE, HEADS_FILE):
        if not (export_dir / name).is_file():
            raise CheckpointError(f"{export_dir / name}: missing; re-run `mtpeft export RUN_DIR --out DIR`")
    manifest = export_dir / MANIFEST_FILE
    redo = "export the run again (`mtpeft export RUN_DIR --out DIR`) or copy the folder again"
    if manifest.is_file():
        with reading(manifest, redo):
            content = json.loads(manifest.read_text())
        peft = content.get("peft", {}) if isinstance(content, dict) else None
        if not isinstance(peft, dict):
            raise CheckpointError(f"{manifest}: not the manifest an export writes (a JSON object whose 'peft' is an "
                                  f"object); {redo}")
        method, order = peft.get("method"), peft.get("task_order")
        if method and method != model.tuner.name:
            raise CheckpointError(f"{manifest}: the export is peft.method {method}, this config builds "
                                  f"{model.tuner.name}; set peft.method: {method}")
        if order is not None and order != model.tuner.task_names:
            raise CheckpointError(f"{manifest}: per-task tensors are for tasks {order}, this config lists "
                                  f"{model.tuner.task_names}; list the tasks in the export's order")
    with reading(export_dir / ADAPTER_FILE, redo):
        adapter = load_file(str(export_dir / ADAPTER_FILE))
    model.tuner.load_tensors(model, adapter, str(export_dir))
    heads = _head_params(model)
    with reading(export_dir / HEADS_FILE, redo):
        loaded = load_file(str(export_dir / HEADS_FILE))
    check_keys(heads, loaded, str(export_dir))
    with torch.no_grad():
        for key, param in heads.items():
            param.copy_(loaded[key].to(param.dtype))
