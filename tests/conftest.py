import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))  # distributed.py, builders.py, tiny_backbones.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Triton decides between compiled and interpreted kernels when a kernel module is imported, and
# any test may import one first: on a machine without CUDA every test runs the interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


import torch.nn.functional as _F  # noqa: E402

_TORCH_LINEAR = _F.linear  # before any test imports deepspeed


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed's zero.Init replaces torch.nn.functional.linear process-wide ("will persist unless
    manually reset"), also from module-scoped fixtures that build a ZeRO-3 engine in-process; no
    test may see another's patch (saved tensors, recomputation and FLOP counts change)."""
    _F.linear = _TORCH_LINEAR
    yield
    _F.linear = _TORCH_LINEAR



# The in-process tests that take over about half a second each on a 2-core CPU (measured with
# `pytest -m unit --durations=0`), by "file" or "file::test" (every parametrization): subprocesses
# (CLI, launch scripts, wheel builds, sandboxed programs), compiles for sm_90a, Triton-interpreter
# kernels against float64, whole models built and compared. They run with `-m slow` (and in the
# whole suite); `pytest -m unit` is everything else and stays under a minute.
SLOW = {
    "tests/kernels/test_kernel_static_gate.py": "compiles every kernel and tile for sm_90a",
    "tests/kernels/test_kernel_bottleneck_adapter.py": "Triton interpreter against float64",
    "tests/kernels/test_kernel_nf4_lora_linear.py": "Triton interpreter against float64",
    "tests/kernels/test_kernel_lora_dy_pass.py": "Triton interpreter against float64",
    "tests/kernels/test_kernel_keyed_dropout.py": "Triton interpreter against float64",
    "tests/kernels/test_kernel_outputs_in_place.py": "Triton interpreter against float64",
    "tests/quant/test_quant_linear.py::test_forward_backward_against_float64": "interpreter, float64",
    "tests/quant/test_quant_linear.py::test_quantize_model_llama_matches_dequantized_reference": "whole model",
    "tests/quant/test_quant_linear.py::test_triton_dequant_equals_bitsandbytes": "interpreter",
    "tests/quant/test_streaming_loader.py::test_stream_matches_from_pretrained_with_biases_tied_head_and_dtype":
        "saves and streams whole models",
    "tests/quant/test_streaming_loader.py::test_loads_bitsandbytes_checkpoint_without_requantizing": "whole model",
    "tests/quant/test_streaming_loader.py::test_base_model_class_reads_a_checkpoint_saved_with_its_head": "whole model",
    "tests/quant/test_streaming_loader.py::test_single_process_stream_equals_quantize_model": "whole model",
    "tests/tuners/test_tuners.py::test_method_on_a_4bit_encoder_matches_the_dequantized_encoder": "whole models",
    "tests/tuners/test_tuners.py::test_default_target_exports_of_every_decoder_family_reload_in_hf_peft": "exports",
    "tests/tuners/test_tuners.py::test_method_on_family": "every method on every family",
    "tests/tuners/test_backbones_train.py": "three training steps of every method on every family, bf16 and NF4",
    "tests/tasks/test_beam_search.py": "beam search against transformers' on a model",
    "tests/tuners/test_tuner_exports.py::test_mtpeft_reloads_export_and_reproduces": "export, rebuild, reload",
    "tests/tuners/test_tuner_exports.py::test_hf_peft_loads_export_and_reproduces": "export, reload in HF peft",
    "tests/tuners/test_tuner_exports.py::test_uncached_greedy_decoding_matches_hf_peft": "decoding through HF peft",
    "tests/tuners/test_structure.py::test_tiny_model_of_every_family": "a model of every family",
    "tests/tuners/test_keyed_dropout.py::test_model_losses_do_not_depend_on_the_split_with_dropout_on": "models",
    "tests/tasks/test_chunked_lm_loss.py": "a 152k-token vocabulary, float64, whole models",
    "tests/tasks/test_sandbox.py": "runs programs in the sandbox against wall-clock and CPU limits",
    "tests/tasks/test_new_kinds.py::test_program_synthesis_score_runs_the_tests": "sandboxed programs",
    "tests/tasks/test_zero_shot.py::test_loglik_end_to_end_matches_predictions_and_an_unbatched_reference": "model",
    "tests/profile/test_planner.py::test_step_peak_matches_live_storage_trace": "storage trace of real steps",
    "tests/profile/test_planner.py::test_shipped_architectures_match_published_totals": "meta models",
    "tests/profile/test_planner.py::test_fit_34b_bench_refuses_cpu_and_smoke_runs": "a benchmark's subprocess",
    "tests/profile/test_planner.py::test_layer_activation_bytes_equal_what_autograd_saves": "real steps",
    "tests/profile/test_planner.py::test_plan_model_states_agrees_with_the_architecture_plan": "meta models",
    "tests/profile/test_planner.py::test_whole_model_saved_bytes_without_checkpointing": "real steps",
    "tests/profile/test_flops.py": "FlopCounterMode over real steps",
    "tests/profile/test_shipped_architectures.py::test_plan_runs_on_the_new_files": "meta models",
    "tests/trainer/test_ds_configs.py::test_contradicting_value_is_one_error_line_exit_2": "CLI subprocesses",
    "tests/trainer/test_transfer.py::test_save_appends_and_plot_writes_a_png": "matplotlib",
    "tests/launch/test_launch_signals.py": "the launch scripts in subprocesses",
    "tests/launch/test_extension_lock.py::test_torch_loads_in_another_process_never_look_stale":
        "a second process imports torch and takes the lock for 2 s",
    "tests/test_cli_errors.py::test_console_script_prints_no_traceback": "console-script subprocess",
    "tests/test_cli_bad_input.py::test_demo_with_two_ranks_prints_a_config_error_once": "deepspeed launcher",
    "tests/test_packaging.py": "builds and installs a wheel",
}


def _slow(nodeid: str) -> bool:
    path, _, rest = nodeid.partition("::")
    name = rest.split("[")[0]
    return path in SLOW or f"{path}::{name}" in SLOW


def pytest_collection_modifyitems(config, items):
    """Every test not marked ``distributed``, ``gpu`` or ``slow`` (by mark or in ``SLOW``) is a
    ``unit`` test; ``gpu`` tests skip without CUDA."""
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("slow") is None and _slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None:
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif item.get_closest_marker("distributed") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
