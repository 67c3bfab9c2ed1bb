"""Bus messages to rows: a batch applied in one transaction, idempotently (a message delivered
twice writes nothing twice), and what cannot be written set aside in `dead_letter`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.history import availability_of_presence, availability_of_readings, sample_rows
from hacer.messages import (
    LastSeenBatch,
    Launch,
    LogEntry,
    LogEntrySeq,
    MessageError,
    NodeReadings,
    Presence,
    RunRequest,
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
    insert_ignoring_duplicates,
    naive_utc,
    utc_datetime,
)
from hacer.topics import TopicError, Topics
from recorder.confirming import Touched

log = logging.getLogger(__name__)

META_CONFIRM_WITHIN = 10.0  # seconds for the broker to acknowledge a new node's meta
DEAD_LETTER_BYTES = 1000  # of a set-aside payload kept for people to look at


def utc(moment: datetime | None) -> datetime | None:
    """The database's naive UTC datetime of a bus time that may be missing."""
    return None if moment is None else naive_utc(moment)


class RowWriter:
    """Applies batches of bus messages to the database; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        recorder_id: str,
        run_states: dict[str, str],
        clock: Callable[[], float],
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.recorder_id = recorder_id
        self.run_states = run_states  # run id -> the state this recorder last wrote or read
        self.clock = clock
        self.set_aside = 0  # messages written to dead_letter
        self._type_ids: dict[str, int] = {}
        self._entry_type_ids: dict[str, int] = {}
        # run id -> (thread id, script, params without the node name), for log entries: a batch
        # of entries from many runs would otherwise cost a query per run.
        self._entry_context: dict[str, tuple[int, str, str]] = {}

    def load(self) -> None:
        """Read the node and log entry types' ids (rows the migrations made)."""
        with self.sessions() as session:
            self._type_ids = {t.name: t.id for t in session.scalars(select(NodeType))}
            self._entry_type_ids = {t.name: t.id for t in session.scalars(select(ScriptLogEntryType))}

    def write(self, messages: list[Message]) -> Touched:
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
                touched.setdefault(run_id, (contexts[run_id][0], self.run_states.get(run_id), []))[2].append(
                    entry["seq"]
                )
            for entry in entries:
                entry["thread_id"], entry["script_name"], entry["params"] = contexts[entry.pop("run_id")]
            insert_ignoring_duplicates(session, ScriptLogEntry.__table__, entries, ["thread_id", "seq"])
            insert_ignoring_duplicates(session, NodeSample.__table__, samples, ["node_id", "key", "at_ms"])
            insert_ignoring_duplicates(session, NodeAvailability.__table__, availability, ["node_id", "at_ms", "state"])
            if last_seen:
                self._last_seen(session, last_seen)
            self.add_dead_letters(session, bad)
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
            self.run_states[run.run_id] = run.state
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

    def write_dead_letters(self, bad: list[tuple[Message, str]]) -> None:
        with self.sessions() as session:
            self.add_dead_letters(session, bad)
            session.commit()

    def add_dead_letters(self, session: Session, bad: list[tuple[Message, str]]) -> None:
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


def _seq_of(payload: bytes) -> int | None:
    """The seq of a log payload that may be bad otherwise."""
    try:
        return decode(LogEntrySeq, payload, "log entry").seq
    except MessageError:
        return None
