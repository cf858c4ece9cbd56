"""Bad input across the command-line surface, class by class (issue 15): each case ends in exactly
one ``error:`` line naming the key or file, exit status 2, no traceback, and leaves what was
already on disk as it was. In-process through ``mtpeft.cli.main`` where that is enough; through a
real process where the launcher or a second module is involved."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from builders import demo_config_file
from distributed import REPO, env
from mtpeft.cli import main

TASKS = REPO / "mtpeft/assets/demo/tasks"


def _config(tmp_path: Path) -> Path:
    return demo_config_file(tmp_path, output__dir=str(tmp_path / "run"))


def _files_near(argv) -> dict:
    """Hashes of every file in the folders the command line names (a config's folder, a data file's):
    what a refused command must leave as it was."""
    folders = {Path(a).parent if Path(a).is_file() else Path(a) for a in argv if "/" in a and Path(a).exists()}
    folders |= {Path(a.split("=", 1)[1]).parent for a in argv if "=" in a and Path(a.split("=", 1)[1]).is_file()}
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for d in folders for f in sorted(d.rglob("*")) if f.is_file()}


def _one_error(capsys, *argv) -> str:
    before = _files_near(argv)
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    after = _files_near(argv)
    assert after == before  # nothing already there was changed, nothing new written
    return err[0]


@pytest.mark.parametrize("override,expect", [
    ("tasks.7.max_new_tokens=3", "'7' is not an entry of a list of 4; use an index 0..3 or a name (defect"),
    ("tasks.codgen.max_new_tokens=3", "'codgen' is not an entry"),
    ("peft.target_modules=[q_proj, v_proj", "is not valid YAML"),
    ("train.lr.x=3", "train.lr is a value, not a section"),
    ("train..lr=3", "empty part in the key"),
    ("train.lr", "expected KEY=VALUE"),
])
def test_set_forms(tmp_path, capsys, override, expect):
    assert expect in _one_error(capsys, "train", str(_config(tmp_path)), "--set", override)


def test_set_by_task_name_reaches_that_task(tmp_path):
    from mtpeft.config import load_config

    cfg = load_config(_config(tmp_path), ["tasks.codegen.max_new_tokens=7"])
    assert [t.max_new_tokens for t in cfg.tasks if t.name == "codegen"] == [7]


@pytest.mark.parametrize("override,expect", [
    ("train.collective_timeout_s=-1", "train.collective_timeout_s must be positive, got -1"),
    ("train.lr=.nan", "train.lr must be positive, got nan"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be positive"),
    ("train.warmup_steps=-3", "train.warmup_steps must be 0 or more"),
    ("train.retrieval_temperature=0", "train.retrieval_temperature must be positive"),
    ("sampler.temperature=-1", "sampler.temperature must be a finite number >= 0, got -1"),
    ("weighting={kind: static, weights: {defect: 0, clone: 0, search: 0, codegen: 0}}", "weighting.weights are all 0"),
    ("weighting={kind: static, weights: {defect: -1, clone: 1, search: 1, codegen: 1}}", "weighting.weights.defect must"),
    ("weighting={kind: dwa, temperature: .inf}", "weighting.temperature must be a finite number > 0, got inf"),
    ("weighting={kind: famo, gamma: -0.5}", "weighting.gamma must be a finite number >= 0"),
    ("weighting={kind: gradnorm, alpha: .nan}", "weighting.alpha must be a finite number >= 0"),
])
def test_numbers_out_of_range(tmp_path, capsys, override, expect):
    line = _one_error(capsys, "train", str(_config(tmp_path)), "--set", override)
    assert expect in line and str(_config(tmp_path)) in line, line


CONFIG = "mtpeft/configs/demo.yaml"
ZERO_SHOT = ["eval", "--zero-shot", "mtpeft/assets/demo/base_model", "--tasks", CONFIG]


@pytest.mark.parametrize("argv,expect", [
    (["profile", CONFIG, "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["profile", CONFIG, "--ranks", "-2"], "argument --ranks: must be at least 1, got -2"),
    (["profile", CONFIG, "--peak-tflops", "-1"], "argument --peak-tflops: must be a finite number above 0, got -1"),
    (["profile", CONFIG, "--peak-tflops", "nan"], "argument --peak-tflops: must be a finite number above 0, got nan"),
    (["compare", CONFIG, "--steps", "-1"], "argument --steps: must be at least 0 (0: the config's train.max_steps)"),
    (["compare", CONFIG, "--steps", "2.5"], "argument --steps: expected a whole number, got '2.5'"),
    (["demo", "--ranks", "0"], "argument --ranks: must be at least 1, got 0"),
    (["demo", "--port", "70000"], "argument --port: a port is at most 65535, got 70000"),
    (["plan", "--model", "codellama-7b", "--gpus", "0"], "argument --gpus: must be at least 1, got 0"),
    (["plan", "--model", "codellama-7b", "--gpu-mem", "inf"], "argument --gpu-mem: must be a finite number above 0"),
    (["plan", "--model", "codellama-7b", "--margin", "-0.1"], "argument --margin: must be a finite number at least 0"),
    (["plan", "--model", "codellama-7b", "--logits-chunk", "-2"], "argument --logits-chunk: must be at least -1"),
    (["plan", "--model", "codellama-7b", "--reduce-bucket-size", "0"], "argument --reduce-bucket-size: must be at least 1"),
    ([*ZERO_SHOT, "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ([*ZERO_SHOT, "--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1"),
    ([*ZERO_SHOT, "--max-examples", "-5"], "argument --max-examples: must be at least 0"),
    ([*ZERO_SHOT, "--max-seq-len", "1"], "argument --max-seq-len: must be at least 2"),
])
def test_command_line_numbers_out_of_range(capsys, monkeypatch, argv, expect):
    monkeypatch.chdir(REPO)
    before = _files_near(argv)
    with pytest.raises(SystemExit) as stop:  # the parser's own exit: before anything is read or written
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: mtpeft {argv[0]}: "), err
    assert expect in err[0] and _files_near(argv) == before


@pytest.mark.parametrize("method,tokens", [("prompt", 512), ("prefix", 100000)])
def test_more_virtual_tokens_than_positions(tmp_path, capsys, method, tokens):
    line = _one_error(capsys, "train", str(_config(tmp_path)), "--set", f"peft.method={method}",
                      "--set", f"peft.num_virtual_tokens={tokens}")
    assert f"peft.num_virtual_tokens ({tokens}) leaves no room for the input in the 512 positions" in line


def test_virtual_tokens_and_input_overrun_a_learned_position_table():
    from transformers import RobertaConfig

    from mtpeft.errors import ConfigError
    from mtpeft.tuners.base import check_virtual_positions

    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)  # 512 usable, as in UniXcoder's family
    check_virtual_positions(roberta, 20, 492)
    with pytest.raises(ConfigError, match=r"\(21\) \+ train.max_seq_len \(492\) exceed the 512 positions"):
        check_virtual_positions(roberta, 21, 492)


@pytest.mark.parametrize("family", ["gpt2", "gpt_bigcode"])
def test_an_input_longer_than_a_learned_position_table(tmp_path, capsys, family):
    """Every method, not only the prompt ones: a 64-position table and train.max_seq_len 100 would
    index past the table at the first long example; named before the model loads."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(REPO / "mtpeft/assets/demo/base_model"))
    config = {"gpt2": tf.GPT2Config, "gpt_bigcode": tf.GPTBigCodeConfig}[family](
        n_embd=32, n_layer=1, n_head=4, vocab_size=len(tok), n_positions=64)
    folder = tmp_path / "model"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    capsys.readouterr()  # the save's progress bar
    line = _one_error(capsys, "train", str(_config(tmp_path)), "--set", f"model.name_or_path={folder}",
                      "--set", "train.max_seq_len=100")
    assert f"train.max_seq_len (100) exceeds the 64 positions of this {family} model" in line


