"""Stop signals: recorded by the handler, agreed on by the ranks at a step boundary, acted on together."""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM, SIGUSR1, SIGUSR2 or a first SIGINT (Ctrl-C). The handler only records the
    signal: the ranks agree on it at a step boundary, outside any handler, then save and exit
    together. A second SIGINT aborts at once (``KeyboardInterrupt``), until the run's exit status is
    settled: a signal during shutdown then changes nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.settled = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # os.write: print() is not safe inside a signal handler
        if self.settled:
            os.write(sys.stderr.fileno(), b"interrupt: the run is already ending; its exit status stands\n")
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGINT:
            os.write(sys.stderr.fileno(), b"interrupt: saving at the next step boundary; interrupt again to abort\n")

    def settle(self) -> None:
        """The exit status is decided: from now on a signal only says so."""
        self.settled = True

    @property
    def name(self) -> str:
        """The signal seen here; a rank that stops because another rank was signalled says so."""
        return signal.Signals(self.signum).name if self.signum is not None else "on another rank"
