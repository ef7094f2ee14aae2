"""What every command line shares: exit codes, stop signals, argparse types, and one line per user mistake.

A ``UsageError`` (bad config, data, checkpoint or arguments) never ends in a traceback: it is printed
as one line, naming the rank that hit it once a run has ranks, and the command exits 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from gan_dist.config import ConfigError, UsageError

EXIT_USAGE = 2


EXIT_DIVERGED = 3


EXIT_LOST_PEER = 4  # a collective failed: a peer died, hung or became unreachable


EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped cleanly on a signal, a checkpoint is on disk


EXIT_ABORTED = 128 + signal.SIGINT


def error_line(e: BaseException, rank: int | None = None) -> str:
    """``config error: ...`` or ``error: ...`` before a run has ranks; ``error (rank R): ...`` once it has."""
    if rank is not None:
        return f"error (rank {rank}): {e}"
    return f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}"


def run(body: Callable[[], int]) -> int:
    """``body()``'s exit status; a ``UsageError`` it raises is printed as one line, and exits 2."""
    try:
        return body()
    except UsageError as e:
        print(error_line(e), file=sys.stderr, flush=True)
        return EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (it prints the whole usage before them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        if not (text.removeprefix("-").isdecimal() and int(text) >= minimum):
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    return parse


def writable_file(text: str) -> Path:
    """An argparse type: a file whose folder exists and is writable, checked before any work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} is not writable")
    return path
