"""The runners' claims and heartbeats in the database: who owns each run, decided by fences.

A claim is a row keyed by run id: inserting it is what makes a run id run once. Every later
change is a conditional UPDATE naming the owner and the state it expects, and tells whether it
matched, so a runner acts on a run only while the database says the run is its own. Whether
another runner is gone is read from its heartbeat counter here, never from a bus message: a
runner whose counter has not moved for `takeover_after` seconds (of the watcher's own clock, so
clocks need not agree) is taken over. A runner beats only while another one is there to watch it:
alone, its beats would be disk writes for no one (an SD card's wear); a runner that starts is seen
within a heartbeat interval, and beaten for from then on, well before it could take anything over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from hacer import runstates
from hacer.messages import LogEntry, MessageError, RunStatus, step_of_run
from hacer.models import (
    AutomationFire,
    AutomationStep,
    CommitSync,
    DriverStatement,
    Run,
    RunClaim,
    RunnerHeartbeat,
    RunOutbox,
    ScriptLogEntry,
    ScriptLogEntryType,
    aware_utc,
    driver_connection,
    driver_transaction,
    utc_datetime,
)

ACTIVE_STATES = (runstates.QUEUED, runstates.RUNNING)
Hold = Callable[[Any], None]  # more writes for a claim's transaction (the outbox's), on the driver's connection
Committed = Callable[[], None]  # what may go on once a claim's change is committed, while it is synced
CLAIM_COLUMNS = ("run_id", "runner_id", "state", "request", "claimed_at", "updated_at")


class AlreadyClaimed(Exception):
    """The run id has a claim already: a duplicate delivery, or a run id used again."""


@dataclass(frozen=True)
class LogSoFar:
    """A run's log as far as the database holds it."""

    last_seq: int
    after_launch: int  # entries after the launch entry: the script ran
    outputs: int
    last_output: str | None

    def account(self) -> str:
        """How far the run got, in words, for a run that was lost."""
        if not self.after_launch:
            return "nothing after its launch was recorded: the script may not have started"
        if self.last_output is None:
            return f"it had started ({self.after_launch} entries after its launch), with no output"
        lines = "1 line" if self.outputs == 1 else f"{self.outputs} lines"
        return f"it had started; {lines} of output, the last: {self.last_output[:200]!r}"


@dataclass(frozen=True)
class Claim:
    """A claim as read from the database."""

    run_id: str
    runner_id: str
    state: str
    request: str
    claimed_at: float


