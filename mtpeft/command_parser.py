"""The argument parser of every mtpeft command line: a usage mistake is bad input too, so it ends
as one ``error:`` line and exit status 2, like every other user error."""

from __future__ import annotations

import argparse
import sys


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
