"""The api's live view of the bus: node presence, names and values, runs, bridge and runners.

Fed by retained and live messages (so a new api process knows everything at once), it answers
health checks and node commands over REST, and hands every change to listeners (the websocket
relay) numbered by a sequence that clients use to resume.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec

from hacer import runstates
from hacer.automations import AutomationFired, AutomationHeldBack, AutomationState, AutomationStepEnded
from hacer.bus import Bus, Message, payload_decoder
from hacer.messages import (
    BridgeStats,
    LastSeenBatch,
    LogEntry,
    MessageError,
    NodeMeta,
    NodeReadings,
    NodeValues,
    Presence,
    RecorderState,
    RunnerState,
    RunStatus,
)
from hacer.topics import TopicError, Topics

log = logging.getLogger(__name__)

Event = dict[str, Any]
Listener = Callable[[Event], None]
HISTORY = 5000  # events kept for clients that resume after a short disconnect
ROOMS_KEPT, ROOM_HISTORY = 200, 1000  # the latest runs' log events, for clients that watch late
ROOM_BYTES = 8 << 20  # and at most this much of their text, all rooms together (oldest first out)
ENTRY_OVERHEAD = 400  # bytes a kept log event holds beside its text (dicts, times, ids)


def seen_stamp(moment: float) -> str:
    """A Unix time in the 2015 format, `YYYY-MM-DDTHH:MM:SS` (UTC)."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _size(event: Event) -> int:
    """What a kept log event holds, about: its text and a fixed overhead."""
    return len(event["data"]["data"]) + ENTRY_OVERHEAD


def run_room(run_id: str) -> str:
    """The websocket room of a run's log events."""
    return f"run:{run_id}"


class RoomLogs:
    """The latest runs' log events, for clients that watch a run late: bounded in runs, events and bytes."""

    def __init__(self) -> None:
        self.rooms: OrderedDict[str, deque[Event]] = OrderedDict()  # most recently active last
        self.bytes = 0

    def keep(self, room: str, event: Event) -> None:
        """Keep a room's event; the oldest rooms' events go first past the bounds."""
        kept = self.rooms.pop(room, None) or deque()
        kept.append(event)
        self.bytes += _size(event)
        self.rooms[room] = kept
        if len(kept) > ROOM_HISTORY:
            self.bytes -= _size(kept.popleft())
        while len(self.rooms) > ROOMS_KEPT or self.bytes > ROOM_BYTES:
            oldest = next(iter(self.rooms.values()))
            self.bytes -= _size(oldest.popleft())
            if not oldest:
                self.rooms.popitem(last=False)


