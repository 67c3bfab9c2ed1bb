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
calls never stall the api's eventlet hub.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.bus import Bus, BusError, Message, named_decoder
from hacer.history import availability_of_presence, availability_of_readings, sample_rows
from hacer.messages import (
    LastSeenBatch,
    Launch,
    LogEntry,
    LogEntrySeq,
    MessageError,
    NodeReadings,
    Presence,
    RecorderState,
    RunnerState,
    RunRecorded,
    RunRequest,
    RunsRecorded,
    RunStatus,
    bus_time,
    decode,
)
from hacer.models import (
    DeadLetter,
    Node,
    NodeAvailability,
    NodeSample,
    NodeType,
    Run,
    ScriptLogEntry,
    ScriptLogEntryType,
    naive_utc,
    utc_datetime,
)
from hacer.topics import TopicError, Topics

log = logging.getLogger(__name__)

MAX_RESCUE_EVERY = 60.0  # seconds between two sends of a request no runner takes, at most

SHARE_GROUP = "hacer-recorders"
BATCH_LIMIT = 2000
GATHER_SECONDS = 0.01
META_CONFIRM_WITHIN = 10.0  # seconds for the broker to acknowledge a new node's meta
RECORDED_TOPICS = ("node_presence", "node_readings", "bridge_lastseen", "run_request", "run_status", "run_log")
DEAD_LETTER_BYTES = 1000  # of a set-aside payload kept for people to look at
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
# The runs a batch touched: run id -> (thread id, state if known, seqs of the entries written)
Touched = dict[str, tuple[int, "str | None", list[int]]]


def utc(moment: datetime | None) -> datetime | None:
    """The database's naive UTC datetime of a bus time that may be missing."""
    return None if moment is None else naive_utc(moment)