class ClaimStore:
    """See the module docstring; `runner_id` is the runner this store acts for."""

    def __init__(
        self,
        engine: Engine,
        runner_id: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.runner_id = runner_id
        self.clock = clock
        self.monotonic = monotonic
        self._observed: dict[str, tuple[int, float]] = {}  # runner -> (beat, when it last moved)
        self._sync = CommitSync(engine)  # who owns a run must outlive a power cut
        self._insert = DriverStatement(insert(RunClaim), engine.dialect, CLAIM_COLUMNS)

    def claim(
        self,
        run_id: str,
        request: str,
        state: str = runstates.QUEUED,
        also: Hold | None = None,
        committed: Committed | None = None,
    ) -> None:
        """Insert the claim of `run_id` for this runner, and `also` in the same transaction.

        Return once the claim survives a power cut; `committed` is called before, once it survives a
        crash. Raise AlreadyClaimed if the run id has a claim.
        """
        now = utc_datetime(self.clock())
        try:
            with driver_transaction(self.engine) as driver:
                self._insert.execute(
                    driver,
                    [
                        {
                            "run_id": run_id,
                            "runner_id": self.runner_id,
                            "state": state,
                            "request": request,
                            "claimed_at": now,
                            "updated_at": now,
                        }
                    ],
                )
                if also is not None:
                    also(driver)
        except IntegrityError:
            raise AlreadyClaimed(run_id) from None
        self._synced(committed)

    def move(
        self,
        run_id: str,
        *,
        owner: str | None = None,
        from_states: tuple[str, ...] = ACTIVE_STATES,
        state: str | None = None,
        new_owner: str | None = None,
        also: Hold | None = None,
        committed: Committed | None = None,
        sync: bool = True,
    ) -> bool:
        """Change a claim only if `owner` (default: this runner) still has it in one of `from_states`.

        `also` is done in the same transaction, and `committed` called as by claim(), only when the
        claim changed; without `sync` the change survives a crash, and a power cut once a later sync is done.
        """
        values: dict[str, object] = {"updated_at": utc_datetime(self.clock())}
        if state:
            values["state"] = state
        if new_owner:
            values["runner_id"] = new_owner
        with self.engine.begin() as connection:
            result = connection.execute(
                update(RunClaim)
                .where(
                    RunClaim.run_id == run_id,
                    RunClaim.runner_id == (owner or self.runner_id),
                    RunClaim.state.in_(from_states),
                )
                .values(**values)
            )
            moved = result.rowcount == 1
            if moved and also is not None:
                also(driver_connection(connection))
        if moved and sync:
            self._synced(committed)
        elif moved and committed is not None:
            committed()
        return moved

    def _synced(self, committed: Committed | None) -> None:
        try:
            if committed is not None:
                committed()
        finally:
            self._sync()

    def active_claims(self, runner_id: str) -> list[Claim]:
        """The queued and running claims of `runner_id`."""
        columns = (RunClaim.run_id, RunClaim.runner_id, RunClaim.state, RunClaim.request, RunClaim.claimed_at)
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(*columns).where(RunClaim.runner_id == runner_id, RunClaim.state.in_(ACTIVE_STATES))
            ).all()
        return [Claim(r.run_id, r.runner_id, r.state, r.request, aware_utc(r.claimed_at).timestamp()) for r in rows]

    def recorded_end(self, run_id: str) -> RunStatus | None:
        """The status a finished run was recorded with (the recorder's row); None while it is not finished there."""
        with self.engine.begin() as connection:
            row = connection.execute(
                select(Run.__table__).where(Run.run_id == run_id, Run.state.in_(runstates.FINISHED_STATES))
            ).first()
        if row is None:
            return None

        def when(moment: datetime | None) -> datetime | None:
            return None if moment is None else aware_utc(moment)

        try:
            return RunStatus(
                row.run_id,
                row.script,
                tuple(json.loads(row.params)),
                row.state,
                row.runner,
                row.exit_code,
                when(row.queued_at),
                when(row.started_at),
                when(row.finished_at),
                row.error,
                row.requested_by,
            )
        except (ValueError, TypeError):  # a row no status could have written (2015's): nothing to say
            return None

    def log_so_far(self, run_id: str) -> LogSoFar:
        """What a run's log holds, recorded or still held in an outbox: how a lost run got on."""
        seen: dict[int, tuple[str, str]] = {}
        with self.engine.begin() as connection:
            for seq, entry_type, data in connection.execute(
                select(ScriptLogEntry.seq, ScriptLogEntryType.name, ScriptLogEntry.data)
                .join(ScriptLogEntryType)
                .join(Run, Run.id == ScriptLogEntry.thread_id)
                .where(Run.run_id == run_id, ScriptLogEntry.seq.is_not(None))
            ):
                seen[seq] = (entry_type, data)
            for seq, payload in connection.execute(
                select(RunOutbox.seq, RunOutbox.payload).where(RunOutbox.run_id == run_id, RunOutbox.seq > 0)
            ):
                try:
                    entry = LogEntry.from_payload(payload)
                except MessageError:
                    continue
                seen[seq] = (entry.entry_type, entry.data)
        outputs = [data for _, (entry_type, data) in sorted(seen.items()) if entry_type == "output"]
        after_launch = sum(1 for entry_type, _ in seen.values() if entry_type != "launch")
        return LogSoFar(max(seen, default=0), after_launch, len(outputs), outputs[-1] if outputs else None)

    def fire_request(self, run_id: str) -> str | None:
        """The request a scheduler stored with the automation fire of `run_id`; None when no fire has that run."""
        step = step_of_run(run_id)
        if step is not None:  # a `run` step's: its step row was written with it
            fired = select(AutomationStep.run_id).where(
                AutomationStep.run_id == step[0], AutomationStep.position == step[1], AutomationStep.kind == "run"
            )
        else:
            fired = select(AutomationFire.run_id).where(
                AutomationFire.run_id == run_id, AutomationFire.pending.is_(False)
            )
        with self.engine.begin() as connection:
            return connection.scalar(select(Run.request).where(Run.run_id == run_id, fired.exists()))

    def taken(self, run_ids: list[str]) -> list[str]:
        """Those of `run_ids` taken from this runner: another runner owns them, or reported them lost."""
        if not run_ids:
            return []
        with self.engine.begin() as connection:
            return list(
                connection.scalars(
                    select(RunClaim.run_id).where(
                        RunClaim.run_id.in_(run_ids),
                        (RunClaim.runner_id != self.runner_id) | (RunClaim.state == runstates.LOST),
                    )
                )
            )

    def beat(self) -> None:
        """Move this runner's heartbeat counter on."""
        now = utc_datetime(self.clock())
        try:
            with self.engine.begin() as connection:
                result = connection.execute(
                    update(RunnerHeartbeat)
                    .where(RunnerHeartbeat.runner_id == self.runner_id)
                    .values(beat=RunnerHeartbeat.beat + 1, beat_at=now)
                )
                if result.rowcount == 0:
                    connection.execute(insert(RunnerHeartbeat).values(runner_id=self.runner_id, beat=1, beat_at=now))
        except IntegrityError:  # another process of the same id inserted it first
            pass

    def watch_others(self, takeover_after: float) -> tuple[list[str], bool]:
        """Other runners whose heartbeat has not moved for `takeover_after` seconds, as seen from here;
        and whether any other runner's has (or was first seen) within that time: one that may watch this one."""
        with self.engine.begin() as connection:
            beats = dict(connection.execute(select(RunnerHeartbeat.runner_id, RunnerHeartbeat.beat)).tuples().all())
        now = self.monotonic()
        silent, watched = [], False
        for runner_id, beat in beats.items():
            if runner_id == self.runner_id:
                continue
            seen = self._observed.get(runner_id)
            if seen is None or seen[0] != beat:
                self._observed[runner_id] = (beat, now)
                watched = True
            elif now - seen[1] >= takeover_after:
                silent.append(runner_id)
            else:
                watched = True
        return silent, watched
