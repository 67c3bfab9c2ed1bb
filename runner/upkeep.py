"""The runner's two background duties: its heartbeat (with fences and takeovers) and its resends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from hacer.bus import Bus, BusError, named_decoder, payload_decoder
from hacer.messages import RecorderState, RunsRecorded
from hacer.topics import Topics
from runner.claims import ClaimStore
from runner.outbox import Outbox
from runner.run import Run

log = logging.getLogger(__name__)

CONFIRM_EVERY = 0.1  # seconds between applying recorders' confirmations to the outbox
BOUND_EVERY = 5.0  # seconds between checks of the outbox's size
# Seconds between checkpoints of a SQLite WAL: each copies the pages committed since into the
# database file and syncs it, so a page committed every minute was written twice a minute (an SD
# card's wear). Other parts' connections still checkpoint a WAL past 1000 pages themselves.
CHECKPOINT_EVERY = 300.0


class Heartbeat:
    """Beats in the database; fences the runs taken from this runner; names the runners that stopped beating."""

    def __init__(
        self,
        claims: ClaimStore,
        takeover_after: float,
        running: Callable[[], list[Run]],
        fence: Callable[[Run], None],
        take_over: Callable[[str], None],
        checkpoint: Callable[[], None],
    ) -> None:
        self.claims = claims
        self.takeover_after = takeover_after
        self.running = running  # this runner's started runs not fenced yet
        self.fence = fence
        self.take_over = take_over  # called from this thread: hand over, do not block
        self.checkpoint = checkpoint  # the database's upkeep

    def loop(self, stopped: threading.Event) -> None:
        """Beat until `stopped` is set."""
        interval = max(0.05, self.takeover_after / 4)
        checkpoint_due = time.monotonic() + CHECKPOINT_EVERY
        while not stopped.wait(interval):
            try:
                silent, watched = self.claims.watch_others(self.takeover_after)
                if watched:  # alone, a beat is a disk write no one reads (runner/claims.py)
                    self.claims.beat()
                running = self.running()
                for run_id in self.claims.taken([run.run_id for run in running]):
                    self.fence(next(run for run in running if run.run_id == run_id))
                for runner_id in silent:
                    self.take_over(runner_id)
                if time.monotonic() >= checkpoint_due:
                    checkpoint_due = time.monotonic() + CHECKPOINT_EVERY
                    self.checkpoint()
            except SQLAlchemyError as exc:
                log.warning("heartbeat failed: %s", exc)


class Resender:
    """Lets go of what recorders confirmed; sends again what they did not, all of it after a reconnect."""

    def __init__(self, bus: Bus, topics: Topics, outbox: Outbox) -> None:
        self.bus = bus
        self.topics = topics
        self.outbox = outbox
        self._everything = threading.Event()
        self._recorders_online: set[str] = set()

    def start(self) -> None:
        """Listen to the recorders' confirmations and states, and to the bus's reconnects."""
        self.bus.subscribe_decoded(
            self.topics.build("runs_recorded"), payload_decoder(RunsRecorded.from_payload), self._on_recorded, qos=0
        )
        self.bus.subscribe_decoded(
            self.topics.filter("recorder_state"),
            named_decoder(self.topics, RecorderState.from_payload, lambda state: state.recorder, "recorder"),
            self._on_recorder_state,
        )
        self.bus.on_connect(lambda session_present: self.send_everything())

    def send_everything(self) -> None:
        """Send every held message again at the next turn (after a reconnect, a takeover)."""
        self._everything.set()

    def loop(self, stopped: threading.Event) -> None:
        """Apply confirmations and send again until `stopped` is set."""
        next_check = next_bound = 0.0
        while not stopped.is_set():
            everything = self._everything.wait(CONFIRM_EVERY)
            try:
                self.outbox.apply()
                now = time.monotonic()
                if now >= next_bound:
                    self.outbox.bound()
                    next_bound = now + BOUND_EVERY
                if not self.bus.connected or not (everything or (self._recorders_online and now >= next_check)):
                    continue
                self._everything.clear()
                next_check = now + max(0.05, self.outbox.resend_after / 2)
                for topic, payload in self.outbox.due(everything):
                    self.bus.publish(topic, payload)
            except (BusError, SQLAlchemyError) as exc:
                log.warning("sending unconfirmed messages again failed: %s", exc)

    def _on_recorded(self, recorded: RunsRecorded) -> None:
        for run in recorded.recorded():
            self.outbox.confirm(run)

    def _on_recorder_state(self, state: RecorderState) -> None:
        if state.state == "online":
            self._recorders_online.add(state.recorder)
        else:
            self._recorders_online.discard(state.recorder)
