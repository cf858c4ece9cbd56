"""The argument parser of every mtpeft command line: a usage mistake is bad input too, so it ends
as one ``error:`` line and exit status 2, like every other user error."""

from __future__ import annotations

import argparse
import math
import sys


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def whole_number(minimum: int, meaning: str = ""):
    """An argument type: an integer of at least ``minimum`` (``meaning`` says what the smallest
    values mean, e.g. "0: the config's max_steps"); anything else is the option's one error line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{f' ({meaning})' if meaning else ''}, "
                                             f"got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(minimum: float = 0.0, inclusive: bool = False):
    """An argument type: a finite number above ``minimum`` (or equal to it, with ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def port_number(text: str) -> int:
    """An argument type: a TCP port, or 0 for a free one."""
    value = whole_number(0, "0: a free port")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value
