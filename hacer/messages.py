"""Bus payloads as typed values: each has to_payload() and from_payload(), raising MessageError.

Times on the bus are ISO 8601 UTC strings with milliseconds ("2026-11-27T20:35:36.123Z"), read
by people with mosquitto_sub as easily as by programs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from hacer.nodewire import MAX_NODE_ID, NODE_TYPES, Value

ONLINE = "online"
OFFLINE = "offline"


class MessageError(ValueError):
    """A payload that is not the message it should be."""


def iso_time(timestamp: float) -> str:
    """Format a Unix time as the bus's ISO 8601 UTC string."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: Any) -> float:
    """Parse the bus's ISO 8601 string back into a Unix time."""
    if type(text) is not str:
        raise MessageError(f"time {text!r} is not a string")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MessageError(f"time {text!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _json_object(payload: bytes | str) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if type(body) is not dict:
        raise MessageError(f"a JSON {type(body).__name__}, not an object")
    return body


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _node_id(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_NODE_ID:
        raise MessageError(f"node id {value!r} is not an integer in 0..2^53-1")
    return value


@dataclass(frozen=True)
class Presence:
    """Retained presence of a node, published by the bridge on change only."""

    id: int
    type: str
    ip: str
    state: str
    since: float
    last_seen: float
    port: int | None = None
    interval: float | None = None
    name: str | None = None

    def to_payload(self) -> bytes:
        """Encode as the retained presence JSON."""
        body = asdict(self)
        body["since"] = iso_time(self.since)
        body["last_seen"] = iso_time(self.last_seen)
        return _dump({k: v for k, v in body.items() if v is not None})

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "Presence":
        """Decode a presence JSON."""
        body = _json_object(payload)
        try:
            presence = cls(
                id=_node_id(body["id"]),
                type=body["type"] if body["type"] in NODE_TYPES else "other",
                ip=str(body["ip"]),
                state=body["state"],
                since=parse_time(body["since"]),
                last_seen=parse_time(body["last_seen"]),
                port=body.get("port"),
                interval=body.get("interval"),
                name=body.get("name"),
            )
        except KeyError as exc:
            raise MessageError(f"presence lacks {exc}") from None
        if presence.state not in (ONLINE, OFFLINE):
            raise MessageError(f"presence state {presence.state!r} is not online or offline")
        return presence


@dataclass(frozen=True)
class NodeValues:
    """Retained last known values of a node (`{"on": 1, "temperature": 21}`)."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the retained state JSON."""
        return _dump(dict(self.values))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "NodeValues":
        """Decode a state JSON."""
        body = _json_object(payload)
        if not all(type(v) in (int, str) for v in body.values()):
            raise MessageError("node values must be integers or strings")
        return cls(body)


def _command_value(key: str, value: Any) -> Value:
    if type(value) is bool:
        return int(value)
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) not in (int, str):
        raise MessageError(f"value of {key!r} is {value!r}: send an integer or a string")
    return value


@dataclass(frozen=True)
class SetCommand:
    """A `set` request: key → value, one node command per key, in order."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the set JSON."""
        return _dump(dict(self.values))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "SetCommand":
        """Decode a set JSON object; refuse empty objects and values a node cannot hold."""
        body = _json_object(payload)
        if not body:
            raise MessageError("set needs at least one key")
        return cls({_command_key(k): _command_value(k, v) for k, v in body.items()})


def _command_key(key: Any) -> str:
    if type(key) is not str or not key or len(key) > 64:
        raise MessageError(f"key {key!r} is not a string of 1 to 64 characters")
    return key


@dataclass(frozen=True)
class GetCommand:
    """A `get` request: one key as plain text or JSON, or a JSON list of keys."""

    keys: tuple[str, ...]

    def to_payload(self) -> bytes:
        """Encode as a JSON list of keys."""
        return json.dumps(list(self.keys)).encode()

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "GetCommand":
        """Decode a key, a JSON string or a JSON list of keys."""
        text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
        try:
            body = json.loads(text)
        except ValueError:
            body = text.strip()
        keys = body if type(body) is list else [body]
        if not keys:
            raise MessageError("get needs at least one key")
        return cls(tuple(_command_key(k) for k in keys))


@dataclass(frozen=True)
class CommandResult:
    """The answer to one node command, success or failure, with the caller's correlation."""

    node_id: int
    op: str  # "set" or "get"
    key: str
    ok: bool
    value: Value | None = None
    raw: str = ""
    error: str | None = None
    correlation: str | None = None
    at: float = 0.0

    def to_payload(self) -> bytes:
        """Encode as the result JSON."""
        body = asdict(self)
        body["at"] = iso_time(self.at)
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "CommandResult":
        """Decode a result JSON."""
        body = _json_object(payload)
        try:
            return cls(
                node_id=_node_id(body["node_id"]),
                op=body["op"],
                key=body["key"],
                ok=bool(body["ok"]),
                value=body.get("value"),
                raw=body.get("raw") or "",
                error=body.get("error"),
                correlation=body.get("correlation"),
                at=parse_time(body["at"]),
            )
        except KeyError as exc:
            raise MessageError(f"result lacks {exc}") from None


@dataclass(frozen=True)
class LastSeenBatch:
    """Fresh last-seen times of the nodes that beaconed since the previous batch."""

    last_seen: dict[int, float]

    def to_payload(self) -> bytes:
        """Encode as {"nodes": {"<id>": "<time>"}}."""
        return _dump({"nodes": {str(k): iso_time(v) for k, v in self.last_seen.items()}})

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "LastSeenBatch":
        """Decode a last-seen batch."""
        body = _json_object(payload)
        nodes = body.get("nodes")
        if type(nodes) is not dict:
            raise MessageError("last-seen batch lacks its nodes object")
        try:
            return cls({int(k): parse_time(v) for k, v in nodes.items()})
        except ValueError as exc:
            raise MessageError(f"bad last-seen batch: {exc}") from None


@dataclass(frozen=True)
class BridgeStats:
    """The bridge's counters, published retained so anyone can watch for trouble."""

    datagrams: int
    accepted: int
    dropped: dict[str, int]
    kernel_drops: int
    nodes_online: int
    nodes_offline: int
    commands: dict[str, int] = field(default_factory=dict)
    publish_failures: int = 0

    def to_payload(self) -> bytes:
        """Encode as the stats JSON."""
        return _dump(asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> "BridgeStats":
        """Decode the stats JSON."""
        body = _json_object(payload)
        try:
            return cls(**body)
        except TypeError as exc:
            raise MessageError(f"bad stats: {exc}") from None
