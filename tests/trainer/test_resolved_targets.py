"""The default targets as resolved on the backbone are written into the run's config.yaml (a
commented block: the rerun's resume check and ``mtpeft eval`` read the config as given) and into the
export; an architecture the default role names do not reach falls back to all-linear with a notice."""

import json

import pytest
import torch.nn as nn

from distributed import tiny_config
from tiny_backbones import tiny_backbone
from mtpeft.config import PeftConfig, RunConfig, TaskConfig, dump_config, load_config
from mtpeft.data.dist import DistContext
from mtpeft.errors import ConfigError
from mtpeft.run_dir import load_run_config
from mtpeft.trainer.build import assemble
from mtpeft.trainer.export import export
from mtpeft.trainer.resolved_targets import record_resolved_targets
from mtpeft.trainer.resume_guard import check_same_run


def _cfg(method: str, **peft) -> RunConfig:
    return RunConfig(peft=PeftConfig(method=method, r=4, alpha=8, dropout=0.0, **peft),
                     tasks=[TaskConfig(name="defect", kind="classify", head_dropout=0.0)])


def _tiny_opt():
    """OPT: q/k/v_proj, out_proj, fc1, fc2 — a model type with no role aliases and no o/up/down_proj."""
    import transformers as tf

    cfg = tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    return tf.OPTForCausalLM(cfg).eval()


def test_config_yaml_records_the_codegen_names_and_stays_the_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path), [f"output.dir={run}"])
    (run / "checkpoints" / "step1").mkdir(parents=True)
    (run / "checkpoints" / "step1" / "run_state.pt").write_bytes(b"x")
    (run / "checkpoints" / "latest").write_text("step1")
    dump_config(cfg, run / "config.yaml")
    model = assemble(tiny_backbone("codegen"), cfg)
    for _ in range(2):  # a resumed run rewrites the block instead of adding a second one
        record_resolved_targets(run / "config.yaml", model.tuner, "codegen")
    text = (run / "config.yaml").read_text()
    assert text.count("# resolved on this backbone (codegen, peft.method lora):") == 1
    assert '#   peft.target_modules: ["fc_in", "fc_out", "out_proj", "qkv_proj"]' in text
    assert "notice" not in text and capsys.readouterr().out == ""
    assert load_run_config(run).peft.target_modules == cfg.peft.target_modules  # as given
    check_same_run(cfg, run)  # the rerun of the same command still resumes


def test_export_carries_the_resolved_targets(tmp_path):
    cfg = _cfg("ia3")
    cfg.model.name_or_path = str(tmp_path / "base")
    model = assemble(tiny_backbone("gpt_bigcode"), cfg)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    adapter = json.loads((out / "adapter_config.json").read_text())
    resolved = json.loads((out / "tasks.json").read_text())["peft"]["resolved"]
    assert sorted(adapter["target_modules"]) == sorted(resolved["ia3_target_modules"])
    assert {t.rsplit(".", 1)[-1] for t in resolved["ia3_target_modules"]} == {"c_attn", "c_proj"}
    assert resolved["ia3_feedforward_modules"] == sorted(adapter["feedforward_modules"])


@pytest.mark.parametrize("method", ["lora", "mtl_lora", "ia3"])
def test_unknown_architecture_falls_back_to_all_linear_with_a_notice(tmp_path, capsys, method):
    backbone = _tiny_opt()
    every = {n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    model = assemble(backbone, _cfg(method))
    wrapped = {n.removeprefix("backbone.") for n, m in model.named_modules()
               if hasattr(m, "base") and n.startswith("backbone.")}
    assert wrapped == every
    assert model.tuner.notice == (f"peft.{'ia3_' if method == 'ia3' else ''}target_modules: no default targets for "
                                  f"a opt backbone; using all-linear (every linear layer but the LM head)")
    if method == "ia3":
        assert model.tuner.resolved_targets()["ia3_feedforward_modules"] == ["fc2"]
    (tmp_path / "config.yaml").write_text("peft: {}\n")
    record_resolved_targets(tmp_path / "config.yaml", model.tuner, "opt")
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"notice: {model.tuner.notice}"]
    assert f"#   notice: {model.tuner.notice}" in (tmp_path / "config.yaml").read_text()


def test_named_targets_are_not_replaced_on_an_unknown_architecture():
    model = assemble(_tiny_opt(), _cfg("lora", target_modules=["q_proj", "v_proj"]))
    assert model.tuner.notice == "" and model.tuner.resolved_targets() == {"target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError, match="matched no linear layer of this opt"):
        assemble(_tiny_opt(), _cfg("lora", target_modules=["o_proj"]))
