"""Every backbone of the studies has a shipped architecture file (``mtpeft plan --model NAME``), read
from the published config.json values; each file says where they came from. Counted on the meta
device and checked against the published sizes or a hand formula; ``--model`` also takes any local
config.json (a file or its folder), decoder or encoder."""

import argparse
import json

import pytest

from mtpeft.profile import plan_cli
from mtpeft.profile.architecture import ARCHS_DIR, SOURCE_KEY, known_architectures, load_architecture

STUDY_BACKBONES = ["unixcoder-base", "codet5p-220m", "codet5p-770m", "codegen-350m", "codegen-2b", "codegen-6b",
                   "codegen-16b", "codegen2-1b", "codegen2-3.7b", "codegen2-16b", "starcoder-15b", "starcoder2-3b",
                   "starcoder2-7b", "starcoder2-15b", "deepseek-coder-1.3b", "deepseek-coder-6.7b",
                   "deepseek-coder-33b", "qwen2.5-coder-1.5b", "qwen2.5-coder-7b", "qwen2.5-coder-32b",
                   "codellama-7b", "codellama-13b", "codellama-34b"]

# Sizes the releases state: StarCoder 15.5B, CodeGen2 1B / 3.7B / 16B, UniXcoder 125M (RoBERTa-base).
PUBLISHED = {"starcoder-15b": 15.5e9, "codegen2-1b": 1.0e9, "codegen2-3.7b": 3.7e9, "codegen2-16b": 16.0e9,
             "unixcoder-base": 125e6}


def test_the_shipped_list_is_the_folder_and_holds_every_study_backbone():
    assert known_architectures() == sorted(p.stem for p in ARCHS_DIR.glob("*.json"))
    assert set(STUDY_BACKBONES) <= set(known_architectures())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    arch = load_architecture(name)
    assert abs(arch.total_params - PUBLISHED[name]) <= 0.02 * PUBLISHED[name], arch.total_params


def test_new_files_name_their_source():
    for name in ("unixcoder-base", "codet5p-220m", "codet5p-770m", "codegen-6b", "codegen2-1b", "codegen2-3.7b",
                 "codegen2-16b", "starcoder-15b"):
        note = json.loads((ARCHS_DIR / f"{name}.json").read_text())[SOURCE_KEY]
        assert "config.json" in note, name
    assert not hasattr(load_architecture("codegen-6b").config, SOURCE_KEY)


def test_codegen_6b_equals_the_hand_formula():
    """CodeGen-6B (called 6.1B) counts 7.06B: 33 layers of width 4096, MLP 4h, untied head with a bias."""
    h, layers, v = 4096, 33, 51200
    per_layer = 2 * h + 3 * h * h + h * h + (h * 4 * h + 4 * h) + (4 * h * h + h)
    arch = load_architecture("codegen-6b")
    assert arch.total_params == v * h + layers * per_layer + 2 * h + (v * h + v)
    assert (arch.num_layers, arch.num_heads, arch.head_dim) == (33, 16, 256)


@pytest.mark.parametrize("name,d,ff,layers", [("codet5p-220m", 768, 3072, 12), ("codet5p-770m", 1024, 4096, 24)])
def test_codet5p_encoders_equal_the_hand_formula(name, d, ff, layers):
    """The encoder only (as trained): embeddings, per layer q/k/v/o, wi/wo and two RMS norms, the
    relative-position bias of the first layer, the final norm; no LM head, no logits in the plan."""
    heads = {768: 12, 1024: 16}[d]
    arch = load_architecture(name)
    assert arch.encoder and arch.lm_head_params == 0
    assert arch.total_params == 32100 * d + layers * (4 * d * d + 2 * d * ff + 2 * d) + 32 * heads + d
    assert arch.ia3_vectors == [(d, False), (d, False), (ff, True)]  # k, v outputs; wo input


def test_starcoder_is_multi_query():
    arch = load_architecture("starcoder-15b")
    assert arch.num_kv_heads == 1 and arch.max_positions == 8192
    assert arch.ia3_vectors == [(6144 + 2 * 128, False), (24576, True)]  # fused c_attn output, mlp.c_proj input


def _plan(*argv: str, capsys) -> dict:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    assert plan_cli.run(parser.parse_args(list(argv) + ["--json"])) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["unixcoder-base", "codet5p-770m", "codegen2-1b", "starcoder-15b"])
def test_plan_runs_on_the_new_files(name, capsys):
    out = _plan("--model", name, "--seq", "512", "--peft", "ia3", capsys=capsys)
    assert out["trainable_params"] > 0
    assert (out["breakdown"]["logits_loss"] == 0) == load_architecture(name).encoder


@pytest.mark.parametrize("as_folder", [True, False], ids=["folder", "file"])
def test_plan_takes_any_local_config_json(tmp_path, capsys, as_folder):
    encoder = {"model_type": "roberta", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 130}
    decoder = {"model_type": "gpt_bigcode", "n_embd": 64, "n_inner": 256, "n_layer": 2, "n_head": 4,
               "vocab_size": 300, "n_positions": 128, "multi_query": True}
    for name, cfg in (("enc", encoder), ("dec", decoder)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        target = tmp_path / name if as_folder else tmp_path / name / "config.json"
        out = _plan("--model", str(target), "--peft", "lora", "--seq", "64", capsys=capsys)
        arch = load_architecture(target)
        assert out["total_params"] == arch.total_params > 0 and arch.encoder == (name == "enc")
        assert out["trainable_params"] == arch.num_layers * sum(16 * (s.in_features + s.out_features)
                                                                for s in arch.block_linears)  # LoRA r=16 on all
