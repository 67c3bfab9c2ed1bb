"""The recorder: keeps the database in step with the bus, and rescues forgotten run requests.

It subscribes through the shared subscription `$share/hacer-recorders/...` on a durable session,
so a recorder that was down catches up and two recorders never write a message twice. Messages
are written in batches, one transaction each, and acknowledged to the broker only after the
commit: a crash loses nothing (the broker delivers them again; writes are idempotent). After
each commit it says on `runs/recorded` what it holds of every run the batch touched
(log entries 1..seq without a gap, and the run's state), so runners can let go of what they
hold and send again what is missing.

A message that cannot be written (a payload that fails its checks, or one the database refuses)
is set aside in `dead_letter` and acknowledged, never retried forever: a failing batch is written
again one message at a time to find it. A log entry set aside this way leaves a placeholder
entry, so the run's log keeps its numbering without a gap. Database errors that pass (a locked
or full database, a lost connection) are retried, with the batch kept.

It runs in its own process with plain threads (`manage.py recorder`), so blocking database
calls never stall the api's eventlet hub. The Recorder gathers and times the batches; its parts
write them (recorder/rows.py), confirm them to runners (recorder/confirming.py) and rescue
requests no runner took (recorder/rescue.py).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from hacer.bus import Bus, BusError, Message, named_decoder
from hacer.messages import RecorderState
from hacer.topics import TopicError, Topics
from recorder.confirming import Confirmer, Touched
from recorder.rescue import Rescuer
from recorder.rows import RowWriter

__all__ = ["Recorder"]

log = logging.getLogger(__name__)

SHARE_GROUP = "hacer-recorders"
BATCH_LIMIT = 2000
GATHER_SECONDS = 0.01
RECORDED_TOPICS = ("node_presence", "node_readings", "bridge_lastseen", "run_request", "run_status", "run_log")
STATE_EVERY = 5.0  # seconds between republished counters
# Messages wait, unacknowledged, to be written together: each commit writes whole pages, so a
# commit per message wore an SD card (bench/bench_disk.py). Node data that comes alone (readings,
# last-seen times) waits up to a minute: each was a commit of its own (the bridge's last-seen batch
# every 2 s, a reading at each change), most of an idle server's writes. A run's request, statuses
# and log entries wait up to a second, so a run is two commits, not a few a second: its messages
# come within that time, and confirmations to runners (runs/recorded) a second later cost nothing.
# A new node, a new run (the control app reads a run's thread id at its first status), or this many
# held, write them at once; the broker's in-flight window (100) keeps room for more.
# The api and the control app show the bus's fresher values meanwhile.
NODE_DATA_EVERY, RUN_DATA_EVERY, HELD_LIMIT = 60.0, 1.0, 50
NODE_DATA = ("node_readings", "bridge_lastseen")
RUN_DATA = ("run_request", "run_status", "run_log")


class Recorder:
    """See the module docstring. Does nothing until start()."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        *,
        recorder_id: str = "recorder",
        rescue_after: float = 5.0,
        purge: Callable[[], object] | None = None,
        purge_every: float = 3600.0,
        clock: Callable[[], float] = time.time,
        node_data_every: float = NODE_DATA_EVERY,
        run_data_every: float = RUN_DATA_EVERY,
    ) -> None:
        self.bus = bus
        self.node_data_every = node_data_every
        self.run_data_every = run_data_every
        self.topics = topics
        self.recorder_id = recorder_id
        self.purge = purge
        self.purge_every = purge_every
        self.written = 0
        self._run_states: dict[str, str] = {}  # run id -> the state this recorder last wrote or read
        self.rows = RowWriter(bus, topics, sessions, recorder_id, self._run_states, clock)
        self.confirmer = Confirmer(bus, topics, sessions, recorder_id, self._run_states)
        self.rescuer = Rescuer(bus, topics, sessions, rescue_after, clock)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._online_recorders: set[str] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def set_aside(self) -> int:
        """Messages written to `dead_letter`."""
        return self.rows.set_aside

    @property
    def rescued(self) -> int:
        """Requests sent again because no runner took them."""
        return self.rescuer.rescued

    def start(self) -> None:
        """Subscribe and start writing."""
        self.rows.load()
        for name in RECORDED_TOPICS:
            self.bus.subscribe(
                self.topics.shared(self.bus.private_group(SHARE_GROUP), self.topics.filter(name)),
                self._inbox.put,
                manual_ack=True,
            )
        self.rescuer.start()
        self.bus.subscribe_decoded(
            self.topics.filter("recorder_state"),
            named_decoder(self.topics, RecorderState.from_payload, lambda state: state.recorder, "recorder"),
            self._on_recorder_state,
        )
        self.bus.birth = self._state_payload()
        loops = [(self._write_loop, "recorder-writer"), (lambda: self.rescuer.loop(self._stopping), "recorder-rescue")]
        if self.purge is not None:
            loops.append((self._purge_loop, "recorder-purge"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.bus.start()

    def stop(self) -> None:
        """Write what was received, then leave the bus."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(10)
        # While another recorder runs, leave the shared group: the broker would go on queueing a
        # share of every run's log for this stopped session, and runners resend what it holds.
        others = self._online_recorders - {self.recorder_id}
        if others:
            log.info("recorder(s) %s online: ending this recorder's broker session", ", ".join(sorted(others)))
        self.bus.stop(end_session=bool(others))

    def _on_recorder_state(self, state: RecorderState) -> None:
        if state.state == "online":
            self._online_recorders.add(state.recorder)
        else:
            self._online_recorders.discard(state.recorder)

    def _state_payload(self) -> bytes:
        return RecorderState(self.recorder_id, "online", self.written, self.set_aside).to_payload()

    # --- writing ----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        pending: list[Message] = []
        write_by: float | None = None  # when the messages held in `pending` are to be written at the latest
        weighed = 0  # how many of `pending` write_by accounts for
        state_due = time.monotonic() + STATE_EVERY
        while not (self._stopping.is_set() and self._inbox.empty() and not pending):
            if time.monotonic() > state_due:
                self._publish_state()
                state_due = time.monotonic() + STATE_EVERY
            if not pending or write_by is not None:
                wait = 0.2 if write_by is None else write_by - time.monotonic()
                try:
                    pending.append(self._inbox.get(timeout=min(0.2, max(0.0, wait))))
                except queue.Empty:
                    if not pending:
                        continue
            # Group commit: a moment for a burst to gather, so one transaction writes many.
            gather_until = time.monotonic() + GATHER_SECONDS
            while len(pending) < BATCH_LIMIT:
                try:
                    pending.append(self._inbox.get(timeout=max(0.0, gather_until - time.monotonic())))
                except queue.Empty:
                    break
            hold = self._may_hold(pending[weighed:], len(pending))
            weighed = len(pending)
            if hold > 0:
                write_by = min(write_by or math.inf, time.monotonic() + hold)
                if time.monotonic() < write_by:
                    continue
            write_by, weighed = None, 0
            try:
                touched = self._write_batch(pending)
            except Exception:
                log.exception("writing %d message(s) failed; trying again", len(pending))
                self._stopping.wait(1.0)
                continue
            for message in pending:  # first: the broker sends no more than its in-flight window unacknowledged
                self.bus.ack(message)
            self.written += len(pending)
            pending = []
            try:
                self.confirmer.publish(touched)
            except Exception:  # a lost confirmation costs a resend, nothing more
                log.exception("saying what was recorded failed")

    def _may_hold(self, arrived: list[Message], held: int) -> float:
        """Seconds the messages that just `arrived` may wait to be written (..._DATA_EVERY); 0: at once."""
        if self._stopping.is_set() or held >= HELD_LIMIT:
            return 0.0
        hold = math.inf
        for message in arrived:
            try:
                name, arg = self.topics.parse(message.topic)
            except TopicError:
                return 0.0
            if name == "run_request" or (name == "run_status" and arg not in self._run_states):
                return 0.0  # a new run is in the database at once: the app reads its thread id on its first status
            limit = self.node_data_every if name in NODE_DATA else self.run_data_every if name in RUN_DATA else 0.0
            hold = min(hold, limit)
        return hold  # nothing arrived: math.inf, write_by stands

    def _write_batch(self, messages: list[Message]) -> Touched:
        """Write a batch in one transaction; if the database refuses it, one message at a time."""
        try:
            return self.rows.write(messages)
        except (OperationalError, InterfaceError, BusError):
            raise  # passing trouble (locked, full, connection lost, broker away): the whole batch again
        except (StatementError, ValueError) as exc:
            log.warning("a batch of %d failed (%s); writing its messages one at a time", len(messages), exc)
        touched: Touched = {}
        for message in messages:
            try:
                for run_id, (thread_id, state, seqs) in self.rows.write([message]).items():
                    touched.setdefault(run_id, (thread_id, state, []))[2].extend(seqs)
            except (OperationalError, InterfaceError, BusError):
                raise
            except (StatementError, ValueError) as exc:
                self.rows.write_dead_letters([(message, f"the database refused it: {exc}")])
        return touched

    def _publish_state(self) -> None:
        self.bus.birth = self._state_payload()
        try:
            self.bus.publish(
                self.topics.build("recorder_state", self.recorder_id), self.bus.birth, retain=True, block=False
            )
        except BusError:
            pass  # not started yet, or stopping

    def _purge_loop(self) -> None:
        assert self.purge is not None
        while not self._stopping.is_set():
            try:
                self.purge()
            except Exception:  # the database away for a while: history waits for the next pass
                log.exception("purging old history failed")
            self._stopping.wait(self.purge_every)
