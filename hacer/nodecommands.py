"""Node commands through the bridge: publish a set or get, wait for its results by correlation.

The api (REST set/get) and the scripting library both use this one client. Commands go on the
client's own command topic and are answered on its own reply topics, which only the bridge may
publish on and only this client read (mosquitto/acl): no other client can feed it a result.
"""

from __future__ import annotations

import math
import threading
import uuid

from hacer.bus import Bus, Message
from hacer.messages import ClientCommand, CommandResult, GetCommand, MessageError, SetCommand
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
        """Register for this client's results (before or after the bus starts)."""
        self.bus.subscribe(self.topics.build("reply", self.bus.client_id), self._on_result)

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
        correlation = uuid.uuid4().hex.encode()
        arrived = threading.Event()
        results: list[CommandResult] = []
        self._waiting[correlation] = (arrived, results)
        if isinstance(command, SetCommand):
            body, count = ClientCommand(node_id, set=dict(command.values)), len(command.values)
        else:
            body, count = ClientCommand(node_id, get=list(command.keys)), len(command.keys)
        try:
            self.bus.publish(
                self.topics.build("client_command", self.bus.client_id),
                body.to_payload(),
                correlation=correlation,
                response_topic=self.topics.build("reply", self.bus.client_id),  # requests told apart by correlation
                expiry=math.ceil(timeout),  # not done later than its sender waits for it (a bridge restarting)
            )
            while len(results) < count:
                if not arrived.wait(timeout):
                    raise CommandTimeout(f"the bridge answered {len(results)} of {count} within {timeout} s")
                arrived.clear()
            return results
        finally:
            self._waiting.pop(correlation, None)
