"""Running a part of hacer as a process until SIGINT or SIGTERM."""

from __future__ import annotations

import gc
import signal
import threading
from typing import Protocol


def name_process(name: str) -> None:
    """Give this process the name `ps -o comm` and `top` show (Linux; 15 characters at most)."""
    import ctypes

    ctypes.CDLL(None).prctl(15, name[:15].encode())  # PR_SET_NAME


class Part(Protocol):
    """Anything with start() and stop()."""

    def start(self) -> None:
        """Start."""

    def stop(self) -> None:
        """Stop."""


class Together:
    """Several parts run as one, in one process: started in order, stopped in reverse."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def start(self) -> None:
        """Start every part."""
        for part in self.parts:
            part.start()

    def stop(self) -> None:
        """Stop every part, the last started first."""
        for part in reversed(self.parts):
            part.stop()


def run_until_signal(part: Part) -> None:
    """Start `part`, wait for SIGINT or SIGTERM, then stop it."""
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    part.start()
    # What start-up built lives as long as the process: out of the collector's full passes, which
    # otherwise stall every thread for milliseconds now and then (a run's start among them).
    gc.freeze()
    done.wait()
    part.stop()
