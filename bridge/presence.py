"""The live node table: who is online, at which address, with which last known values.

Presence is announced only on change (new node, online/offline, address, type, name, port or
interval); a beacon from a known node only refreshes its last-seen time. Offline deadlines live
in a heap checked lazily, so a beacon costs a dict lookup and no heap work.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from hacer.messages import OFFLINE, ONLINE, NodeReadings, Presence, Reading, bus_time
from hacer.nodewire import DEFAULT_BEACON_INTERVAL, Beacon, Value

log = logging.getLogger(__name__)

MAX_VALUES_PER_NODE = 64
# Values a node's beacons carry are taken at most once per this many seconds per node: a node
# beacons every 60 s, while a flood of beacons with changing values would fill the history and
# make every subscriber read the node's whole state again at each one. Command replies are not limited.
BEACON_VALUES_EVERY = 10.0


class PresencePublisher(Protocol):
    """Where the tracker announces changes."""

    def presence(self, presence: Presence) -> None:
        """Publish a node's presence (retained)."""

    def values(self, node_id: int, values: dict[str, Value]) -> None:
        """Publish a node's last known values (retained)."""

    def readings(self, readings: NodeReadings) -> None:
        """Publish a node's values with their times and whether it answers (retained)."""


@dataclass
class NodeRecord:
    """What the bridge knows of one node."""

    id: int
    type: str
    ip: str
    online: bool
    since: float
    last_seen: float
    port: int | None = None
    interval: float | None = None
    name: str | None = None
    values: dict[str, Value] = field(default_factory=dict)
    moved_from: str | None = None
    moved_at: float | None = None
    read_at: dict[str, float] = field(default_factory=dict)  # when each value was first read as it is
    answering: bool = True
    answering_since: float = 0.0
    answer_error: str | None = None
    beacon_values_at: float = -math.inf  # when values a beacon carried were last taken

    def readings(self) -> NodeReadings:
        """Return the readings message of this record."""
        return NodeReadings(
            self.id,
            {key: Reading(value, bus_time(self.read_at.get(key, self.since))) for key, value in self.values.items()},
            self.answering,
            bus_time(self.answering_since or self.since),
            None if self.answering else self.answer_error,
        )

    def presence(self) -> Presence:
        """Return the presence message of this record."""
        return Presence(
            self.id,
            self.type,
            self.ip,
            ONLINE if self.online else OFFLINE,
            bus_time(self.since),
            bus_time(self.last_seen),
            self.port,
            self.interval,
            self.name,
            self.moved_from,
            None if self.moved_at is None else bus_time(self.moved_at),
        )

    def address(self, default_port: int) -> str:
        """Return `ip:port` where this node's commands go."""
        return f"{self.ip}:{self.port or default_port}"

    def announced(self) -> tuple[object, ...]:
        """Return the fields whose change is worth announcing."""
        return (self.type, self.ip, self.online, self.port, self.interval, self.name, self.moved_from)


def same_announcement(a: Presence, b: Presence) -> bool:
    """Tell whether two presences differ only in their times."""
    return (a.type, a.ip, a.state, a.port, a.interval, a.name, a.moved_from) == (
        b.type,
        b.ip,
        b.state,
        b.port,
        b.interval,
        b.name,
        b.moved_from,
    )


