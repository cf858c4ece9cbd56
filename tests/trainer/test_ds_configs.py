"""DeepSpeed templates: filled from RunConfig they validate as DeepSpeed configs; contradictions are errors.

Validation is DeepSpeed's own parser (``DeepSpeedConfig``, pydantic with unknown keys forbidden),
which works without a process group (world size 1, matching ``build_ds_config(cfg, 1)``).
The contradiction checks go through the real ``mtpeft train`` command in a subprocess.
"""

import json
import subprocess
import sys

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from distributed import REPO, env
from mtpeft.config import load_config
from mtpeft.errors import ConfigError
from mtpeft.launch.nvme import ENV_VAR, fill_nvme_paths
from mtpeft.trainer.ds_config import build_ds_config

TEMPLATES = ["zero3.json", "zero3_offload_cpu.json", "zero3_offload_nvme.json", "zero2.json"]
STAGES = {"zero3.json": 3, "zero3_offload_cpu.json": 3, "zero3_offload_nvme.json": 3, "zero2.json": 2}


def _demo(template: str, *overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", [f"deepspeed.config={template}", *overrides])


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_fills_and_validates(template, tmp_path):
    cfg = _demo(template, "train.grad_accum=3")
    ds = fill_nvme_paths(build_ds_config(cfg, 1), template, {ENV_VAR: str(tmp_path)}, lambda: True)
    assert "auto" not in list(_strings(ds))
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == STAGES[template]
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps, parsed.train_batch_size) == (8, 3, 24)
    assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled


def test_bf16_run_enables_bf16_only():
    ds = build_ds_config(_demo("zero3_offload_cpu.json", "model.dtype=bfloat16"), 4)
    parsed = DeepSpeedConfig(dict(ds, train_batch_size=8))  # this process has world size 1
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert ds["train_batch_size"] == 8 * 4


def test_offload_templates_offload_what_they_say(tmp_path):
    cpu = DeepSpeedConfig(build_ds_config(_demo("zero3_offload_cpu.json"), 1)).zero_config
    assert (cpu.offload_param.device, cpu.offload_optimizer.device) == ("cpu", "cpu")
    assert cpu.offload_param.pin_memory and cpu.offload_optimizer.pin_memory
    ds = fill_nvme_paths(build_ds_config(_demo("zero3_offload_nvme.json"), 1), "t", {ENV_VAR: str(tmp_path)}, lambda: True)
    nvme = DeepSpeedConfig(ds).zero_config
    assert (nvme.offload_param.device, nvme.offload_optimizer.device) == ("nvme", "nvme")
    assert str(nvme.offload_param.nvme_path) == str(nvme.offload_optimizer.nvme_path) == str(tmp_path)


def test_nvme_path_unset_or_missing_is_a_config_error(tmp_path):
    ds = build_ds_config(_demo("zero3_offload_nvme.json"), 1)
    with pytest.raises(ConfigError, match=rf"offload_optimizer\.nvme_path is \"auto\" but {ENV_VAR} is not set"):
        fill_nvme_paths(json.loads(json.dumps(ds)), "zero3_offload_nvme.json", {}, lambda: True)
    with pytest.raises(ConfigError, match="is not an existing folder"):
        fill_nvme_paths(ds, "zero3_offload_nvme.json", {ENV_VAR: str(tmp_path / "absent")}, lambda: True)


def test_nvme_without_async_io_is_a_config_error(tmp_path):
    ds = build_ds_config(_demo("zero3_offload_nvme.json"), 1)
    with pytest.raises(ConfigError, match=r"zero3_offload_nvme\.json: NVMe offload needs DeepSpeed's async_io op"):
        fill_nvme_paths(ds, "zero3_offload_nvme.json", {ENV_VAR: str(tmp_path)}, lambda: False)
    cpu = build_ds_config(_demo("zero3_offload_cpu.json"), 1)
    assert fill_nvme_paths(cpu, "zero3_offload_cpu.json", {}, lambda: False) == cpu  # nothing to check


def test_explicit_nvme_path_is_kept(tmp_path):
    ds = build_ds_config(_demo("zero3_offload_nvme.json"), 1)
    for section in ("offload_param", "offload_optimizer"):
        ds["zero_optimization"][section]["nvme_path"] = str(tmp_path)
    fill_nvme_paths(ds, "t", {ENV_VAR: str(tmp_path / "elsewhere")}, lambda: True)
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


CONTRADICTIONS = {
    "micro_batch": ("{train_micro_batch_size_per_gpu: 3}", "train_micro_batch_size_per_gpu is 3 but RunConfig gives 8"),
    "bf16_vs_fp32": ("{bf16: {enabled: true}}", "bf16.enabled is True but RunConfig gives False"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both contradictions through ``mtpeft.cli.main(["train", ...])``, run side by side."""
    out = tmp_path_factory.mktemp("ds_contradictions")
    procs = {}
    for name, (override, _) in CONTRADICTIONS.items():
        argv = ["train", str(REPO / "configs" / "demo.yaml"), "--set", f"deepspeed.overrides={override}",
                "--set", f"output.dir={out / name}"]
        code = "import sys; from mtpeft.cli import main; sys.exit(main(sys.argv[1:]))"
        procs[name] = subprocess.Popen([sys.executable, "-c", code, *argv], env=dict(env(), DS_ACCELERATOR="cpu"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    return {name: (p.wait(timeout=240), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(CONTRADICTIONS))
def test_contradicting_value_is_one_error_line_exit_2(cli_runs, name):
    code, stdout, stderr = cli_runs[name]
    errors = [line for line in (stdout + stderr).splitlines() if line.startswith("error:")]
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1 and CONTRADICTIONS[name][1] in errors[0], errors
    assert "Traceback" not in stderr


def test_bare_template_name_is_the_shipped_file():
    from mtpeft.shipped_files import ds_template_names

    assert ds_template_names() == sorted(t[:-len(".json")] for t in TEMPLATES)
    for template in TEMPLATES:
        assert build_ds_config(_demo(template[:-len(".json")]), 2) == build_ds_config(_demo(template), 2)


def test_a_file_beside_the_config_wins_over_a_shipped_template(tmp_path):
    from mtpeft.trainer.ds_config import template_path

    own = tmp_path / "zero3.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    assert template_path("zero3.json", tmp_path) == own
    assert template_path("zero3", tmp_path).parent != tmp_path  # no file named "zero3": the shipped one


def test_unknown_template_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="zero3, zero3_offload_cpu, zero3_offload_nvme") as err:
        build_ds_config(_demo("zero4"), 1)
    assert "zero4" in str(err.value)


def test_config_by_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo_nf4")
    assert cfg.model.quant == "nf4" and cfg.source.endswith("demo_nf4.yaml")
    with pytest.raises(ConfigError, match="demo, demo_nf4"):
        load_config("no_such_config")
