"""A run's log entries and statuses: numbered, held in the outbox (written down), then published."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from hacer import runstates
from hacer.bus import Bus
from hacer.messages import Entry, LogEntry, RunRequest, RunStatus, bus_time
from hacer.runstates import RunState
from hacer.topics import Topics
from runner.outbox import Outbox
from runner.run import Run

log = logging.getLogger(__name__)


class RunPublisher:
    """The runner's one publisher of runs: the only one, so a run's entries are numbered without gaps."""

    def __init__(self, bus: Bus, topics: Topics, outbox: Outbox, runner_id: str, clock: Callable[[], float]) -> None:
        self.bus = bus
        self.topics = topics
        self.outbox = outbox
        self.runner_id = runner_id
        self.clock = clock
        self.unheld = 0  # messages the outbox could not keep (database failing): sent once

    def log(self, run: Run, *entries: Entry) -> None:
        """Publish (entry_type, data) entries, held in the outbox first."""
        if run.fenced or not entries:
            return
        held = self.entry_messages(run, *entries)
        self.hold(run.run_id, lambda: self.outbox.hold(run.run_id, held))
        for _, topic, payload in held:
            self.bus.publish(topic, payload)

    def status(
        self,
        run: Run,
        state: RunState,
        exit_code: int | None = None,
        error: str | None = None,
        finished: bool = False,
        entries: Sequence[Entry] = (),
    ) -> None:
        """Publish a run's status after `entries`, all held in the outbox (written down) first."""
        if run.fenced:
            return
        held = self.entry_messages(run, *entries)
        topic, payload = self.status_message(run, state, exit_code, error, finished)
        self.hold(run.run_id, lambda: self.outbox.hold(run.run_id, held, status=(state, topic, payload)))
        for _, entry_topic, entry_payload in held:
            self.bus.publish(entry_topic, entry_payload)
        self.bus.publish(topic, payload)

    def failed(self, run_id: str, request: RunRequest, why: str) -> None:
        """Report a run that never started `failed`, with why as its exception entry."""
        log.warning("run %s refused: %s", run_id, why)
        run = Run(request, run_id, Path(), self.clock())
        ending: list[Entry] = [("exception", why), ("exit_status", "failed")]
        self.status(run, runstates.FAILED, error=why[:2000], finished=True, entries=ending)

    def entry_messages(self, run: Run, *entries: Entry) -> list[tuple[int, str, bytes]]:
        """Number (entry_type, data) entries of a run: (seq, topic, payload) each."""
        topic, now, messages = self.topics.build("run_log", run.run_id), bus_time(self.clock()), []
        for entry_type, data in entries:
            run.seq += 1
            messages.append((run.seq, topic, LogEntry(run.run_id, run.seq, now, entry_type, data).to_payload()))
        return messages

    def status_message(
        self, run: Run, state: RunState, exit_code: int | None = None, error: str | None = None, finished: bool = False
    ) -> tuple[str, bytes]:
        """The (topic, payload) of a run's status."""
        now = bus_time(self.clock())
        status = RunStatus(
            run.run_id,
            run.request.script,
            run.request.params,
            state,
            self.runner_id,
            exit_code,
            bus_time(run.queued_at),
            None if run.started_at is None else bus_time(run.started_at),
            now if finished else None,
            error,
            run.request.requested_by,
        )
        return self.topics.build("run_status", run.run_id), status.to_payload()

    def hold(self, run_id: str, hold: Callable[[], None]) -> None:
        """Keep a message in the outbox; when the database cannot, it is still sent, once."""
        try:
            hold()
        except SQLAlchemyError as exc:
            self.unheld += 1
            log.warning(
                "run %s: a message sent without being held (the database failed: %s)", run_id, str(exc).splitlines()[0]
            )
