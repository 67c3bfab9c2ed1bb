"""The bridge: wires the beacon listener, the presence tracker, the command intake and relay to the bus.

It also owns the bridge's housekeeping thread (offline deadlines, last-seen batches, stats,
the last-seen checkpoint) and the repair done on every broker connect: read the retained
presence and values, adopt what it does not know, republish what the broker lost.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bridge.commands import Command, CommandRelay
from bridge.discovery import Discovery
from bridge.intake import CommandIntake
from bridge.listener import BeaconListener
from bridge.poller import Poller
from bridge.presence import PresenceTracker
from hacer.bus import Bus, BusError, Message, MessageTooLarge
from hacer.messages import (
    BridgeStats,
    CommandResult,
    LastSeenBatch,
    MessageError,
    NodeReadings,
    NodeValues,
    Presence,
    bus_time,
)
from hacer.nodewire import Value
from hacer.settings import PollPlan, private_dir
from hacer.topics import DiscoveryTopics, TopicError, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Last-seen times saved for a restart: a restored node gets a beacon interval from the start anyway
# (PresenceTracker.reconcile), so a minute-old copy is enough, and 720 file writes an hour fewer spare an SD card.
CHECKPOINT_EVERY = 60.0
POLL_TICK = 1.0  # how often due polls are looked for
# Command outcomes that say the node did not answer at all (a node's error reply is an answer).
NOT_ANSWERED = frozenset({"timeout", "unreachable", "bad_reply"})
LASTSEEN_CHUNK = 5000  # about 200 kB per message


class BusPresencePublisher:
    """Publishes the tracker's changes as retained messages without ever blocking the listener.

    What the bus cannot take at once (too many unconfirmed, or no broker) is kept, latest per
    topic, and sent again by `resend()`; the repair on each connect covers a lost broker.
    """

    def __init__(self, bus: Bus, topics: Topics) -> None:
        self._bus = bus
        self._topics = topics
        self._unsent: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.failures = 0
        self.discovery: Discovery | None = None

    def presence(self, presence: Presence) -> None:
        self.publish(self._topics.build("node_presence", presence.id), presence.to_payload())
        if self.discovery is not None:
            self.discovery.node(presence.id, presence.type)

    def values(self, node_id: int, values: dict[str, Value]) -> None:
        self.publish(self._topics.build("node_state", node_id), NodeValues(values).to_payload())

    def readings(self, readings: NodeReadings) -> None:
        self.publish(self._topics.build("node_readings", readings.node_id), readings.to_payload())

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish retained without blocking; what the bus cannot take now is kept for `resend()`."""
        with self._lock:
            try:
                sent = self._bus.publish(topic, payload, qos=1, retain=True, block=False)
            except MessageTooLarge:
                self._unsent.pop(topic, None)  # the bus counted it; resending cannot help
                return
            except BusError:
                sent = False
            if sent:
                self._unsent.pop(topic, None)
            else:
                self.failures += 1
                self._unsent[topic] = payload

    def resend(self) -> int:
        """Try again what could not be sent; return how many are still waiting."""
        with self._lock:
            waiting = list(self._unsent.items())
        for topic, payload in waiting:
            with self._lock:
                if self._unsent.get(topic) is not payload:
                    continue  # a newer message for this topic went out or is waiting
            self.publish(topic, payload)
        return len(self._unsent)