def insert_ignoring_duplicates(session: Session, table: Any, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """INSERT rows, skipping those whose `keys` already exist (SQLite and PostgreSQL)."""
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    # Rows as parameters (executemany), not a VALUES list: the statement compiles once, cached.
    session.execute(dialect.insert(table).on_conflict_do_nothing(index_elements=keys), rows)


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
        self.sessions = sessions
        self.recorder_id = recorder_id
        self.rescue_after = rescue_after
        self.purge = purge
        self.purge_every = purge_every
        self.clock = clock
        self.written = 0
        self.rescued = 0
        self._resends: dict[str, tuple[float, float]] = {}  # run id -> (last sent here, seconds until the next)
        self.set_aside = 0
        # run id -> (n, seqs above n): log entries 1..n known written, and the later ones this recorder wrote
        self._watermarks: dict[str, tuple[int, set[int]]] = {}
        self._run_states: dict[str, str] = {}  # run id -> the state this recorder last wrote or read
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._online_runners: set[str] = set()
        self._online_recorders: set[str] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._type_ids: dict[str, int] = {}
        # run id -> (thread id, script, params without the node name), for log entries: a batch
        # of entries from many runs would otherwise cost a query per run.
        self._entry_context: dict[str, tuple[int, str, str]] = {}
        self._entry_type_ids: dict[str, int] = {}

    def start(self) -> None:
        """Subscribe and start writing."""
        with self.sessions() as session:
            self._type_ids = {t.name: t.id for t in session.scalars(select(NodeType))}
            self._entry_type_ids = {t.name: t.id for t in session.scalars(select(ScriptLogEntryType))}
        for name in RECORDED_TOPICS:
            self.bus.subscribe(
                self.topics.shared(self.bus.private_group(SHARE_GROUP), self.topics.filter(name)),
                self._inbox.put,
                manual_ack=True,
            )
        self.bus.subscribe_decoded(
            self.topics.filter("runner_state"),
            named_decoder(self.topics, RunnerState.from_payload, lambda state: state.runner, "runner"),
            self._on_runner_state,
        )
        self.bus.subscribe_decoded(
            self.topics.filter("recorder_state"),
            named_decoder(self.topics, RecorderState.from_payload, lambda state: state.recorder, "recorder"),
            self._on_recorder_state,
        )
        self.bus.birth = self._state_payload()
        loops = [(self._write_loop, "recorder-writer"), (self._rescue_loop, "recorder-rescue")]
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

    def _on_runner_state(self, state: RunnerState) -> None:
        if state.state == "online":
            self._online_runners.add(state.runner)
        else:
            self._online_runners.discard(state.runner)

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
                self._publish_recorded(touched)
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
            return self._write(messages)
        except (OperationalError, InterfaceError, BusError):
            raise  # passing trouble (locked, full, connection lost, broker away): the whole batch again
        except (StatementError, ValueError) as exc:
            log.warning("a batch of %d failed (%s); writing its messages one at a time", len(messages), exc)
        touched: Touched = {}
        for message in messages:
            try:
                for run_id, (thread_id, state, seqs) in self._write([message]).items():
                    touched.setdefault(run_id, (thread_id, state, []))[2].extend(seqs)
            except (OperationalError, InterfaceError, BusError):
                raise
            except (StatementError, ValueError) as exc:
                self._set_aside([(message, f"the database refused it: {exc}")])
        return touched

    def _write(self, messages: list[Message]) -> Touched:
        """Apply messages in one transaction; return the runs they touched: thread id, state (if known), seqs."""
        new_nodes: list[Node] = []
        bad: list[tuple[Message, str]] = []
        with self.sessions() as session:
            runs: dict[str, Run] = {}
            entries: list[dict[str, Any]] = []
            samples: list[dict[str, Any]] = []
            availability: list[dict[str, Any]] = []
            last_seen: dict[int, datetime] = {}
            for message in messages:
                try:
                    name, arg = self.topics.parse(message.topic)
                    if name == "node_presence":
                        if message.payload:
                            presence = Presence.from_payload(message.payload)
                            if str(presence.id) != arg:
                                raise MessageError("the topic names another node")
                            new = self._presence(session, presence)
                            if new is not None:
                                new_nodes.append(new)
                            availability.append(availability_of_presence(presence))
                    elif name == "node_readings":
                        if message.payload:  # empty: a deleted node's readings cleared
                            readings = NodeReadings.from_payload(message.payload)
                            if str(readings.node_id) != arg:
                                raise MessageError("the topic names another node")
                            samples.extend(sample_rows(readings))
                            availability.append(availability_of_readings(readings))
                    elif name == "bridge_lastseen":
                        last_seen.update(LastSeenBatch.from_payload(message.payload).nodes)
                    elif name == "run_request":
                        self._request(session, runs, message.payload)
                    elif name == "run_status":
                        status = RunStatus.from_payload(message.payload)
                        if status.run_id != arg:
                            raise MessageError("the topic names another run")
                        self._status(session, runs, status)
                    elif name == "run_log":
                        entries.append(self._entry(session, runs, self._log_entry(arg, message, bad)))
                except (MessageError, TopicError) as exc:
                    bad.append((message, str(exc)))
            session.flush()
            contexts = {run_id: self._context(runs, run_id) for run_id in {e["run_id"] for e in entries}}
            touched: Touched = {run_id: (run.id, run.state, []) for run_id, run in runs.items()}
            for entry in entries:
                run_id = entry["run_id"]
                touched.setdefault(run_id, (contexts[run_id][0], self._run_states.get(run_id), []))[2].append(
                    entry["seq"]
                )
            for entry in entries:
                entry["thread_id"], entry["script_name"], entry["params"] = contexts[entry.pop("run_id")]
            insert_ignoring_duplicates(session, ScriptLogEntry.__table__, entries, ["thread_id", "seq"])
            insert_ignoring_duplicates(session, NodeSample.__table__, samples, ["node_id", "key", "at_ms"])
            insert_ignoring_duplicates(session, NodeAvailability.__table__, availability, ["node_id", "at_ms", "state"])
            if last_seen:
                self._last_seen(session, last_seen)
            self._add_dead_letters(session, bad)
            if new_nodes:
                # A new node's meta is at the broker before the api can see the node: a rename or
                # delete the api publishes once it does is never overtaken by this first meta.
                self.bus.publish_confirmed(
                    [(self.topics.build("node_meta", node.id), node.meta().to_payload()) for node in new_nodes],
                    retain=True,
                    timeout=META_CONFIRM_WITHIN,
                )
            session.commit()
        for run in runs.values():  # only what is committed may ever be confirmed
            self._run_states[run.run_id] = run.state
        return touched

    def _log_entry(self, run_id: str | None, message: Message, bad: list[tuple[Message, str]]) -> LogEntry:
        """The entry of a log message; one that fails its checks but names its place becomes a placeholder."""
        try:
            entry = LogEntry.from_payload(message.payload)
            if entry.run_id != run_id:
                raise MessageError("the topic names another run")
            return entry
        except MessageError as exc:
            seq = _seq_of(message.payload)
            if run_id is None or seq is None:
                raise
            bad.append((message, str(exc)))
            return LogEntry(
                run_id,
                seq,
                bus_time(self.clock()),
                "exception",
                f"[hacer: entry {seq} set aside by the recorder: {str(exc)[:200]}]",
            )

    def _set_aside(self, bad: list[tuple[Message, str]]) -> None:
        with self.sessions() as session:
            self._add_dead_letters(session, bad)
            session.commit()

    def _add_dead_letters(self, session: Session, bad: list[tuple[Message, str]]) -> None:
        for message, why in bad:
            log.warning("set aside %s: %s (%r)", message.topic[:200], why, message.payload[:200])
            session.add(
                DeadLetter(
                    topic=message.topic[:512],
                    payload=repr(message.payload[:DEAD_LETTER_BYTES]),
                    error=why[:2000],
                    recorder=self.recorder_id,
                    at=utc_datetime(self.clock()),
                )
            )
        self.set_aside += len(bad)

    def _publish_recorded(self, touched: Touched) -> None:
        """Say what is written of each run a batch touched (QoS 0: a lost one only costs a resend).

        A run's state is the one this recorder last wrote or read: another recorder may have moved
        it on since, which only delays a confirmation (runners hold what is not confirmed).
        """
        if not touched:
            return
        with self.sessions() as session:
            unknown = [run_id for run_id, (_, state, _) in touched.items() if state is None]
            if unknown:
                self._run_states.update(
                    session.execute(select(Run.run_id, Run.state).where(Run.run_id.in_(unknown))).tuples().all()
                )
            runs = [
                RunRecorded(
                    run_id, self._watermark(session, run_id, thread_id, seqs), state or self._run_states.get(run_id, "")
                )
                for run_id, (thread_id, state, seqs) in touched.items()
            ]
        # One message a batch: the broker's work is per message, and it is what sets the pace.
        self.bus.publish(
            self.topics.build("runs_recorded"), RunsRecorded.of(self.recorder_id, runs).to_payload(), qos=0
        )

    def _watermark(self, session: Session, run_id: str, thread_id: int, written: list[int]) -> int:
        """The n such that log entries 1..n of a run are all written.

        From what this recorder wrote when that leaves no gap (no query); else from the database,
        read on from the last known n (entries another recorder, or an earlier process, wrote).
        """
        known, above = self._watermarks.get(run_id, (0, set()))
        above.update(written)
        while known + 1 in above:
            above.remove(known + 1)
            known += 1
        if above:
            for seq in session.scalars(
                select(ScriptLogEntry.seq)
                .where(ScriptLogEntry.thread_id == thread_id, ScriptLogEntry.seq > known)
                .order_by(ScriptLogEntry.seq)
            ):
                if seq != known + 1:
                    break
                known = seq
            above = {seq for seq in above if seq > known}
        if len(self._watermarks) > 100_000:
            self._watermarks.clear()
            self._run_states.clear()
        self._watermarks[run_id] = (known, above)
        return known

    def _publish_state(self) -> None:
        self.bus.birth = self._state_payload()
        try:
            self.bus.publish(
                self.topics.build("recorder_state", self.recorder_id), self.bus.birth, retain=True, block=False
            )
        except BusError:
            pass  # not started yet, or stopping

    def _presence(self, session: Session, presence: Presence) -> Node | None:
        node = session.get(Node, presence.id)
        seen = utc(presence.last_seen)
        type_id = self._type_ids.get(presence.type, self._type_ids["other"])
        if node is None:
            name = presence.name or None
            # A beacon may claim a free name, never one that reads as a node id (scripts take a node by either).
            if name is not None and (name.isdigit() or session.scalar(select(Node.id).where(Node.name == name))):
                log.warning("node %s claims the name %r: refused (taken, or digits only)", presence.id, name)
                name = None
            node = Node(
                id=presence.id,
                name=name,
                type_id=type_id,
                ip=presence.ip,
                last_update=seen,
                online=presence.state == "online",
            )
            session.add(node)
            session.flush()
            return node
        node.ip, node.type_id, node.online = presence.ip, type_id, presence.state == "online"
        if node.last_update is None or (seen and seen > node.last_update):
            node.last_update = seen
        return None

    def _last_seen(self, session: Session, last_seen: dict[int, datetime]) -> None:
        known = set(session.scalars(select(Node.id).where(Node.id.in_(list(last_seen)))))
        rows = [{"id": node_id, "last_update": utc(seen)} for node_id, seen in last_seen.items() if node_id in known]
        if rows:
            session.execute(update(Node), rows)

    def _run(self, session: Session, runs: dict[str, Run], run_id: str) -> Run:
        """The run row of `run_id`, created (without details yet) when missing."""
        if run_id in runs:
            return runs[run_id]
        run = session.scalar(select(Run).where(Run.run_id == run_id))
        if run is None:
            insert_ignoring_duplicates(
                session,
                Run.__table__,
                [
                    {
                        "run_id": run_id,
                        "state": runstates.QUEUED,
                        "requested_at": utc_datetime(self.clock()),
                        "script": "",
                        "params": "[]",
                        "runner": "",
                        "requested_by": "",
                        "request": "",
                    }
                ],
                ["run_id"],
            )
            run = session.scalar(select(Run).where(Run.run_id == run_id))
            assert run is not None
        runs[run_id] = run
        return run

    def _request(self, session: Session, runs: dict[str, Run], payload: bytes) -> None:
        request = RunRequest.from_payload(payload)
        if request.run_id is None:
            return  # the runner names it; its status creates the row
        run = self._run(session, runs, request.run_id)
        if not run.request:
            run.request = request.to_payload().decode()
            run.script = run.script or request.script
            if run.params == "[]":
                run.params = json.dumps(list(request.params))
            run.requested_by = run.requested_by or request.requested_by

    def _status(self, session: Session, runs: dict[str, Run], status: RunStatus) -> None:
        run = self._run(session, runs, status.run_id)
        session.flush()
        values = {
            "state": status.state,
            "runner": status.runner,
            "exit_code": status.exit_code,
            "error": status.error,
            "script": status.script or run.script,
            "params": json.dumps(list(status.params)),
            "requested_by": status.requested_by or run.requested_by,
            "queued_at": utc(status.queued_at) or run.queued_at,
            "started_at": utc(status.started_at) or run.started_at,
            "finished_at": utc(status.finished_at) or run.finished_at,
        }
        # A finished run never changes again: a late status cannot reopen it, and its first end
        # stays (the claims make sure only one runner ends a run). Checked by the UPDATE itself,
        # not on the row read earlier: another recorder may have finished the run since that read.
        guard = (Run.id == run.id) & Run.state.not_in(runstates.FINISHED_STATES)
        session.execute(update(Run).where(guard).values(values).execution_options(synchronize_session=False))
        session.refresh(run)

    def _entry(self, session: Session, runs: dict[str, Run], entry: LogEntry) -> dict[str, Any]:
        if entry.run_id not in self._entry_context:
            run = self._run(session, runs, entry.run_id)
            if entry.entry_type == "launch" and not run.script:
                # The runner sends a run's launch entry before its first status: a run named by
                # its runner (a request without a run id) is first heard of here.
                try:
                    launch = Launch.from_data(entry.data)
                except MessageError:
                    pass
                else:
                    run.script, run.params = launch.script, json.dumps(list(launch.params))
        return {
            "run_id": entry.run_id,
            "seq": entry.seq,
            "timestamp": utc(entry.timestamp),
            "entry_type_id": self._entry_type_ids[entry.entry_type],
            "data": entry.data,
        }

    def _context(self, runs: dict[str, Run], run_id: str) -> tuple[int, str, str]:
        """(thread id, script, params without the node name) of a run, cached."""
        run = runs.get(run_id)
        if run is not None:  # touched in this batch: its row is the truth
            if len(self._entry_context) > 100_000:
                self._entry_context.clear()
            params = json.loads(run.params or "[]")
            self._entry_context[run_id] = (run.id, run.script, json.dumps(params[1:]))
        return self._entry_context[run_id]

    def _purge_loop(self) -> None:
        assert self.purge is not None
        while not self._stopping.is_set():
            try:
                self.purge()
            except Exception:  # the database away for a while: history waits for the next pass
                log.exception("purging old history failed")
            self._stopping.wait(self.purge_every)

    # --- rescue -----------------------------------------------------------------------------

    def _rescue_loop(self) -> None:
        while not self._stopping.wait(min(1.0, self.rescue_after / 2)):
            try:
                self._rescue_round()
            except Exception:
                log.exception("rescuing run requests failed")

    def _rescue_round(self) -> None:
        if self._online_runners and self.bus.connected:  # else nobody takes them, or nothing is sent into the void
            self._rescue()

    def _rescue(self) -> None:
        """Send again requests no runner took within `rescue_after` seconds, then at doubling intervals.

        A request keeps its time (`requested_at`); when it was last sent is this recorder's to know.
        """
        now = self.clock()
        cutoff = utc_datetime(now - self.rescue_after)
        with self.sessions() as session:
            stale = session.execute(
                select(Run.run_id, Run.request).where(
                    Run.runner == "", Run.state == runstates.QUEUED, Run.request != "", Run.requested_at < cutoff
                )
            ).all()
        resent = {run_id: self._resends.get(run_id, (-math.inf, 0.0)) for run_id, _ in stale}
        due = [(run_id, request) for run_id, request in stale if now - resent[run_id][0] >= resent[run_id][1]]
        for run_id, request in due:
            self.bus.publish(self.topics.build("run_request"), request)
            resent[run_id] = (now, min(max(self.rescue_after, resent[run_id][1] * 2), MAX_RESCUE_EVERY))
        self._resends = resent  # runs taken since are forgotten
        self.rescued += len(due)
        if due:
            log.warning(
                "%d run(s) not taken by any runner for %g s or more, requested again (%d wait): %s",
                len(due),
                self.rescue_after,
                len(stale),
                " ".join(run_id for run_id, _ in due[:10]) + (" ..." if len(due) > 10 else ""),
            )


def _seq_of(payload: bytes) -> int | None:
    """The seq of a log payload that may be bad otherwise."""
    try:
        return decode(LogEntrySeq, payload, "log entry").seq
    except MessageError:
        return None
