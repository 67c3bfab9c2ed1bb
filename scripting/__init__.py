"""The library automation scripts import, and the channel between a script and its runner.

A script's log entries travel to the runner on its own stdout, as lines that start with
ENTRY_MARKER followed by JSON; every other line is plain output. One pipe keeps the order in
which the script printed and logged. The runner is the only publisher of a run's log.

Importing this module is cheap: the bus (paho) is imported on the first node command, so a
script that only prints starts as fast as Python does.

    import scripting
    lamp = scripting.node("desk lamp")            # by name or id, with presence
    scripting.set(lamp, "on", 1)                  # waits for the node's answer
    scripting.log(f"temperature {scripting.get('hall', 'temperature')}")
    scripting.request_run("gettemp", ["hall"])
"""

from __future__ import annotations

# Only os and sys at import time (each import here delays every script's first line):
# json, threading, uuid and the bus are imported where first needed.
import builtins
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from hacer.bus import Bus, Message
    from hacer.messages import CommandResult
    from hacer.nodecommands import NodeCommandClient

ENTRY_MARKER = "\x1ehacer-entry "
SCRIPT_ENTRY_TYPES = ("output", "sent_set", "sent_get", "result", "exception")


class ScriptError(Exception):
    """Base of the errors this library raises."""


class NodeNotFound(ScriptError):
    """No node has that name or id."""


class AmbiguousNode(NodeNotFound):
    """A name or id that could mean more than one node."""


class CommandFailed(ScriptError):
    """The node (or the bridge on its behalf) answered with a failure."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(result.error or "command failed")
        self.result = result


class CommandTimeout(ScriptError):
    """No result came back in time (is the bridge running?)."""


class RunNotTaken(ScriptError):
    """No runner took a requested run in time (is one running?)."""


# --- the channel to the runner ----------------------------------------------------------------


def encode_entry(entry_type: str, data: str) -> str:
    """Return the line that carries one log entry to the runner."""
    import json

    return ENTRY_MARKER + json.dumps({"entry_type": entry_type, "data": data}) + "\n"


def decode_line(line: str) -> tuple[str, str]:
    """Return (entry_type, data) of one line of a script's output."""
    if line.startswith(ENTRY_MARKER):
        import json

        try:
            body = json.loads(line[len(ENTRY_MARKER) :])
            if body.get("entry_type") in SCRIPT_ENTRY_TYPES:
                return body["entry_type"], str(body.get("data", ""))
        except (ValueError, AttributeError):
            pass
    return "output", line


def emit(entry_type: str, data: str) -> None:
    """Send a log entry of this run to the runner (plain stdout when run by hand)."""
    if entry_type not in SCRIPT_ENTRY_TYPES:
        raise ValueError(f"scripts cannot log {entry_type!r} entries")
    if os.environ.get("HACER_RUN_ID"):
        sys.stdout.write(encode_entry(entry_type, data))
    else:
        sys.stdout.write(f"[{entry_type}] {data}\n")
    sys.stdout.flush()


_failed = False


def mark_failed() -> None:
    """Make the run end as failed even if the script then exits normally."""
    global _failed
    _failed = True


def failed() -> bool:
    """Tell whether the run was marked failed."""
    return _failed


# --- the run ----------------------------------------------------------------------------------


def run_id() -> str:
    """This run's id ("" when the script runs by hand)."""
    return os.environ.get("HACER_RUN_ID", "")


def params() -> list[str]:
    """The run's parameters: the node name first, then the user's parameters."""
    return sys.argv[1:]


def log(message: object) -> None:
    """Log an `output` entry."""
    emit("output", str(message))


# --- nodes through the bus --------------------------------------------------------------------


class Node:
    """A node as the bus knows it."""

    __slots__ = ("id", "name", "type", "ip", "online")

    def __init__(self, id: int, name: str, type: str, ip: str, online: bool) -> None:  # noqa: A002
        self.id, self.name, self.type, self.ip, self.online = id, name, type, ip, online

    def __repr__(self) -> str:
        return f"Node(id={self.id}, name={self.name!r}, type={self.type!r}, ip={self.ip!r}, online={self.online})"


