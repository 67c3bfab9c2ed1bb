"""The recorder: keeps the database in step with the bus, and rescues forgotten run requests.

It subscribes through the shared subscription `$share/hacer-recorders/...` on a durable session,
so a recorder that was down catches up and two recorders never write a message twice. Messages
are written in batches, one transaction each, and acknowledged to the broker only after the
commit: a crash loses nothing (the broker delivers them again; writes are idempotent).

It runs in its own process with plain threads (`manage.py recorder`, or started by
`manage.py api`), so blocking database calls never stall the api's eventlet hub.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.messages import (LastSeenBatch, LogEntry, MessageError, Presence, RunnerState, RunRequest,
                            RunStatus)
from hacer.models import Node, NodeType, Run, ScriptLogEntry, ScriptLogEntryType, utc_datetime
from hacer.topics import TopicError, Topics

log = logging.getLogger(__name__)

SHARE_GROUP = "hacer-recorders"
BATCH_LIMIT = 2000
GATHER_SECONDS = 0.01
META_CONFIRM_WITHIN = 10.0  # seconds for the broker to acknowledge a new node's meta
RECORDED_TOPICS = ("node_presence", "bridge_lastseen", "run_request", "run_status", "run_log")


def utc(timestamp: float | None) -> datetime | None:
    """The database's datetime of a Unix time that may be missing."""
    return None if timestamp is None else utc_datetime(timestamp)


def insert_ignoring_duplicates(session: Session, table: Any, rows: list[dict[str, Any]],
                               keys: list[str]) -> None:
    """INSERT rows, skipping those whose `keys` already exist (SQLite and PostgreSQL)."""
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    # Rows as parameters (executemany), not a VALUES list: the statement compiles once, cached.
    session.execute(dialect.insert(table).on_conflict_do_nothing(index_elements=keys), rows)


