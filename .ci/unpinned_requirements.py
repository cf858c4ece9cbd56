"""Print mtpeft's install requirements without their version bounds (markers kept), one per line:
what ``make test-latest`` upgrades to the newest releases, past setup.py's upper bounds.

torch is left out: it stays at the build the venv was given (TORCH_SPEC), because the newest torch
on PyPI is a several-GB CUDA build that also pins its own triton."""

import re
from importlib.metadata import requires

KEEP_AS_INSTALLED = {"torch"}

for req in requires("mtpeft") or []:
    spec, _, marker = req.partition(";")
    if "extra ==" in marker:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
    if name.lower() in KEEP_AS_INSTALLED:
        continue
    print(f"{name}; {marker.strip()}" if marker.strip() else name)
