"""DeepSpeed hostfiles (``host slots=N`` per line), checked before anything is launched.

The ``deepspeed`` launcher rejects a bad hostfile only after ssh checks and with the whole file in a
log line; worse, its pattern accepts ``slots=0`` and trailing garbage. Launch scripts call
``python -m mtpeft.launch.hostfile check FILE`` first, which prints one ``error: FILE:LINE: ...``
line and exits 2 on the first bad line. ``master`` / ``nodes`` / ``slots`` print single values for
shell scripts (first host, host count, total ranks).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mtpeft.command_parser import CommandParser
from mtpeft.errors import LaunchError, UserError

_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")
_SLOTS = re.compile(r"^slots=(\S*)$")
FORMAT_HINT = "each line must be 'HOST slots=N' (N a positive integer); '#' starts a comment"


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int


def parse_hostfile(path: str | Path) -> list[HostEntry]:
    """The hosts of ``path`` in order; LaunchError naming ``path:line`` for the first bad line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"{path}: cannot read hostfile ({exc.__class__.__name__}: {exc})") from None
    entries: list[HostEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        fields = line.split()
        if len(fields) == 1 and _SLOTS.match(fields[0]):
            raise LaunchError(f"{where}: '{line}' has no host name; write 'HOST {fields[0]}' ({FORMAT_HINT})")
        if len(fields) == 1:
            raise LaunchError(f"{where}: '{line}' has no slots; write '{fields[0]} slots=N' ({FORMAT_HINT})")
        if len(fields) > 2 or not _HOST.match(fields[0]):
            raise LaunchError(f"{where}: cannot parse '{line}'; {FORMAT_HINT}")
        match = _SLOTS.match(fields[1])
        if not match:
            raise LaunchError(f"{where}: expected 'slots=N' after host '{fields[0]}', got '{fields[1]}'; {FORMAT_HINT}")
        value = match.group(1)
        if not value.isdigit() or int(value) <= 0:
            raise LaunchError(f"{where}: slots must be a positive integer (GPUs on that host), got '{value}'")
        host = fields[0]
        if host in seen:
            raise LaunchError(f"{where}: host '{host}' is listed again (first on line {seen[host]}); "
                              f"list each host once with its total slots")
        seen[host] = number
        entries.append(HostEntry(host, int(value), number))
    if not entries:
        raise LaunchError(f"{path}: hostfile lists no hosts; {FORMAT_HINT}")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m mtpeft.launch.hostfile", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("check", "master", "nodes", "slots"))
    parser.add_argument("hostfile")
    args = parser.parse_args(argv)
    try:
        entries = parse_hostfile(args.hostfile)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.command == "check":
        print(f"{args.hostfile}: {len(entries)} hosts, {sum(e.slots for e in entries)} slots")
    elif args.command == "master":
        print(entries[0].host)
    elif args.command == "nodes":
        print(len(entries))
    else:
        print(sum(e.slots for e in entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