class Recorder:
    """See the module docstring. Does nothing until start()."""

    def __init__(self, bus: Bus, topics: Topics, sessions: sessionmaker[Session], *,
                 rescue_after: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.rescue_after = rescue_after
        self.clock = clock
        self.written = 0
        self.rescued = 0
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._online_runners: set[str] = set()
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
            self.bus.subscribe(self.topics.shared(SHARE_GROUP, self.topics.filter(name)), self._inbox.put,
                               manual_ack=True)
        self.bus.subscribe(self.topics.filter("runner_state"), self._on_runner_state)
        for target, name in ((self._write_loop, "recorder-writer"), (self._rescue_loop, "recorder-rescue")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.bus.start()

    def stop(self) -> None:
        """Write what was received, then leave the bus."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(10)
        self.bus.stop()

    def _on_runner_state(self, message: Message) -> None:
        try:
            state = RunnerState.from_payload(message.payload)
        except MessageError:
            return
        if state.state == "online":
            self._online_runners.add(state.runner)
        else:
            self._online_runners.discard(state.runner)

    # --- writing ----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        pending: list[Message] = []
        while not (self._stopping.is_set() and self._inbox.empty() and not pending):
            if not pending:
                try:
                    pending.append(self._inbox.get(timeout=0.2))
                except queue.Empty:
                    continue
            # Group commit: a moment for a burst to gather, so one transaction writes many.
            gather_until = time.monotonic() + GATHER_SECONDS
            while len(pending) < BATCH_LIMIT:
                try:
                    pending.append(self._inbox.get(timeout=max(0.0, gather_until - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._write(pending)
            except Exception:
                log.exception("writing %d message(s) failed; trying again", len(pending))
                self._stopping.wait(1.0)
                continue
            for message in pending:
                self.bus.ack(message)
            self.written += len(pending)
            pending = []

    def _write(self, messages: list[Message]) -> None:
        """Apply a batch in one transaction."""
        new_nodes: list[Node] = []
        with self.sessions() as session:
            runs: dict[str, Run] = {}
            entries: list[dict[str, Any]] = []
            last_seen: dict[int, float] = {}
            for message in messages:
                try:
                    name, _ = self.topics.parse(message.topic)
                    if name == "node_presence":
                        if message.payload:
                            new = self._presence(session, Presence.from_payload(message.payload))
                            if new is not None:
                                new_nodes.append(new)
                    elif name == "bridge_lastseen":
                        last_seen.update(LastSeenBatch.from_payload(message.payload).last_seen)
                    elif name == "run_request":
                        self._request(session, runs, message.payload)
                    elif name == "run_status":
                        self._status(session, runs, RunStatus.from_payload(message.payload))
                    elif name == "run_log":
                        entries.append(self._entry(session, runs, LogEntry.from_payload(message.payload)))
                except (MessageError, TopicError) as exc:
                    log.warning("not recorded: %s: %s (%r)", message.topic, exc, message.payload[:200])
            session.flush()
            contexts = {run_id: self._context(runs, run_id) for run_id in {e["run_id"] for e in entries}}
            for entry in entries:
                entry["thread_id"], entry["script_name"], entry["params"] = contexts[entry.pop("run_id")]
            insert_ignoring_duplicates(session, ScriptLogEntry.__table__, entries, ["thread_id", "seq"])
            if last_seen:
                self._last_seen(session, last_seen)
            # A new node's meta is at the broker before the api can see the node: a rename or
            # delete the api publishes once it does is never overtaken by this first meta.
            self.bus.publish_confirmed([(self.topics.build("node_meta", node.id), node.meta().to_payload())
                                        for node in new_nodes], retain=True, timeout=META_CONFIRM_WITHIN)
            session.commit()

    def _presence(self, session: Session, presence: Presence) -> Node | None:
        node = session.get(Node, presence.id)
        seen = utc(presence.last_seen)
        type_id = self._type_ids.get(presence.type, self._type_ids["other"])
        if node is None:
            taken = presence.name and session.scalar(select(Node.id).where(Node.name == presence.name))
            node = Node(id=presence.id, name=None if taken else presence.name, type_id=type_id,
                        ip=presence.ip, last_update=seen, online=presence.state == "online")
            session.add(node)
            session.flush()
            return node
        node.ip, node.type_id, node.online = presence.ip, type_id, presence.state == "online"
        if node.last_update is None or (seen and seen > node.last_update):
            node.last_update = seen
        return None

    def _last_seen(self, session: Session, last_seen: dict[int, float]) -> None:
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
            insert_ignoring_duplicates(session, Run.__table__, [{
                "run_id": run_id, "state": runstates.QUEUED, "requested_at": utc(self.clock()),
                "script": "", "params": "[]", "runner": "", "requested_by": "", "request": ""}], ["run_id"])
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
            run.request = payload.decode()
            run.script = run.script or request.script
            if run.params == "[]":
                run.params = json.dumps(list(request.params))
            run.requested_by = run.requested_by or request.requested_by

    def _status(self, session: Session, runs: dict[str, Run], status: RunStatus) -> None:
        run = self._run(session, runs, status.run_id)
        session.flush()
        values = {"state": status.state, "runner": status.runner, "exit_code": status.exit_code,
                  "error": status.error, "script": status.script or run.script,
                  "params": json.dumps(list(status.params)), "requested_by": status.requested_by or run.requested_by,
                  "queued_at": utc(status.queued_at) or run.queued_at,
                  "started_at": utc(status.started_at) or run.started_at,
                  "finished_at": utc(status.finished_at) or run.finished_at}
        guard = Run.id == run.id
        if status.state not in runstates.FINISHED_STATES:
            # A late status never reopens a finished run. Checked by the UPDATE itself, not on the
            # row read earlier: another recorder may have finished the run since that read.
            guard &= Run.state.not_in(runstates.FINISHED_STATES)
        session.execute(update(Run).where(guard).values(values).execution_options(synchronize_session=False))
        session.refresh(run)

    def _entry(self, session: Session, runs: dict[str, Run], entry: LogEntry) -> dict[str, Any]:
        if entry.run_id not in self._entry_context:
            self._run(session, runs, entry.run_id)
        return {"run_id": entry.run_id, "seq": entry.seq, "timestamp": utc(entry.timestamp),
                "entry_type_id": self._entry_type_ids[entry.entry_type], "data": entry.data}

    def _context(self, runs: dict[str, Run], run_id: str) -> tuple[int, str, str]:
        """(thread id, script, params without the node name) of a run, cached."""
        run = runs.get(run_id)
        if run is not None:  # touched in this batch: its row is the truth
            if len(self._entry_context) > 100_000:
                self._entry_context.clear()
            params = json.loads(run.params or "[]")
            self._entry_context[run_id] = (run.id, run.script, json.dumps(params[1:]))
        return self._entry_context[run_id]

    # --- rescue -----------------------------------------------------------------------------

    def _rescue_loop(self) -> None:
        while not self._stopping.wait(min(1.0, self.rescue_after / 2)):
            if not self._online_runners:
                continue  # nobody to take them: they wait in the runners' sessions
            try:
                self._rescue()
            except Exception:
                log.exception("rescuing run requests failed")

    def _rescue(self) -> None:
        """Send again requests no runner acknowledged within `rescue_after` seconds."""
        cutoff = utc(self.clock() - self.rescue_after)
        with self.sessions() as session:
            stale = session.scalars(select(Run).where(
                Run.runner == "", Run.state == runstates.QUEUED, Run.request != "",
                Run.requested_at < cutoff)).all()
            for run in stale:
                log.warning("run %s not taken by any runner for %s s: requesting it again",
                            run.run_id, self.rescue_after)
                self.bus.publish(self.topics.build("run_request"), run.request)
                run.requested_at = utc_datetime(self.clock())
                self.rescued += 1
            session.commit()

