"""Turns a script's output bytes into log entries, within bounds.

Lines longer than `line_limit` are cut (the rest is counted, not kept), and past `total_limit`
bytes nothing more is logged; `finish()` then adds one entry saying what was cut. Memory stays
at one read plus one line whatever the script prints, even with no newline ever.
"""

from __future__ import annotations

import fcntl
import os
import select
import time
from collections.abc import Callable
from typing import cast

from hacer.messages import Entry, EntryType
from scripting import decode_line

POLL_MS = 500  # how often a quiet pipe's reader looks at its deadline
HELD_OPEN = "[hacer: output closed: a process outside the run still held it]"


class OutputSplitter:
    """Splits a byte stream into (entry_type, data) entries; see the module docstring."""

    def __init__(self, line_limit: int = 8192, total_limit: int = 64 * 1024 * 1024) -> None:
        self.line_limit = line_limit
        self.total_limit = total_limit
        self.logged_bytes = 0
        self.cut_bytes = 0
        self.cut_lines = 0
        self.full = False  # past total_limit: nothing more is logged
        self._partial = bytearray()
        self._skipping = 0  # bytes of the current over-long line not kept

    def feed(self, data: bytes) -> list[Entry]:
        """Return the entries completed by `data`."""
        entries: list[Entry] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            room = self.line_limit - len(self._partial)
            piece = data[start:end]
            if self._skipping or len(piece) > room:
                keep = max(room, 0) if not self._skipping else 0
                self._partial += piece[:keep]
                self._skipping += len(piece) - keep
            else:
                self._partial += piece
            if newline < 0:
                break
            self._complete(entries)
            start = newline + 1
        return entries

    def finish(self) -> list[Entry]:
        """Return the last, unterminated line and a note of what was cut, if anything."""
        entries: list[Entry] = []
        if self._partial or self._skipping:
            self._complete(entries)
        if self.cut_bytes or self.cut_lines:
            entries.append(
                (
                    "output",
                    f"[hacer: output cut: {self.cut_bytes} bytes not logged "
                    f"({self.cut_lines} lines over {self.line_limit} bytes, "
                    f"log limit {self.total_limit} bytes)]",
                )
            )
        return entries

    def _complete(self, entries: list[Entry]) -> None:
        line = self._partial.decode(errors="replace")
        skipped = self._skipping
        self._partial = bytearray()
        self._skipping = 0
        if skipped:
            self.cut_lines += 1
            self.cut_bytes += skipped
            line += f" [hacer: {skipped} more bytes of this line cut]"
        if self.full or self.logged_bytes + len(line) > self.total_limit:
            self.full = True
            self.cut_bytes += len(line)
            return
        self.logged_bytes += len(line)
        entry_type, data = decode_line(line.removesuffix("\r"))
        # decode_line gives a script's entry types only; scripting stays free of the bus's imports.
        entries.append((cast(EntryType, entry_type), data.replace("\0", "\ufffd")))  # no database column holds a NUL


def read_output(
    fd: int, splitter: OutputSplitter, deadline: Callable[[], float | None], emit: Callable[[list[Entry]], None]
) -> None:
    """Emit a pipe's entries until its end, or until `deadline()` (monotonic) passes with it idle.

    Past the deadline only what the pipe can hold is still read: that much the ended writers may
    have left in it (the reader may have been slow to get to it); more means a writer nobody could
    end is still writing.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    budget: int | None = None  # bytes still read past the deadline
    while True:
        until = deadline()
        wait_ms = POLL_MS if until is None else max(0, min(POLL_MS, int((until - time.monotonic()) * 1000)))
        readable = bool(poller.poll(wait_ms))
        if until is not None and time.monotonic() >= until:
            if budget is None:
                budget = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
            if not readable or budget <= 0:
                emit(splitter.finish() + [("output", HELD_OPEN)])
                return
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if budget is not None:
            budget -= len(chunk)
        emit(splitter.feed(chunk) if chunk else splitter.finish())
        if not chunk:
            return