class PresenceTracker:
    """Thread-safe node table with offline deadlines; see the module docstring."""

    def __init__(
        self,
        publisher: PresencePublisher,
        offline_after: float | None,
        clock: Callable[[], float],
        *,
        max_nodes: int = 10_000,
        new_nodes_per_second: float = 50.0,
        node_port: int = 7777,
        deadbands: dict[str, float] | None = None,
    ) -> None:
        self._publisher = publisher
        self._deadbands = deadbands or {}
        self._offline_after = offline_after
        self._clock = clock
        self._max_nodes = max_nodes
        self._new_per_second = new_nodes_per_second
        self._new_allowance = new_nodes_per_second  # a token bucket, one second deep
        self._new_checked = clock()
        self._node_port = node_port
        self._nodes: dict[int, NodeRecord] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._fresh: dict[int, float] = {}
        self.beacon_values_held_back = 0  # beacons whose values came sooner than BEACON_VALUES_EVERY
        self._lock = threading.Lock()
        self.deadline_changed = threading.Event()

    def offline_after(self, record: NodeRecord) -> float:
        """Seconds without a beacon before `record` goes offline."""
        if self._offline_after is not None:
            return self._offline_after
        return 3 * (record.interval or DEFAULT_BEACON_INTERVAL)

    # --- beacons ----------------------------------------------------------------------------

    def observe(self, beacon: Beacon, ip: str, now: float) -> str | None:
        """Take one beacon received from `ip` at `now`; return why it was refused, if it was.

        A new node is refused (`node_limit`, `new_node_rate`) past the node table's size or the
        rate of new nodes per second, so a flood of made-up ids cannot swamp the bus and the
        recorder; a refused node is taken at a later beacon.
        """
        name = beacon.name or None  # an empty name is no name
        with self._lock:
            record = self._nodes.get(beacon.id)
            if (
                record is not None
                and record.online
                and record.ip == ip
                and record.type == beacon.type
                and name == record.name
                and beacon.port == record.port
                and beacon.interval == record.interval
            ):
                record.last_seen = now  # the common case: nothing to announce
                self._fresh[beacon.id] = now
                if beacon.state:
                    self._merge_beacon_values(record, beacon.state, now)
                return None
            if record is None:
                refused = self._admit(now)
                if refused:
                    return refused
                record = NodeRecord(beacon.id, beacon.type, ip, True, now, now)
                self._nodes[beacon.id] = record
                # Readings exist from the start: whoever waits on them (Home Assistant's
                # availability) need not wait for the first value. After the presence (below), so
                # a client that sees the two apart sees the node online first.
                first_readings: NodeReadings | None = record.readings()
            else:
                first_readings = None
                if not record.online:
                    record.online, record.since = True, now
                if record.ip != ip or record.port != beacon.port:
                    # Beacons are unauthenticated: a move is allowed (DHCP) but never silent.
                    old = record.address(self._node_port)
                    record.moved_from, record.moved_at = old, now
                    log.warning("node %s moved from %s to %s:%s", beacon.id, old, ip, beacon.port or self._node_port)
            record.ip, record.type, record.last_seen = ip, beacon.type, now
            record.name, record.port, record.interval = name, beacon.port, beacon.interval
            self._fresh[beacon.id] = now
            self._push_deadline(record)
            self._publisher.presence(record.presence())
            if first_readings is not None:
                self._publisher.readings(first_readings)
            if beacon.state:
                self._merge_beacon_values(record, beacon.state, now)
        return None

    def _admit(self, now: float) -> str | None:
        if len(self._nodes) >= self._max_nodes:
            return "node_limit"
        self._new_allowance = min(
            self._new_per_second, self._new_allowance + (now - self._new_checked) * self._new_per_second
        )
        self._new_checked = now
        if self._new_allowance < 1:
            return "new_node_rate"
        self._new_allowance -= 1
        return None

    def _changed(self, key: str, old: Value | None, new: Value) -> bool:
        """Tell whether `new` is worth announcing over `old` (beyond the key's deadband)."""
        if old is None or type(old) is not type(new) or isinstance(new, str):
            return old != new
        assert isinstance(old, int)
        return abs(new - old) > self._deadbands.get(key, 0.0)

    def held_back(self) -> dict[str, int]:
        """Beacons whose values were not taken (`values_too_often`), for the bridge's stats when there are any."""
        return {"values_too_often": self.beacon_values_held_back} if self.beacon_values_held_back else {}

    def _merge_beacon_values(self, record: NodeRecord, values: dict[str, Value], now: float) -> None:
        if now - record.beacon_values_at < BEACON_VALUES_EVERY:
            self.beacon_values_held_back += 1
            return
        record.beacon_values_at = now
        self._merge_values(record, values, now)

    def _merge_values(self, record: NodeRecord, values: dict[str, Value], now: float) -> None:
        changed = {k: v for k, v in values.items() if self._changed(k, record.values.get(k), v)}
        if not changed:
            return
        if len(record.values.keys() | changed.keys()) > MAX_VALUES_PER_NODE:
            log.warning("node %s: values beyond %d keys are not kept", record.id, MAX_VALUES_PER_NODE)
            changed = {k: v for k, v in changed.items() if k in record.values}
        record.values.update(changed)
        record.read_at.update(dict.fromkeys(changed, now))
        self._publisher.values(record.id, dict(record.values))
        self._publisher.readings(record.readings())

    def update_values(self, node_id: int, values: dict[str, Value], now: float) -> None:
        """Record values a node reported (command replies); publish them when they change."""
        with self._lock:
            record = self._nodes.get(node_id)
            if record is not None:
                self._merge_values(record, values, now)

    def answered(self, node_id: int, now: float, error: str | None = None) -> None:
        """Record whether the node answered a command (`error` says why not); publish a change."""
        with self._lock:
            record = self._nodes.get(node_id)
            if record is None or record.answering == (error is None):
                return
            record.answering, record.answering_since, record.answer_error = error is None, now, error
            readings = record.readings()
        if error is None:
            log.info("node %s answers again", node_id)
        else:
            log.warning("node %s does not answer: %s", node_id, error)
        self._publisher.readings(readings)

    # --- deadlines --------------------------------------------------------------------------

    def _push_deadline(self, record: NodeRecord, not_before: float = 0.0) -> None:
        deadline = max(record.last_seen + self.offline_after(record), not_before)
        first = self._deadlines[0][0] if self._deadlines else None
        heapq.heappush(self._deadlines, (deadline, record.id))
        if first is None or deadline < first:
            self.deadline_changed.set()

    def expire(self, now: float) -> float | None:
        """Mark offline every node past its deadline; return the next deadline, if any."""
        gone: list[Presence] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, node_id = heapq.heappop(self._deadlines)
                record = self._nodes.get(node_id)
                if record is None or not record.online:
                    continue
                deadline = record.last_seen + self.offline_after(record)
                if deadline > now:  # beaconed since this entry was pushed
                    heapq.heappush(self._deadlines, (deadline, node_id))
                    continue
                record.online, record.since = False, deadline
                gone.append(record.presence())
            next_deadline = self._deadlines[0][0] if self._deadlines else None
        for presence in gone:
            self._publisher.presence(presence)
        return next_deadline

    # --- restore and repair -----------------------------------------------------------------

    def reconcile(
        self,
        retained: Iterable[Presence],
        retained_values: dict[int, dict[str, Value]],
        started_at: float,
        last_seen_hints: dict[int, float] | None = None,
        retained_readings: dict[int, NodeReadings] | None = None,
    ) -> int:
        """Adopt retained presence of nodes not known here; republish ours where it differs.

        A restored online node keeps its deadline, except that it gets one beacon interval
        from `started_at` to show itself (its beacons were missed while the bridge was away).
        Returns how many presences were republished.
        """
        hints = last_seen_hints or {}
        republish: list[Presence] = []
        retained_by_id = {p.id: p for p in retained}
        with self._lock:
            for node_id, presence in retained_by_id.items():
                if node_id in self._nodes:
                    continue
                last_seen = max(presence.last_seen.timestamp(), hints.get(node_id, 0.0))
                record = NodeRecord(
                    presence.id,
                    presence.type,
                    presence.ip,
                    presence.state == ONLINE,
                    presence.since.timestamp(),
                    last_seen,
                    presence.port,
                    presence.interval,
                    presence.name,
                    dict(retained_values.get(node_id, {})),
                    presence.moved_from,
                    None if presence.moved_at is None else presence.moved_at.timestamp(),
                )
                self._restore_readings(record, (retained_readings or {}).get(node_id))
                self._nodes[node_id] = record
                if record.online:
                    grace = min(record.interval or DEFAULT_BEACON_INTERVAL, self.offline_after(record))
                    self._push_deadline(record, not_before=started_at + grace)
            for node_id, record in self._nodes.items():
                theirs = retained_by_id.get(node_id)
                if theirs is None or not same_announcement(theirs, record.presence()):
                    republish.append(record.presence())
                if record.values and retained_values.get(node_id) != record.values:
                    self._publisher.values(node_id, dict(record.values))
                readings = record.readings()
                if (retained_readings or {}).get(node_id) != readings:
                    self._publisher.readings(readings)
        for presence in republish:
            self._publisher.presence(presence)
        return len(republish)

    @staticmethod
    def _restore_readings(record: NodeRecord, readings: NodeReadings | None) -> None:
        if readings is None:
            return
        for key, reading in readings.values.items():
            if record.values.get(key) == reading.value:
                record.read_at[key] = reading.at.timestamp()
        record.answering, record.answer_error = readings.answering, readings.error
        record.answering_since = readings.since.timestamp()

    def forget(self, node_id: int) -> bool:
        """Drop a node (deleted through the api); tell whether it was known."""
        with self._lock:
            return self._nodes.pop(node_id, None) is not None

    # --- reading ----------------------------------------------------------------------------

    def take_fresh(self) -> dict[int, float]:
        """Return and forget the last-seen times refreshed since the previous call."""
        with self._lock:
            fresh, self._fresh = self._fresh, {}
        return fresh

    def last_seen_all(self) -> dict[int, float]:
        """Return every node's last-seen time."""
        with self._lock:
            return {node_id: r.last_seen for node_id, r in self._nodes.items()}

    def get(self, node_id: int) -> NodeRecord | None:
        """Return the record of a node (a live object: read, do not change)."""
        return self._nodes.get(node_id)

    def node_types(self) -> list[tuple[int, str]]:
        """Return (id, type) of every node."""
        with self._lock:
            return [(node_id, r.type) for node_id, r in self._nodes.items()]

    def online_nodes(self) -> list[tuple[int, str]]:
        """Return (id, type) of every online node."""
        with self._lock:
            return [(node_id, r.type) for node_id, r in self._nodes.items() if r.online]

    def counts(self) -> tuple[int, int]:
        """Return (online, offline) node counts."""
        with self._lock:
            online = sum(1 for r in self._nodes.values() if r.online)
            return online, len(self._nodes) - online