class Bridge:
    """The bridge process's parts, started and stopped together."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        *,
        discovery_host: str,
        discovery_port: int,
        node_port: int,
        offline_after: float | None,
        node_timeout: float,
        state_dir: Path | None,
        max_nodes: int = 10_000,
        new_nodes_per_second: float = 50.0,
        stats_interval: float = 10.0,
        lastseen_interval: float = 2.0,
        poll_plans: dict[str, PollPlan] | None = None,
        deadbands: dict[str, float] | None = None,
        discovery: DiscoveryTopics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.node_port = node_port
        self.clock = clock
        self.stats_interval = stats_interval
        self.lastseen_interval = lastseen_interval
        self.checkpoint_path = state_dir / "bridge-lastseen.json" if state_dir else None
        self.publisher = BusPresencePublisher(bus, topics)
        self.discovery = None if discovery is None else Discovery(bus, topics, discovery, self.publisher.publish)
        self.publisher.discovery = self.discovery
        self.tracker = PresenceTracker(
            self.publisher,
            offline_after,
            clock,
            max_nodes=max_nodes,
            new_nodes_per_second=new_nodes_per_second,
            node_port=node_port,
            deadbands=deadbands,
        )
        self.listener = BeaconListener(discovery_host, discovery_port, self.tracker.observe, clock)
        self.relay = CommandRelay(self._address_of, self._publish_result, node_timeout, clock)
        self.intake = CommandIntake(bus, topics, self.relay, clock)
        self.poller = Poller(poll_plans or {}, lambda polls: self.relay.poll(polls, over=POLL_TICK))
        self.started_at = 0.0
        self._stopping = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._polling: threading.Thread | None = None
        self._repair_lock = threading.Lock()
        self._retained_presence: dict[int, Presence] = {}
        self._retained_values: dict[int, dict[str, Value]] = {}
        self._retained_readings: dict[int, NodeReadings] = {}
        self._last_stats: BridgeStats | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, restore_timeout: float = 10.0) -> None:
        """Connect, restore the node table from the broker, then listen and serve commands."""
        self.started_at = self.clock()
        self.listener.bind()
        self.relay.start()
        self.intake.subscribe()
        # Every (re)subscription brings the retained table, which the repair after each connect
        # reads; live messages on these topics are our own, except an empty presence: a delete.
        self.bus.subscribe(self.topics.filter("node_presence"), self._on_presence)
        self.bus.subscribe(self.topics.filter("node_state"), self._on_values)
        self.bus.subscribe(self.topics.filter("node_readings"), self._on_readings)
        if self.discovery is not None:
            self.discovery.subscribe()
        self.bus.on_connect(self._on_connect)
        self.bus.start()
        if not self.intake.restored.wait(restore_timeout):
            log.warning(
                "no broker within %s s: listening anyway; the node table is restored when the broker answers",
                restore_timeout,
            )
        self.listener.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="bridge-housekeeping", daemon=True)
        self._housekeeper.start()
        if self.poller.plans:
            self._polling = threading.Thread(target=self._poll, name="bridge-poller", daemon=True)
            self._polling.start()

    def stop(self) -> None:
        """Stop listening, save the checkpoint and leave the bus (bridge state `offline`)."""
        self._stopping.set()
        self.tracker.deadline_changed.set()
        self.listener.stop()
        for thread in (self._housekeeper, self._polling):
            if thread is not None:
                thread.join(5)
        self._save_checkpoint()
        self.relay.stop()
        self.bus.stop()

    def _on_presence(self, message: Message) -> None:
        if message.retain and message.payload:
            try:
                presence = Presence.from_payload(message.payload)
            except MessageError as exc:
                log.warning("ignored retained %s: %s", message.topic, exc)
                return
            with self._repair_lock:
                self._retained_presence[presence.id] = presence
        elif not message.payload:  # cleared by the api: the node was deleted
            try:
                node_id = self.topics.node_id(message.topic)
            except TopicError:
                return
            if self.tracker.forget(node_id):
                log.info("node %s deleted: forgotten until its next beacon", node_id)
            if self.discovery is not None:
                self.discovery.forget(node_id)

    def _on_values(self, message: Message) -> None:
        kept = self._decode_retained(
            message, lambda payload: (self.topics.node_id(message.topic), NodeValues.from_payload(payload).values)
        )
        if kept is not None:
            with self._repair_lock:
                self._retained_values[kept[0]] = kept[1]

    def _on_readings(self, message: Message) -> None:
        readings = self._decode_retained(message, NodeReadings.from_payload)
        if readings is not None and self.topics.build("node_readings", readings.node_id) != message.topic:
            log.warning("ignored retained %s: it names node %s", message.topic, readings.node_id)
            return
        if readings is not None:
            with self._repair_lock:
                self._retained_readings[readings.node_id] = readings

    @staticmethod
    def _decode_retained(message: Message, decode: Callable[[bytes], T]) -> T | None:
        """A retained message decoded; None (said in the log when it is bad) for anything else."""
        if not (message.retain and message.payload):
            return None
        try:
            return decode(message.payload)
        except (MessageError, TopicError) as exc:
            log.warning("ignored retained %s: %s", message.topic, exc)
            return None

    def _address_of(self, node_id: int) -> tuple[str, int] | None:
        record = self.tracker.get(node_id)
        if record is None:
            return None
        return record.ip, record.port or self.node_port

    def _publish_result(self, result: CommandResult, command: Command) -> None:
        if not command.poll:  # the bridge's own reads are not anyone's results
            self.intake.answer(
                result, self.topics.build("node_result", command.node_id), command.correlation, command.response_topic
            )
        now = result.at.timestamp()
        if result.reason in NOT_ANSWERED:
            self.tracker.answered(command.node_id, now, result.error)
        elif result.ok or result.reason == "node_error":
            self.tracker.answered(command.node_id, now)
        if result.ok and result.value is not None:
            self.tracker.update_values(command.node_id, {result.key: result.value}, now)
            if command.op == "set" and not command.poll:
                self.poller.read_back(command.node_id, command.key, now)

    # --- repair on connect ------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        threading.Thread(target=self._repair, name="bridge-repair", daemon=True).start()

    def _repair(self) -> None:
        """Once the retained table has arrived, adopt unknown nodes and resend what differs."""
        try:
            self.bus.sync(timeout=30)
        except BusError as exc:
            log.warning("could not read the retained node table: %s", exc)
            return
        with self._repair_lock:
            presences, self._retained_presence = self._retained_presence, {}
            values, self._retained_values = self._retained_values, {}
            readings, self._retained_readings = self._retained_readings, {}
        republished = self.tracker.reconcile(
            presences.values(), values, self.started_at, self._load_checkpoint(), readings
        )
        log.info("node table: %d retained presence(s) read, %d republished", len(presences), republished)
        if self.discovery is not None:
            self.discovery.sync(self.tracker.node_types())
        self.intake.release_held()

    # --- housekeeping -----------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = self.clock()
        next_lastseen = now + self.lastseen_interval
        next_stats = now
        next_checkpoint = now + CHECKPOINT_EVERY
        while not self._stopping.is_set():
            now = self.clock()
            next_deadline = self.tracker.expire(now)
            if now >= next_lastseen:
                self._publish_lastseen()
                next_lastseen = now + self.lastseen_interval
            if now >= next_stats:
                self._publish_stats()
                next_stats = now + self.stats_interval
            if now >= next_checkpoint:
                self._save_checkpoint()
                next_checkpoint = now + CHECKPOINT_EVERY
            wake = min(next_lastseen, next_stats, next_checkpoint)
            if self.publisher.resend():
                wake = min(wake, now + 0.2)
            if next_deadline is not None:
                wake = min(wake, next_deadline)
            self.tracker.deadline_changed.clear()
            self.tracker.deadline_changed.wait(max(0.0, wake - self.clock()))

    def _poll(self) -> None:
        while not self._stopping.wait(POLL_TICK):
            self.poller.run_due(self.tracker.online_nodes(), self.clock())

    def _publish_lastseen(self) -> None:
        fresh = list(self.tracker.take_fresh().items())
        if not self.bus.connected:
            return
        # Chunks keep each message far below the broker's packet limit (100 000 nodes beaconing
        # every 6 s made a 1.3 MB batch, and mosquitto closed the connection).
        for start in range(0, len(fresh), LASTSEEN_CHUNK):
            batch = LastSeenBatch({node_id: bus_time(seen) for node_id, seen in fresh[start : start + LASTSEEN_CHUNK]})
            self.bus.publish(self.topics.build("bridge_lastseen"), batch.to_payload(), qos=0)

    def stats(self) -> BridgeStats:
        """Return the bridge's counters now."""
        online, offline = self.tracker.counts()
        return BridgeStats(
            datagrams=self.listener.datagrams,
            accepted=self.listener.accepted,
            # Beacons whose values came too soon after the node's last ones: the beacon counts, its values not.
            dropped={**self.listener.drops.counts, **self.tracker.held_back()},
            kernel_drops=self.listener.kernel_drops(),
            nodes_online=online,
            nodes_offline=offline,
            commands=dict(self.relay.counts),
            publish_failures=self.publisher.failures,
            polls=dict(self.relay.poll_counts),
        )

    def _publish_stats(self) -> None:
        stats = self.stats()
        if stats != self._last_stats and self.bus.connected:
            self.bus.publish(self.topics.build("bridge_stats"), stats.to_payload(), qos=0, retain=True)
            self._last_stats = stats

    # --- checkpoint of last-seen times (retained presence is only as fresh as its last change) -

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        try:
            private_dir(self.checkpoint_path.parent)
            scratch = self.checkpoint_path.with_suffix(".tmp")
            scratch.write_text(json.dumps(self.tracker.last_seen_all()))
            os.replace(scratch, self.checkpoint_path)
        except OSError as exc:
            log.warning("could not save %s: %s", self.checkpoint_path, exc)

    def _load_checkpoint(self) -> dict[int, float]:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return {}
        try:
            return {int(k): float(v) for k, v in json.loads(self.checkpoint_path.read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignored unreadable %s: %s", self.checkpoint_path, exc)
            return {}
