"""Node commands through the bridge: publish a set or get, wait for its results by correlation.

The api (REST set/get) and the scripting library both use this one client.
"""

from __future__ import annotations

import threading
import uuid

from hacer.bus import Bus, Message
from hacer.messages import CommandResult, GetCommand, MessageError, SetCommand
from hacer.topics import Topics


class CommandTimeout(Exception):
    """The bridge sent no (or not every) result in time."""


class NodeCommandClient:
    """Sends node commands on a bus and hands each result to the caller that asked for it."""

    def __init__(self, bus: Bus, topics: Topics) -> None:
        self.bus = bus
        self.topics = topics
        self._waiting: dict[bytes, tuple[threading.Event, list[CommandResult]]] = {}

    def subscribe(self) -> None:
        """Register for every node's results (before or after the bus starts)."""
        self.bus.subscribe(self.topics.filter("node_result"), self._on_result)

    def _on_result(self, message: Message) -> None:
        waiter = self._waiting.get(message.correlation) if message.correlation else None
        if waiter is None:
            return  # someone else's command
        try:
            waiter[1].append(CommandResult.from_payload(message.payload))
        except MessageError:
            return
        waiter[0].set()

    def command(self, node_id: int, command: SetCommand | GetCommand, timeout: float) -> list[CommandResult]:
        """Send `command` to a node and return its results, one per key (failures included)."""
        op = "set" if isinstance(command, SetCommand) else "get"
        count = len(command.values) if isinstance(command, SetCommand) else len(command.keys)
        correlation = uuid.uuid4().hex.encode()
        arrived = threading.Event()
        results: list[CommandResult] = []
        self._waiting[correlation] = (arrived, results)
        try:
            self.bus.publish(self.topics.build(f"node_{op}", node_id), command.to_payload(), correlation=correlation)
            while len(results) < count:
                if not arrived.wait(timeout):
                    raise CommandTimeout(f"the bridge answered {len(results)} of {count} within {timeout} s")
                arrived.clear()
            return results
        finally:
            self._waiting.pop(correlation, None)
