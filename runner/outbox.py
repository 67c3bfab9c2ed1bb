"""What runners have published of their runs and no recorder has confirmed yet, kept in the database.

The broker acknowledges a publish before it saves it, so a broker that dies can lose a run's
last status or log lines after the runner saw them acknowledged; and a runner that dies takes
its memory with it. So a runner writes each log entry and each run's latest status into
`run_outbox` before it publishes them, and deletes them when a recorder says (on
`runs/recorded`) that it has written them: log entries 1..seq, and which state. The delete waits
for the outbox's next write (the next run's output or end), or `let_go_after` seconds: a commit
of its own for each run was a sixth of a run's disk writes (an SD card's wear), and a confirmed
row that outlives a crash is only sent once more. What is still held and not confirmed is sent
again after every reconnect and, while a recorder is online, once it has waited `resend_after`
seconds; a runner that takes over a dead one adopts its rows and sends them, so a run that ended
just before its runner died still reaches the database whole.

Bounded: past `max_bytes` held by one runner, its oldest log entries are let go (counted in
`dropped`; they were published once and may still wait in a recorder's broker session); a row
sent `max_sends` times without a confirmation is let go too (`gave_up`), so a message no
recorder can write is never sent forever.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Engine

from hacer import runstates
from hacer.messages import RunRecorded
from hacer.models import DriverStatement, RunOutbox, driver_transaction

STATUS_SEQ = 0  # a run's latest status is held under seq 0, beside its log entries 1..n
HELD_COLUMNS = ("runner_id", "run_id", "seq", "state", "topic", "payload", "size", "sent_at", "sends")


class Outbox:
    """See the module docstring; `runner_id` is the runner this outbox acts for. Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        runner_id: str,
        *,
        resend_after: float = 5.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_sends: int = 20,
        let_go_after: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.runner_id = runner_id
        self.resend_after = resend_after
        self.max_bytes = max_bytes
        self.max_sends = max_sends
        self.let_go_after = let_go_after
        self.clock = clock
        self.dropped = 0
        self.gave_up = 0
        self._confirmations: queue.SimpleQueue[RunRecorded] = queue.SimpleQueue()
        self._held_runs: set[str] = set()  # runs this runner holds rows of (so others' confirmations cost nothing)
        self._hold = DriverStatement(insert(RunOutbox), engine.dialect, HELD_COLUMNS)
        self._let_go_of_status = DriverStatement(
            delete(RunOutbox).where(RunOutbox.run_id == bindparam("run"), RunOutbox.seq == STATUS_SEQ), engine.dialect
        )
        self._let_go_of_entries = DriverStatement(
            delete(RunOutbox).where(
                RunOutbox.run_id == bindparam("run"), RunOutbox.seq > STATUS_SEQ, RunOutbox.seq <= bindparam("upto")
            ),
            engine.dialect,
        )
        # A finished row never changes again (the recorder keeps the first end): it confirms any status.
        self._let_go_of_confirmed_status = DriverStatement(
            delete(RunOutbox).where(
                RunOutbox.run_id == bindparam("run"),
                RunOutbox.seq == STATUS_SEQ,
                (RunOutbox.state == bindparam("state")) | bindparam("finished"),
            ),
            engine.dialect,
        )
        self._confirmed: dict[str, RunRecorded] = {}  # applied, not yet let go of (deleted)
        self._confirmed_at: float | None = None  # when the oldest of them was applied
        self._confirmed_lock = threading.Lock()

    def hold(
        self,
        run_id: str,
        entries: Sequence[tuple[int, str, bytes]] = (),
        status: tuple[str, str, bytes] | None = None,
        driver: Any = None,
        let_go: bool = True,
    ) -> None:
        """Keep (seq, topic, payload) log entries and the run's (state, topic, payload) status about to be published.

        A status replaces the one held before. In the transaction of `driver` (a driver's connection) if given;
        with `let_go`, the same transaction deletes what recorders confirmed since the last write.
        """
        now = self.clock()

        def row(seq: int, state: str, topic: str, payload: bytes) -> dict[str, object]:
            return {
                "runner_id": self.runner_id,
                "run_id": run_id,
                "seq": seq,
                "state": state,
                "topic": topic,
                "payload": payload.decode(),
                "size": len(payload),
                "sent_at": now,
                "sends": 1,
            }

        rows = [row(seq, "", topic, payload) for seq, topic, payload in entries]
        if status is not None:
            rows.append(row(STATUS_SEQ, *status))
        if not rows:
            return
        self._held_runs.add(run_id)
        with self._transaction(driver) as transaction:
            if status is not None:
                self._let_go_of_status.execute(transaction, [{"run": run_id}])
            self._hold.execute(transaction, rows)  # one statement: a run's start holds its status and launch entry
            if let_go:
                self._let_go(transaction)

    @contextmanager
    def _transaction(self, driver: Any) -> Iterator[Any]:
        """`driver` (in a caller's transaction), or a driver's connection in a transaction of the outbox's own."""
        if driver is not None:
            yield driver
            return
        with driver_transaction(self.engine) as own:  # survives a crash, not a power cut: that ends the run `lost`
            yield own

    def confirm(self, recorded: RunRecorded) -> None:
        """Note what a recorder has written (from the bus thread: applied later by apply())."""
        if recorded.run_id in self._held_runs:
            self._confirmations.put(recorded)

    def apply(self) -> None:
        """Take in what recorders confirmed since the last call; let go of it once it has waited let_go_after."""
        with self._confirmed_lock:
            while True:
                try:
                    recorded = self._confirmations.get_nowait()
                except queue.Empty:
                    break
                known = self._confirmed.get(recorded.run_id)
                if known is None or recorded.seq >= known.seq:
                    self._confirmed[recorded.run_id] = recorded
                if self._confirmed_at is None:
                    self._confirmed_at = self.clock()
            due = self._confirmed_at is not None and self.clock() - self._confirmed_at >= self.let_go_after
        if due:
            self.let_go()

    def let_go(self) -> None:
        """Delete now, in a transaction of its own, what recorders confirmed."""
        with driver_transaction(self.engine) as driver:
            let_go = self._let_go(driver)
        with self.engine.begin() as connection:
            left = set(connection.scalars(select(RunOutbox.run_id).where(RunOutbox.run_id.in_(list(let_go)))))
        self._held_runs -= set(let_go) - left

    def _let_go(self, driver: Any) -> set[str]:
        """Delete, in `driver`'s transaction, what recorders confirmed; return the runs it was of."""
        with self._confirmed_lock:
            confirmed, self._confirmed, self._confirmed_at = self._confirmed, {}, None
        if confirmed:
            self._let_go_of_entries.execute(driver, [{"run": r.run_id, "upto": r.seq} for r in confirmed.values()])
            self._let_go_of_confirmed_status.execute(
                driver,
                [
                    {"run": r.run_id, "state": r.state, "finished": r.state in runstates.FINISHED_STATES}
                    for r in confirmed.values()
                ],
            )
        return set(confirmed)

    def forget(self, run_id: str) -> None:
        """Stop holding a run (another runner owns it now)."""
        with self.engine.begin() as connection:
            connection.execute(
                delete(RunOutbox).where(RunOutbox.run_id == run_id, RunOutbox.runner_id == self.runner_id)
            )
        self._held_runs.discard(run_id)

    def adopt(self, runner_id: str) -> int:
        """Take over what `runner_id` (gone, or this runner's earlier process) still holds; return how many rows."""
        with self.engine.begin() as connection:
            run_ids = set(connection.scalars(select(RunOutbox.run_id).where(RunOutbox.runner_id == runner_id)))
            if run_ids and runner_id != self.runner_id:
                connection.execute(
                    update(RunOutbox)
                    .where(RunOutbox.runner_id == runner_id)
                    .values(runner_id=self.runner_id, sent_at=self.clock())
                )  # sent once taken over
        self._held_runs |= run_ids
        return len(run_ids)

    def due(self, everything: bool = False) -> list[tuple[str, bytes]]:
        """The (topic, payload) pairs to send again now, in the order they were held, counted as sent."""
        now = self.clock()
        with self._confirmed_lock:
            confirmed = dict(self._confirmed)
        with self.engine.begin() as connection:
            query = (
                select(
                    RunOutbox.id,
                    RunOutbox.run_id,
                    RunOutbox.seq,
                    RunOutbox.state,
                    RunOutbox.topic,
                    RunOutbox.payload,
                    RunOutbox.sends,
                )
                .where(RunOutbox.runner_id == self.runner_id)
                .order_by(RunOutbox.run_id, RunOutbox.seq == STATUS_SEQ, RunOutbox.seq)
            )
            if not everything:
                query = query.where(RunOutbox.sent_at <= now - self.resend_after)
            rows = [row for row in connection.execute(query) if not _covered(confirmed, row.run_id, row.seq, row.state)]
            if not rows:
                return []
            given_up = [row.id for row in rows if row.sends >= self.max_sends]
            sending = [row for row in rows if row.sends < self.max_sends]
            connection.execute(delete(RunOutbox).where(RunOutbox.id.in_(given_up)))
            connection.execute(
                update(RunOutbox)
                .where(RunOutbox.id.in_([row.id for row in sending]))
                .values(sent_at=now, sends=RunOutbox.sends + 1)
            )
        self.gave_up += len(given_up)
        return [(row.topic, row.payload.encode()) for row in sending]

    def bound(self) -> None:
        """Let go of this runner's oldest log entries past max_bytes (statuses are small and kept)."""
        mine = RunOutbox.runner_id == self.runner_id
        total_held = select(func.coalesce(func.sum(RunOutbox.size), 0)).where(mine)
        with self.engine.begin() as connection:
            over = (connection.scalar(total_held) or 0) > self.max_bytes
        if over:
            self.let_go()  # what is confirmed goes first, uncounted
        with self.engine.begin() as connection:
            total = connection.scalar(total_held) or 0
            if total <= self.max_bytes:
                return
            doomed, excess = [], total - self.max_bytes
            for row_id, size in connection.execute(
                select(RunOutbox.id, RunOutbox.size).where(mine, RunOutbox.seq > STATUS_SEQ).order_by(RunOutbox.id)
            ):
                if excess <= 0:
                    break
                doomed.append(row_id)
                excess -= size
            connection.execute(delete(RunOutbox).where(RunOutbox.id.in_(doomed)))
        self.dropped += len(doomed)

    def held(self, run_id: str) -> tuple[list[int], str | None]:
        """The seqs of the log entries and the state of the status held for a run, not confirmed yet."""
        with self._confirmed_lock:
            confirmed = dict(self._confirmed)
        with self.engine.begin() as connection:
            rows = [
                (seq, state)
                for seq, state in connection.execute(
                    select(RunOutbox.seq, RunOutbox.state).where(RunOutbox.run_id == run_id).order_by(RunOutbox.seq)
                )
                if not _covered(confirmed, run_id, seq, state)
            ]
        return [seq for seq, _ in rows if seq != STATUS_SEQ], next((s for q, s in rows if q == STATUS_SEQ), None)


def _covered(confirmed: dict[str, RunRecorded], run_id: str, seq: int, state: str) -> bool:
    """Whether a held row is among what recorders confirmed (the deletes of _let_go, in Python)."""
    recorded = confirmed.get(run_id)
    if recorded is None:
        return False
    if seq != STATUS_SEQ:
        return seq <= recorded.seq
    return recorded.state in runstates.FINISHED_STATES or state == recorded.state
