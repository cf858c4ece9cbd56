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



def pytest_collection_modifyitems(config, items):
    """Every test not marked ``distributed`` or ``gpu`` is a ``unit`` test; ``gpu`` tests skip
    without CUDA."""
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        elif item.get_closest_marker("distributed") is None:
            item.add_marker(pytest.mark.unit)