class Hub:
    """A script's connection to the bus, made on first use."""

    def __init__(self, url: str | None = None, prefix: str | None = None) -> None:
        self.url, self.prefix = url, prefix  # None: the settings (the runner passes its own)
        self._bus: Bus | None = None
        self._commands: NodeCommandClient | None = None
        self._meta: dict[int, Any] | None = None
        self._presence: dict[int, Any] | None = None
        self._told: builtins.set[int] = builtins.set()  # the nodes the run's log was told a lookup took

    @property
    def bus(self) -> Bus:
        """The connected bus (connecting now if needed)."""
        if self._bus is None:
            import uuid

            # paho imports dnspython when installed (eventlet brings it) only for SRV lookups,
            # which hacer never does: 26 ms of every node script's start (measured 62 vs 36 ms).
            sys.modules.setdefault("dns", None)  # type: ignore[arg-type]
            from hacer.bus import Bus
            from hacer.settings import Settings
            from hacer.topics import Topics

            settings = Settings.from_env()
            bus = Bus(
                self.url or settings.mqtt_url,
                Topics(self.prefix or settings.topic_prefix),
                f"hacer-script-{run_id() or 'manual'}-{uuid.uuid4().hex[:6]}",
            )
            bus.start()
            bus.wait_connected(10)
            self._bus = bus
        return self._bus

    def close(self) -> None:
        """Disconnect."""
        if self._bus is not None:
            self._bus.stop()
            self._bus = None
            self._meta = self._presence = None  # their subscriptions went with the bus

    def nodes(self, type: str | None = None) -> list[Node]:
        """Return every node the bus knows (names from `meta`, addresses from `presence`).

        A name is the database's (`meta`): one a beacon claims counts only once the recorder let it have it.
        """
        meta, presence = (dict(found) for found in self._directory())  # a copy: the bus thread updates them
        found_nodes = []
        for node_id in sorted(meta.keys() | presence.keys()):
            seen, known = presence.get(node_id), meta.get(node_id)
            name = known.name if known else ""
            node_type = seen.type if seen else (known.type if known else "other")
            node = Node(node_id, name, node_type, seen.ip if seen else "", bool(seen and seen.state == "online"))
            if type is None or node.type == type:
                found_nodes.append(node)
        return found_nodes

    def _directory(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """The nodes' `meta` and `presence` by id, read once and then kept up to date by the bus."""
        if self._meta is None or self._presence is None:
            from hacer.messages import NodeMeta, Presence
            from hacer.topics import TopicError

            bus = self.bus
            meta: dict[int, NodeMeta] = {}
            presence: dict[int, Presence] = {}

            def keep(into: dict[int, Any], decode: Any) -> Any:
                def on_message(message: Message) -> None:
                    try:
                        node_id = bus.topics.node_id(message.topic)
                        if not message.payload:  # a deleted node's retained topics are cleared
                            into.pop(node_id, None)
                        else:
                            into[node_id] = decode(message.payload)
                    except (TopicError, ValueError):  # MessageError is a ValueError
                        return

                return on_message

            bus.subscribe(bus.topics.filter("node_meta"), keep(meta, NodeMeta.from_payload))
            bus.subscribe(bus.topics.filter("node_presence"), keep(presence, Presence.from_payload))
            bus.sync()
            self._meta, self._presence = meta, presence
        return self._meta, self._presence

    def node(self, name_or_id: str | int) -> Node:
        """Return the node with this name, or this id, and say in the run's log which one it is.

        Raises NodeNotFound, or AmbiguousNode when the name and the id are of two nodes.
        """
        wanted = str(name_or_id)
        found = {node.id: node for node in self.nodes() if wanted and wanted in (node.name, str(node.id))}
        if not found:
            raise NodeNotFound(f"no node named {wanted!r}")
        if len(found) > 1:
            raise AmbiguousNode(f"{wanted!r} could be node {' or node '.join(map(str, sorted(found)))}: rename one")
        (node,) = found.values()
        if node.id not in self._told:
            self._told.add(node.id)
            emit("output", f"node {wanted!r} is node {node.id} ({node.type} at {node.ip or 'no address yet'})")
        return node

    def command(
        self, node: Node | str | int, op: str, key: str, value: Any = None, timeout: float = 5.0
    ) -> CommandResult:
        """Send one set or get through the bridge and return its result (failures included)."""
        from hacer.messages import GetCommand, SetCommand
        from hacer.nodecommands import CommandTimeout as NoResult
        from hacer.nodecommands import NodeCommandClient

        target = node if isinstance(node, Node) else self.node(node)
        if self._commands is None:
            self._commands = NodeCommandClient(self.bus, self.bus.topics)
            self._commands.subscribe()
            self.bus.sync()  # subscribed before the first command goes out
        command = SetCommand({key: value}) if op == "set" else GetCommand((key,))
        try:
            return self._commands.command(target.id, command, timeout)[0]
        except NoResult:
            raise CommandTimeout(f"no result for {op} {key} on node {target.id} within {timeout} s") from None

    def set(self, node: Node | str | int, key: str, value: Any, timeout: float = 5.0) -> Any:
        """Set a value on a node; return the value set, raise CommandFailed if refused."""
        result = self.command(node, "set", key, value, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result.value

    def get(self, node: Node | str | int, key: str, timeout: float = 5.0) -> Any:
        """Return a value of a node; raise CommandFailed if it has none."""
        result = self.command(node, "get", key, None, timeout)
        if not result.ok:
            raise CommandFailed(result)
        return result.value

    def request_run(self, script: str, run_params: list[str] | None = None, timeout: float = 10.0) -> str:
        """Ask the runners to run another script; return its run id once a runner has taken it.

        Raises RunNotTaken when no runner took it within `timeout` seconds (it may still run later).
        """
        import uuid

        from hacer.messages import RunRequest
        from scripting.runrequest import request_until_claimed

        new_id = uuid.uuid4().hex
        request = RunRequest(script, tuple(run_params or ()), new_id, requested_by=f"script:{run_id()}")
        if request_until_claimed(self.bus, request, timeout) is None:
            raise RunNotTaken(f"no runner took run {new_id} of {script!r} within {timeout} s")
        return new_id


_hub: Hub | None = None


def hub() -> Hub:
    """The script's hub (one per process: a script is its own process)."""
    global _hub
    if _hub is None:
        _hub = Hub()
    return _hub


def nodes(type: str | None = None) -> list[Node]:
    """Return every node, or those of one type."""
    return hub().nodes(type)


def node(name_or_id: str | int) -> Node:
    """Return a node by name or id."""
    return hub().node(name_or_id)


def set(node: Node | str | int, key: str, value: Any, timeout: float = 5.0) -> Any:  # noqa: A001
    """Set a value on a node."""
    return hub().set(node, key, value, timeout)


def get(node: Node | str | int, key: str, timeout: float = 5.0) -> Any:
    """Get a value from a node."""
    return hub().get(node, key, timeout)


def request_run(script: str, run_params: list[str] | None = None, timeout: float = 10.0) -> str:
    """Request another run; return its run id once a runner has taken it (RunNotTaken otherwise)."""
    return hub().request_run(script, run_params, timeout)


def close() -> None:
    """Disconnect from the bus, if connected."""
    if _hub is not None:
        _hub.close()
