"""Print mtpeft's install requirements without their version bounds (markers kept), one per line:
what ``make test-latest`` upgrades to the newest releases, past setup.py's upper bounds."""

import re
from importlib.metadata import requires

for req in requires("mtpeft") or []:
    spec, _, marker = req.partition(";")
    if "extra ==" in marker:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
    print(f"{name}; {marker.strip()}" if marker.strip() else name)
