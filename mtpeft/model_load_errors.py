"""What transformers raises for a model folder or ``config.json`` it cannot use, and that failure in
one line.

A model folder fails in more ways than ``ValueError``: huggingface_hub's strict dataclass checks
(``StrictDataclassError``, a plain ``Exception``: a head count that does not divide the width, a
string where a number belongs), ``ZeroDivisionError`` from arithmetic on a zero field, ``KeyError``
/ ``TypeError`` from a missing or mistyped key, ``OSError`` for a missing file, ``SafetensorError``
for a weights file cut short. Each place that builds a model from a user's folder or file catches
``MODEL_LOAD_ERRORS`` and turns it into one ``error:`` line naming that folder or file."""

from __future__ import annotations

from safetensors import SafetensorError

try:
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub, without strict dataclasses
    class StrictDataclassError(Exception):
        pass

MODEL_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ArithmeticError, StrictDataclassError, SafetensorError)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """What ``exc`` says, as one line of at most ``limit`` characters: a strict-dataclass error says
    only which validator failed on its first line, so its cause speaks for it."""
    if isinstance(exc, StrictDataclassError) and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