def test_deepspeed_template_not_an_object(tmp_path, capsys):
    (tmp_path / "ds.json").write_text("[1, 2]")
    line = _one_error(capsys, "train", str(_config(tmp_path)), "--set", f"deepspeed.config={tmp_path / 'ds.json'}")
    assert "ds.json: a DeepSpeed config is a JSON object" in line


@pytest.mark.parametrize("overrides,expect", [
    ("{zero_optimization: {stage: 7}}", "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
    ("{zero_optimization: 3}", "zero_optimization must be an object"),
    # what DeepSpeed's own parser refuses, named by its key (it was blamed on model.name_or_path)
    ("{zero_optimization: {offload_param: {device: gpu}}}",
     "zero_optimization.offload_param.device: Input should be 'none', 'cpu' or 'nvme' (got 'gpu')"),
    ("{zero_optimization: {stage3_prefetch_bucket: 5}}", "zero_optimization.stage3_prefetch_bucket: Extra inputs"),
    ("{comms_logger: {enabled: maybe}}", "comms_logger.enabled: Input should be a valid boolean"),
    ("{bf16: {enabled: auto, loss_scale: 3}}", "bf16.loss_scale: Extra inputs are not permitted"),
])
def test_deepspeed_settings(tmp_path, capsys, overrides, expect):
    assert expect in _one_error(capsys, "train", str(_config(tmp_path)), "--set", f"deepspeed.overrides={overrides}")


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    for out, expect in ((tmp_path / "taken", "is an existing file"), (tmp_path / "taken" / "run", "which is a file")):
        assert expect in _one_error(capsys, "train", str(_config(tmp_path)), "--set", f"output.dir={out}")
    assert (tmp_path / "taken").read_text() == "mine"


def test_unknown_shipped_config_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "shipped one (analysis, codegen, demo, demo_nf4)" in _one_error(capsys, "train", "dmeo")


@pytest.mark.parametrize("command", ["train", "profile", "compare"])
def test_a_folder_given_as_the_config(tmp_path, capsys, monkeypatch, command):
    """A run's folder where its config.yaml belongs is named, with the file to pass instead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    line = _one_error(capsys, command, "run")
    assert line == f"error: run: a folder, not a RunConfig; to continue or redo that run, pass {Path('run') / 'config.yaml'}"
    assert "empty: a folder, not a RunConfig; pass the path of a YAML RunConfig file" in _one_error(capsys, command, "empty")


def _process(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=str(REPO))


def test_demo_with_two_ranks_prints_a_config_error_once(tmp_path):
    proc = _process("-m", "mtpeft", "demo", "--ranks", "2", "--out", str(tmp_path / "demo"),
                    "--set", "train.max_step=3")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "train.max_step; did you mean train.max_steps?" in errors[0]
    assert "launching:" not in proc.stdout and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv", [["frobnicate", "hosts"], []])
def test_hostfile_usage_mistakes(argv):
    proc = _process("-m", "mtpeft.launch.hostfile", *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


@pytest.mark.parametrize("argv", [["frob"], ["train"], ["export", "x"]])
def test_mtpeft_usage_mistakes(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: mtpeft"), err


def test_config_error_names_the_file(tmp_path, capsys):
    path = _config(tmp_path)
    line = _one_error(capsys, "train", str(path), "--set", "train.max_step=3")
    assert line.startswith(f"error: {path}: unknown config key train.max_step")


@pytest.mark.distributed
def test_a_config_error_is_printed_once_per_node_under_the_launcher(tmp_path):
    """``deepspeed --num_gpus 2 --module mtpeft train`` with a bad key: rank 0 prints the line, local
    rank 1 (same files, same error) exits 2 quietly."""
    from distributed import deepspeed_cmd

    proc = subprocess.run(deepspeed_cmd(2, "--module", "mtpeft", "train", str(_config(tmp_path)), "--set",
                                        "train.max_step=3"), capture_output=True, text=True, timeout=300, env=env(),
                          cwd=str(REPO))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    # the launcher's own log lines share the stream (and may run into ours): count the message itself
    assert out.count("error: ") == 1 and out.count("unknown config key train.max_step") == 1, out[-3000:]


@pytest.mark.parametrize("command", [["profile"], ["compare"]])
def test_report_folder_that_is_a_file(tmp_path, capsys, command):
    taken = tmp_path / "report"
    taken.write_text("mine")
    line = _one_error(capsys, *command, str(_config(tmp_path)), "--out", str(taken))
    assert "--out" in line and "is an existing file" in line and taken.read_text() == "mine"


@pytest.mark.parametrize("suffix,line", [(".jsonl", 3), (".jsonl", 600), (".json", 2)])
def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, suffix, line):
    rows = [{"func": f"int f{i}() {{ return {i}; }}", "target": i % 2} for i in range(700)]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        lines = text.split(b"\n")
        lines[line - 1] = lines[line - 1].replace(b"return", b"r\xe9turn")  # a Latin-1 e-acute
        data = b"\n".join(lines)
    else:
        data = ("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n").encode().replace(b"f0()", b"f\xe90()")
    bad = tmp_path / f"devign{suffix}"
    bad.write_bytes(data)
    cfg = _config(tmp_path)
    msg = _one_error(capsys, "train", str(cfg), "--set", f"tasks.defect.train={bad}")
    assert f"{bad}:{line}: not UTF-8 text (byte 0xe9" in msg and "save the file as UTF-8" in msg


@pytest.mark.parametrize("case", ["latin-1 byte", "key twice", "key twice in a flow mapping"])
def test_a_config_file_that_is_not_clean_yaml_names_its_line(tmp_path, capsys, case):
    """PyYAML keeps the last of two equal keys silently; a second ``max_steps`` must not quietly win."""
    text = _config(tmp_path).read_text().splitlines()
    at = next(i for i, line in enumerate(text) if line.strip().startswith("max_steps:"))
    if case == "latin-1 byte":
        data = "\n".join(text).encode().replace(b"max_steps:", b"max_st\xe9ps:", 1)
        expect = f":{at + 1}: not UTF-8 text (byte 0xe9)"
    elif case == "key twice":
        text.insert(at + 1, text[at].replace(text[at].strip(), "max_steps: 999"))
        data, expect = "\n".join(text).encode(), f"key 'max_steps' is given twice (lines {at + 1} and {at + 2})"
    else:
        data = b"model: {name_or_path: a, name_or_path: b}\n"
        expect = "bad.yaml:1: not valid YAML (key 'name_or_path' is given twice (lines 1 and 1)"
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(data)
    line = _one_error(capsys, "train", str(bad))
    assert line.startswith(f"error: {bad}:") and expect in line, line
    line = _one_error(capsys, "eval", "--zero-shot", "mtpeft/assets/demo/base_model", "--tasks", str(bad))
    assert expect in line, line


@pytest.mark.parametrize("variable,value", [("MTPEFT_KERNELS", "cuda"), ("MTPEFT_NF4_FUSED_MAX_M", "abc"),
                                            ("MTPEFT_NF4_FUSED_MAX_M", "-5")])
def test_a_bad_kernel_environment_variable_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                            variable, value):
    monkeypatch.setenv(variable, value)
    cfg = _config(tmp_path)
    line = _one_error(capsys, "train", str(cfg), "--set", "model.quant=nf4")
    assert line.startswith(f"error: environment variable {variable}={value!r}") and not (tmp_path / "run").exists()


def _raising(exc):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc,expect", [
    (OSError(28, "No space left on device", "/data/run/events.out"), "error: /data/run/events.out: cannot be written, "
                                                                     "the disk is full; free space on that disk"),
    (OSError(122, "Disk quota exceeded"), "error: a file mtpeft was writing: cannot be written, the disk quota is used up"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "the disk is full or a file-size limit was reached"),
    (PermissionError(13, "Permission denied", "/data/devign.jsonl"), "error: /data/devign.jsonl: permission denied;"),
    (OSError(30, "Read-only file system", "/ro/run/x"), "error: /ro/run/x: cannot be written, the file system is "
                                                        "read-only"),
])
def test_a_write_that_fails_under_a_library_is_one_line(capsys, monkeypatch, exc, expect):
    """The boundary for writes no ``failed_writes.writing`` guards (the real-disk cases, through the
    guarded writes, are in test_cli_disk_full.py)."""
    import mtpeft.cli as cli

    monkeypatch.setattr(cli, "_cmd_train", _raising(exc))
    assert expect in _one_error(capsys, "train", "x.yaml")


def test_an_error_that_is_not_a_failed_write_keeps_its_traceback(monkeypatch):
    import mtpeft.cli as cli

    monkeypatch.setattr(cli, "_cmd_train", _raising(OSError(2, "No such file or directory", "/x")))
    with pytest.raises(FileNotFoundError):
        main(["train", "x.yaml"])
    monkeypatch.setattr(cli, "_cmd_train", _raising(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "x.yaml"])


def test_a_failed_write_on_a_local_rank_above_0_is_printed_after_rank_0s(capsys, monkeypatch):
    """A full shared disk fails every rank: local rank 0 prints at once and the launcher stops the rest
    during their wait; a rank whose write failed alone still prints its line after the wait."""
    import mtpeft.cli as cli
    from mtpeft.errors import WriteError

    monkeypatch.setattr(cli, "_cmd_train", _raising(WriteError("/run/checkpoints/step4: cannot be written")))
    monkeypatch.setattr(cli, "REPEAT_EXIT_DELAY_S", 0.01)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert "step4: cannot be written" in _one_error(capsys, "train", "x.yaml")