class LiveView:
    """See the module docstring."""

    def __init__(self, bus: Bus, topics: Topics) -> None:
        self.bus = bus
        self.topics = topics
        self.nodes: dict[int, dict[str, Any]] = {}
        # Each node's last-seen time in the 2015 format ("YYYY-MM-DDTHH:MM:SS", UTC), for REST's
        # `last_updated`: fresher than the database's, which the recorder writes once a minute.
        self.seen_stamps: dict[int, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.bridge_state = "unknown"
        self.runners: dict[str, dict[str, Any]] = {}
        self.automations: dict[int, dict[str, Any]] = {}  # as the scheduler plans them
        # For /metrics only (no websocket events): the other parts' counters and states.
        self.bridge_stats: BridgeStats | None = None
        self.recorders: dict[str, RecorderState] = {}
        self.schedulers: dict[str, str] = {}
        self.seq = 0
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.room_logs = RoomLogs()
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        # Held while an event is numbered and told, and while a client is brought up to date
        # (`held_back`): told from the bus's thread, a live event could otherwise reach a client
        # before what an api thread replays to it, on a server whose senders write themselves.
        self._telling = threading.Lock()
        # Nodes changed by the burst of messages being handled (None: removed), sent on as one
        # event each when the bus has drained it: a new node's presence, readings and values
        # arrive as three messages but are one change to a client.
        self._changed_nodes: dict[int, dict[str, Any] | None] = {}

    def subscribe(self) -> None:
        """Register the subscriptions (before the bus starts)."""
        topics = self.topics
        for name in ("node_presence", "node_meta", "node_state", "node_readings"):
            self.bus.subscribe(topics.filter(name), self._on_node)
        self.bus.subscribe_decoded(
            topics.filter("run_log"), payload_decoder(LogEntry.from_payload), self._on_run_log, qos=1
        )
        self.bus.subscribe(topics.build("bridge_state"), self._on_bridge_state)
        self.bus.subscribe(topics.filter("automation"), self._on_automation)
        decoded: tuple[tuple[str, Callable[[bytes], Any], Callable[[Any], None]], ...] = (
            ("run_status", RunStatus.from_payload, self._on_run_status),
            ("runner_state", RunnerState.from_payload, self._on_runner_state),
            ("automation_fired", AutomationFired.from_payload, self._on_automation_fired),
            ("automation_held", AutomationHeldBack.from_payload, self._on_automation_held),
            ("automation_step", AutomationStepEnded.from_payload, self._on_automation_step),
        )
        for name, decode, handler in decoded:
            self.bus.subscribe_decoded(topics.filter(name), payload_decoder(decode), handler)
        for name in ("bridge_stats", "recorder_state", "scheduler_state"):
            self.bus.subscribe(topics.filter(name), self._on_part)
        self.bus.subscribe_decoded(
            topics.build("bridge_lastseen"), payload_decoder(LastSeenBatch.from_payload), self._on_lastseen
        )
        self.bus.on_drained(self.flush)

    def flush(self) -> None:
        """Send one event per node changed since the last flush (the bus calls it after each burst)."""
        with self._lock:
            changed, self._changed_nodes = self._changed_nodes, {}
        for node_id, data in changed.items():
            if data is None:
                self._emit("node_removed", {"id": node_id})
            else:
                self._emit("node", data)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` for every change from now on."""
        self._listeners.append(listener)

    def snapshot(self) -> Event:
        """Everything a new client needs, with the sequence number it is valid at."""
        with self._lock:
            active = [run for run in self.runs.values() if run["state"] not in runstates.FINISHED_STATES]
            return {
                "seq": self.seq,
                "nodes": sorted(self.nodes.values(), key=lambda n: n["id"]),
                "runs": active,
                "bridge": self.bridge_state,
                "runners": list(self.runners.values()),
                "automations": sorted(self.automations.values(), key=lambda a: a["id"]),
            }

    def since(self, seq: int) -> list[Event] | None:
        """The events after `seq`, or None when they are no longer all kept."""
        with self._lock:
            if seq > self.seq:
                return None
            if seq == self.seq:
                return []
            if not self.history or self.history[0]["seq"] > seq + 1:
                return None
            return [event for event in self.history if event["seq"] > seq]

    def room_events(self, room: str) -> list[Event]:
        """The kept events of a room (a run's log), for a client that joins it late."""
        with self._lock:
            return list(self.room_logs.rooms.get(room, ()))

    @contextmanager
    def held_back(self) -> Iterator[None]:
        """No event is told meanwhile: what a client is sent inside comes before any told after."""
        with self._telling:
            yield

    def _emit(self, kind: str, data: dict[str, Any], room: str | None = None) -> None:
        with self._telling:
            self._tell(self._keep(kind, data, room))

    def _keep(self, kind: str, data: dict[str, Any], room: str | None) -> Event:
        """Number an event and keep it for clients that resume or join its room late."""
        with self._lock:
            self.seq += 1
            event = {"seq": self.seq, "kind": kind, "data": data, "room": room}
            if room is None:
                self.history.append(event)
            else:
                self.room_logs.keep(room, event)
        return event

    def _tell(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # --- bus handlers -----------------------------------------------------------------------

    def _on_node(self, message: Message) -> None:
        try:
            name, arg = self.topics.parse(message.topic)
            node_id = int(arg or "")
        except (TopicError, ValueError):
            return
        if not message.payload:  # a deleted node's retained topics are cleared
            with self._lock:
                self.seen_stamps.pop(node_id, None)
                if self.nodes.pop(node_id, None) is not None:
                    self._changed_nodes[node_id] = None
            return
        try:
            with self._lock:
                node = self.nodes.setdefault(
                    node_id,
                    {
                        "id": node_id,
                        "name": "",
                        "type": "other",
                        "ip": "",
                        "state": "unknown",
                        "values": {},
                        "last_seen": None,
                    },
                )
                before = dict(node)
                if name == "node_presence":
                    presence = Presence.from_payload(message.payload)
                    self.seen_stamps[node_id] = seen_stamp(presence.last_seen.timestamp())
                    node.update(
                        type=presence.type,
                        ip=presence.ip,
                        state=presence.state,
                        last_seen=presence.last_seen.timestamp(),
                        since=presence.since.timestamp(),
                    )
                elif name == "node_meta":
                    node["name"] = NodeMeta.from_payload(message.payload).name
                elif name == "node_readings":
                    readings = NodeReadings.from_payload(message.payload)
                    node.update(
                        readings={k: {"value": r.value, "at": r.at.timestamp()} for k, r in readings.values.items()},
                        answering=readings.answering,
                        answering_since=readings.since.timestamp(),
                        answer_error=readings.error,
                    )
                else:
                    node["values"] = NodeValues.from_payload(message.payload).values
                # A new node's first `meta` (no name yet) or a retained copy seen again changes
                # nothing a client shows: not worth a frame to every client.
                if node != before:
                    self._changed_nodes[node_id] = dict(node)
        except (MessageError, ValueError) as exc:
            log.warning("ignored %s: %s", message.topic, exc)

    def _on_lastseen(self, batch: LastSeenBatch) -> None:
        """Fresh last-seen times: kept for snapshots and passed on, but not as history (no seq).

        They come every few seconds for every beaconing node: kept as events they would push
        out of the history what a reconnecting client needs.
        """
        seen = {node_id: moment.timestamp() for node_id, moment in batch.nodes.items()}
        with self._lock:
            fresh = {node_id: t for node_id, t in seen.items() if node_id in self.nodes}
            for node_id, moment in fresh.items():
                self.nodes[node_id]["last_seen"] = moment
                self.seen_stamps[node_id] = seen_stamp(moment)
        if fresh:
            self._tell({"seq": None, "kind": "lastseen", "data": fresh, "room": None})

    def _on_run_status(self, status: RunStatus) -> None:
        data = {
            "run_id": status.run_id,
            "script": status.script,
            "params": list(status.params),
            "state": status.state,
            "exit_code": status.exit_code,
            "runner": status.runner,
            "error": status.error,
        }
        with self._lock:
            if status.state in runstates.FINISHED_STATES:
                self.runs.pop(status.run_id, None)
            else:
                self.runs[status.run_id] = data
        self._emit("run", data)

    def _on_run_log(self, entry: LogEntry) -> None:
        self._emit(
            "log",
            {
                "run_id": entry.run_id,
                "seq": entry.seq,
                "entry_type": entry.entry_type,
                "data": entry.data,
                "timestamp": entry.timestamp.timestamp(),
            },
            room=run_room(entry.run_id),
        )

    def _on_bridge_state(self, message: Message) -> None:
        self.bridge_state = message.payload.decode(errors="replace")
        self._emit("bridge", {"state": self.bridge_state})

    def _on_runner_state(self, state: RunnerState) -> None:
        data = {
            "runner": state.runner,
            "state": state.state,
            "capacity": state.capacity,
            "running": list(state.running),
            "queued": state.queued,
        }
        with self._lock:
            self.runners[state.runner] = data
        self._emit("runner", data)

    def _on_part(self, message: Message) -> None:
        try:
            name, arg = self.topics.parse(message.topic)
            if name == "bridge_stats":
                self.bridge_stats = BridgeStats.from_payload(message.payload)
            elif name == "recorder_state" and arg:
                self.recorders[arg] = RecorderState.from_payload(message.payload)
            elif name == "scheduler_state" and arg:
                self.schedulers[arg] = message.payload.decode(errors="replace")
        except (TopicError, MessageError):
            return

    def _on_automation(self, message: Message) -> None:
        try:
            automation_id = int(self.topics.parse(message.topic)[1] or "")
            state = None if not message.payload else AutomationState.from_payload(message.payload)
        except (TopicError, ValueError):  # MessageError is a ValueError
            return
        if state is None:  # disabled or deleted
            with self._lock:
                removed = self.automations.pop(automation_id, None)
            if removed is not None:
                self._emit("automation_removed", {"id": automation_id})
            return
        data = {
            "id": state.id,
            "name": state.definition.name,
            "definition": msgspec.to_builtins(state.definition),
            "next_fire": None if state.next_fire is None else state.next_fire.isoformat(),
        }
        with self._lock:
            self.automations[state.id] = data
        self._emit("automation", data)

    def _on_automation_held(self, held: AutomationHeldBack) -> None:
        self._emit("automation_held", {"id": held.id, "name": held.name, "due": held.due.isoformat(), "why": held.why})

    def _on_automation_step(self, step: AutomationStepEnded) -> None:
        self._emit("automation_step", msgspec.to_builtins(step))

    def _on_automation_fired(self, fired: AutomationFired) -> None:
        self._emit(
            "automation_fired",
            {
                "id": fired.id,
                "name": fired.name,
                "due": fired.due.isoformat(),
                "run_id": fired.run_id,
                "late": fired.late,
            },
        )
