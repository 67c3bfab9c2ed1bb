"""What a runner has published of its runs and no recorder has confirmed yet, to send again.

The broker acknowledges a publish before it saves it, so a broker that dies can lose a run's
last status or log lines after the runner saw them acknowledged. The runner therefore keeps
each run's latest status and its unconfirmed log entries until a recorder says (on
`runs/<run_id>/recorded`) that it has written them: log entries 1..seq, and which state.
What is still unconfirmed is sent again after every reconnect and, while a recorder is online,
when it has waited `resend_after` seconds.

Memory is bounded: past `max_bytes` held, the oldest runs' entries are let go (counted in
`dropped`); they were published once and wait in the recorders' broker session for them. A
message sent `max_sends` times without a confirmation is let go too (counted), so a message a
recorder cannot write is never sent forever.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from hacer import runstates
from hacer.messages import RunRecorded


@dataclass
class _Held:
    topic: str
    payload: bytes
    sent_at: float
    sends: int = 1


@dataclass
class _HeldRun:
    entries: OrderedDict[int, _Held] = field(default_factory=OrderedDict)
    status: _Held | None = None
    state: str = ""


class Outbox:
    """See the module docstring. Thread-safe: workers add, the bus thread confirms."""

    def __init__(self, *, resend_after: float = 5.0, max_bytes: int = 64 * 1024 * 1024, max_sends: int = 20) -> None:
        self.resend_after = resend_after
        self.max_bytes = max_bytes
        self.max_sends = max_sends
        self.held_bytes = 0
        self.dropped = 0
        self.gave_up = 0
        self._runs: OrderedDict[str, _HeldRun] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    def add_entry(self, run_id: str, seq: int, topic: str, payload: bytes, now: float) -> None:
        """Hold a log entry just published."""
        with self._lock:
            run = self._run(run_id)
            run.entries[seq] = _Held(topic, payload, now)
            self.held_bytes += len(payload)
            self._bound()

    def add_status(self, run_id: str, state: str, topic: str, payload: bytes, now: float) -> None:
        """Hold a run's latest status just published (it replaces the one held before)."""
        with self._lock:
            run = self._run(run_id)
            if run.status is not None:
                self.held_bytes -= len(run.status.payload)
            run.status, run.state = _Held(topic, payload, now), state
            self.held_bytes += len(payload)
            self._bound()

    def confirm(self, recorded: RunRecorded) -> None:
        """Let go of what a recorder has written."""
        with self._lock:
            run = self._runs.get(recorded.run_id)
            if run is None:
                return
            while run.entries:
                seq = next(iter(run.entries))
                if seq > recorded.seq:
                    break
                self.held_bytes -= len(run.entries.pop(seq).payload)
            # A finished row never changes again (the recorder keeps the first end), so it confirms any status.
            if run.status is not None and (recorded.state == run.state
                                           or recorded.state in runstates.FINISHED_STATES):
                self.held_bytes -= len(run.status.payload)
                run.status = None
            self._forget_if_done(recorded.run_id, run)

    def forget(self, run_id: str) -> None:
        """Stop holding a run (another runner owns it now)."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self.held_bytes -= sum(len(h.payload) for h in self._held(run))

    def due(self, now: float, everything: bool = False) -> list[tuple[str, bytes]]:
        """The (topic, payload) pairs to send again now, entries before their status, counted as sent."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for run_id, run in list(self._runs.items()):
                for held in self._held(run):
                    if not everything and now - held.sent_at < self.resend_after:
                        continue
                    if held.sends >= self.max_sends:
                        self._let_go(run, held)
                        self.gave_up += 1
                        continue
                    held.sends += 1
                    held.sent_at = now
                    out.append((held.topic, held.payload))
                self._forget_if_done(run_id, run)
        return out

    def held(self, run_id: str) -> tuple[list[int], str | None]:
        """The seqs and the status state held for a run (for tests and stats)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return [], None
            return list(run.entries), run.state if run.status is not None else None

    # --- under the lock -------------------------------------------------------------------

    def _run(self, run_id: str) -> _HeldRun:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = _HeldRun()
        return run

    @staticmethod
    def _held(run: _HeldRun) -> list[_Held]:
        return [*run.entries.values(), *([run.status] if run.status is not None else [])]

    def _let_go(self, run: _HeldRun, held: _Held) -> None:
        self.held_bytes -= len(held.payload)
        if held is run.status:
            run.status = None
        else:
            run.entries = OrderedDict((s, h) for s, h in run.entries.items() if h is not held)

    def _forget_if_done(self, run_id: str, run: _HeldRun) -> None:
        if run.status is None and not run.entries:
            self._runs.pop(run_id, None)

    def _bound(self) -> None:
        """Let go of the oldest entries past max_bytes (statuses are small and kept)."""
        while self.held_bytes > self.max_bytes:
            oldest = next((run for run in self._runs.values() if run.entries), None)
            if oldest is None:
                return
            self.held_bytes -= len(oldest.entries.popitem(last=False)[1].payload)
            self.dropped += 1
