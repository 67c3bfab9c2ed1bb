"""Node commands from the bus: checked, held until the node table is restored, then relayed; answered.

Commands come on a node's own `set` and `get` topics, and on a client's `command` topic (answered on
that client's reply topics, which the ACL binds to its id). A bad one gets a `bad_request` result
rather than silence; one that comes before the bridge has read back its node table waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

from bridge.commands import Command, CommandRelay, correlation_text
from hacer.bus import Bus, Message
from hacer.messages import ClientCommand, CommandResult, GetCommand, MessageError, SetCommand, bus_time
from hacer.topics import TopicError, Topics

log = logging.getLogger(__name__)

MAX_HELD_COMMANDS = 10_000  # commands that came before the node table was restored, kept to run after


class CommandIntake:
    """See the module docstring; `relay` sends the commands to the nodes."""

    def __init__(self, bus: Bus, topics: Topics, relay: CommandRelay, clock: Callable[[], float]) -> None:
        self.bus = bus
        self.topics = topics
        self.relay = relay
        self.clock = clock
        self.restored = threading.Event()
        self._held: list[Command] = []  # commands that came before the node table was restored
        self._held_lock = threading.Lock()

    def subscribe(self) -> None:
        """Register the command topics (before the bus starts)."""
        self.bus.subscribe(self.topics.filter("node_set"), self._on_set, send_retained=False)
        self.bus.subscribe(self.topics.filter("node_get"), self._on_get, send_retained=False)
        self.bus.subscribe(self.topics.filter("client_command"), self._on_client_command, send_retained=False)

    def release_held(self) -> None:
        """The node table is restored: relay what waited for it, and from now on everything at once."""
        with self._held_lock:
            self.restored.set()
            held, self._held = self._held, []
        for command in held:
            self.relay.submit(command)

    def _on_set(self, message: Message) -> None:
        self._on_command(message, "set")

    def _on_get(self, message: Message) -> None:
        self._on_command(message, "get")

    def _on_command(self, message: Message, op: Literal["set", "get"]) -> None:
        self._refuse_response_topic(message.response_topic, "a command on a node's own topic")
        try:
            node_id: int | None = self.topics.node_id(message.topic)
            items = (
                SetCommand.from_payload(message.payload).values.items()
                if op == "set"
                else [(key, None) for key in GetCommand.from_payload(message.payload).keys]
            )
        except (TopicError, MessageError) as exc:
            if isinstance(exc, TopicError):
                node_id, exc = None, MessageError("the node id must be ASCII digits")
            self._bad_request(node_id, op, exc, message.correlation, self.topics.result_of_command(message.topic), None)
            return
        assert node_id is not None
        for key, value in items:
            self._submit(Command(node_id, op, key, value, message.correlation))

    def _on_client_command(self, message: Message) -> None:
        """A command answered on its sender's own reply topics (the ACL binds the topic's client id to the sender)."""
        client_id = self.topics.parse(message.topic)[1]
        assert client_id is not None
        reply_to = message.response_topic
        if reply_to is not None and not self.topics.is_reply_topic(reply_to, client_id):
            self._refuse_response_topic(reply_to, f"not under {self.topics.build('reply', client_id)}")
            reply_to = None
        try:
            command = ClientCommand.from_payload(message.payload)
            op, items = command.items()
        except MessageError as exc:
            self._bad_request(None, "set", exc, message.correlation, None, reply_to)
            return
        for key, value in items:
            self._submit(Command(command.node, op, key, value, message.correlation, reply_to))

    def _submit(self, command: Command) -> None:
        """Relay a command, or hold it until the node table is restored (one sent while the bridge was away)."""
        with self._held_lock:
            if not self.restored.is_set() and len(self._held) < MAX_HELD_COMMANDS:
                self._held.append(command)
                return
        self.relay.submit(command)

    def _refuse_response_topic(self, response_topic: str | None, why: str) -> None:
        if response_topic is not None:
            self.relay.counts["bad_response_topic"] += 1
            log.warning("will not answer on response topic %.80r: %s", response_topic, why)

    def _bad_request(
        self,
        node_id: int | None,
        op: Literal["set", "get"],
        error: Exception,
        correlation: bytes | None,
        result_topic: str | None,
        response_topic: str | None,
    ) -> None:
        self.relay.counts["bad_request"] += 1
        result = CommandResult(
            node_id,
            op,
            "",
            False,
            None,
            "",
            f"bad request: {error}",
            correlation_text(correlation),
            bus_time(self.clock()),
            "bad_request",
        )
        self.answer(result, result_topic, correlation, response_topic)

    def answer(
        self, result: CommandResult, result_topic: str | None, correlation: bytes | None, response_topic: str | None
    ) -> None:
        """Publish a result on its node's result topic, and on the sender's response topic (checked before)."""
        payload = result.to_payload()
        if result_topic is not None:
            self.bus.publish(result_topic, payload, correlation=correlation)
        if response_topic is not None:
            self.bus.publish(response_topic, payload, correlation=correlation)
