"""The 2015 scripting API, kept so 2015 scripts run unchanged.

    from hasapi import NodeConnection
    with NodeConnection() as conn:          # the node named by the first parameter
        conn.setVal("on", conn.params[0])   # params: the parameters after the node name
        t = conn.getVal("temperature")      # the decoded reply value
        conn.log(t)                         # an `output` log entry

As in 2015 the `with` block swallows an exception (logged as `exception`); unlike 2015 the
run then ends `failed`, in its exit_status entry, its status and its exit code.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import scripting
from hacer.nodewire import ReplyDecoder, WireError


class NodeNotConnected(Exception):
    """The node is unknown, unreachable or did not answer."""


class InvalidCommand(Exception):
    """The node refused the command (it answered with an error)."""


class InvalidResponse(Exception):
    """The node's answer could not be decoded."""


def _reply_value(raw: str) -> Any:
    """Decode a node's raw reply, as 2015's setVal returned it."""
    try:
        reply = ReplyDecoder().feed(raw.encode())
    except WireError:
        reply = None
    return reply.value if reply is not None else raw


class NodeConnection:
    """A connection to the node named by the script's first parameter."""

    def __init__(self, node_name: str | None = None) -> None:
        args = sys.argv[1:]
        self.node_name = node_name if node_name is not None else (args[0] if args else "")
        self.params = args[1:]
        self._node: scripting.Node | None = None

    def __enter__(self) -> NodeConnection:
        try:
            self._node = scripting.node(self.node_name)
        except scripting.NodeNotFound as exc:
            raise NodeNotConnected(str(exc)) from None
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            return False
        scripting.emit("exception", f"{exc_type.__name__ if exc_type else 'Exception'}: {exc}")
        scripting.mark_failed()
        return True  # swallowed, as in 2015

    def _command(self, op: str, key: str, value: Any = None) -> Any:
        if self._node is None:
            self.__enter__()
        assert self._node is not None
        try:
            result = scripting.hub().command(self._node, op, key, value)
        except scripting.CommandTimeout as exc:
            raise NodeNotConnected(str(exc)) from None
        scripting.emit("result", result.raw or (result.error or ""))
        if result.ok:
            return _reply_value(result.raw) if op == "set" else result.value
        if result.reason == "node_error":
            raise InvalidCommand(f"{key}: {result.error}")
        if result.reason == "bad_reply":
            raise InvalidResponse(f"{key}: {result.error}")
        raise NodeNotConnected(f"{self.node_name}: {result.error}")

    def setVal(self, key: str, value: Any) -> Any:  # noqa: N802 - the 2015 name
        """Set `key` to `value` on the node; return the decoded reply value."""
        scripting.emit("sent_set", f'"{key}": "{value}"')
        return self._command("set", key, value)

    def getVal(self, key: str) -> Any:  # noqa: N802 - the 2015 name
        """Return the node's value of `key`."""
        scripting.emit("sent_get", f'"{key}"')
        return self._command("get", key)

    def log(self, message: object) -> None:
        """Log an `output` entry."""
        scripting.log(message)
