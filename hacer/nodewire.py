"""The node wire protocols of 2015: UDP beacon JSON and the TCP command encoding.

Beacon: a JSON object such as {"id": 1234567, "type": "toggle"} of at most 1024 bytes, with
optional newer fields name, interval, port and state.
Commands: integers are `i<n>e`, strings `<len>:<text>` (a string of digits goes as an integer);
set is `s<key><value>`, get is `g<key>`; a reply is `+` or `-` and one value, except that some
firmware sends raw error text after `-`, which only an idle pause ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct, field

MAX_BEACON_BYTES = 1024
# 2015 replies are a few dozen bytes; anything much longer is a broken or hostile node.
MAX_REPLY_BYTES = 4096
MAX_NODE_ID = 2**53 - 1
NODE_TYPES = ("toggle", "light_rgb", "sensor_temp", "thermostat", "other")
DEFAULT_BEACON_INTERVAL = 60.0

Value = Union[int, str]


class BeaconError(ValueError):
    """A datagram that is not a valid beacon; `reason` names the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


NodeType = Annotated[str, Meta(min_length=1, max_length=64)]
BeaconState = Annotated[dict[Annotated[str, Meta(max_length=64)], Union[int, str]], Meta(max_length=32)]


class Beacon(Struct, frozen=True, omit_defaults=True):
    """A decoded node beacon; `declared_type` is what the node said, `type` what hacer knows it as."""

    id: Annotated[int, Meta(ge=0, le=MAX_NODE_ID)]
    declared_type: NodeType = field(name="type")
    name: Annotated[str, Meta(max_length=64)] | None = None
    interval: Annotated[float, Meta(ge=1, le=86400)] | None = None
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    state: BeaconState = {}

    @property
    def type(self) -> str:
        """The node type hacer knows, `other` for one it does not."""
        return node_type(self.declared_type)

    def to_payload(self) -> bytes:
        """Encode the beacon as a node would send it."""
        return msgspec.json.encode(self)


def node_type(declared: str) -> str:
    """The known node type of a declared one: itself, or `other`."""
    return declared if declared in NODE_TYPES else "other"


def json_decode_error(exc: msgspec.DecodeError) -> str:
    """What a JSON decoding failure says to whoever sent it."""
    return f"not JSON: {str(exc).removeprefix('JSON is malformed: ')}"


_BEACON = msgspec.json.Decoder(Beacon)


def decode_beacon(datagram: bytes) -> Beacon:
    """Decode one beacon datagram; raise BeaconError with a counter reason if it is not one."""
    if len(datagram) > MAX_BEACON_BYTES:
        raise BeaconError("too_large", f"{len(datagram)} bytes, more than {MAX_BEACON_BYTES}")
    try:
        return _BEACON.decode(datagram)
    except msgspec.ValidationError as exc:
        raise BeaconError(_refusal_reason(str(exc)), str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BeaconError("not_json", json_decode_error(exc)) from None


def _refusal_reason(message: str) -> str:
    """The counter of a validation failure, from where msgspec says it is."""
    if " - at " not in message and message.startswith("Expected `object`"):
        return "not_object"
    if message.endswith(("`$.id`", "field `id`")):
        return "bad_id"
    if message.endswith(("`$.type`", "field `type`")):
        return "bad_type"
    return "bad_field"


# --- TCP command encoding -------------------------------------------------------------------


class WireError(ValueError):
    """A value that cannot be encoded, or a reply that cannot be decoded."""


def encode_value(value: Value) -> bytes:
    """Encode one value; a string of digits is sent as an integer, as the 2015 server did."""
    if type(value) is bool:
        value = int(value)
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is int:
        return b"i%de" % value
    if type(value) is str:
        if value.isascii() and value.isdigit():
            return b"i%se" % value.encode()
        raw = value.encode()
        return b"%d:%s" % (len(raw), raw)
    raise WireError(f"{value!r} is neither an integer nor a string")


def encode_set(key: str, value: Value) -> bytes:
    """Encode a set command."""
    return b"s" + encode_value(key) + encode_value(value)


def encode_get(key: str) -> bytes:
    """Encode a get command."""
    return b"g" + encode_value(key)


@dataclass(frozen=True)
class Reply:
    """A decoded node reply."""

    ok: bool
    value: Value
    raw: str


class ReplyDecoder:
    """Incremental decoder of one reply at a time, fed with bytes as they arrive.

    `feed` returns a Reply once the bytes seen hold a whole one (keeping any excess for the
    next reply) and None while more are needed. A raw error text has no end marker: after an
    idle pause the caller calls `finish`, which returns it.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.raw_error_pending = False  # True while the buffer holds an unterminated raw error

    @property
    def pending(self) -> bool:
        """Tell whether part of a reply has been received."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> Reply | None:
        """Add received bytes; return the reply they complete, if any."""
        self._buffer += data
        buf = self._buffer
        if not buf:
            return None
        if len(buf) > MAX_REPLY_BYTES:
            self._buffer = b""
            raise WireError(f"reply longer than {MAX_REPLY_BYTES} bytes: {buf[:40]!r}...")
        if buf[:1] not in (b"+", b"-"):
            raise WireError(f"reply starts with {buf[:1]!r}, not + or -")
        ok = buf[:1] == b"+"
        try:
            parsed = _parse_value(buf, 1)
        except _NotEncoded:
            if ok:
                raise WireError(f"success reply {buf[:40]!r} is not an encoded value") from None
            self.raw_error_pending = True
            return None  # raw error text: only an idle pause ends it
        if parsed is None:
            return None
        value, end = parsed
        self._buffer = buf[end:]
        return Reply(ok, value, buf[:end].decode(errors="replace"))

    def finish(self) -> Reply | None:
        """End a raw error text at an idle pause; return it, or None when nothing is pending."""
        buf, self._buffer = self._buffer, b""
        self.raw_error_pending = False
        if not buf:
            return None
        if buf[:1] == b"-":
            try:
                _parse_value(buf, 1)
            except _NotEncoded:
                text = buf[1:].decode(errors="replace").rstrip("\r\n")
                return Reply(False, text, buf.decode(errors="replace"))
        raise WireError(f"incomplete reply {buf[:40]!r}")


class _NotEncoded(Exception):
    """The bytes are not an encoded value (a raw error text, or garbage)."""


def _parse_value(buf: bytes, pos: int) -> tuple[Value, int] | None:
    """Parse an encoded value at `pos`: (value, end), or None while incomplete."""
    if pos >= len(buf):
        return None
    first = buf[pos : pos + 1]
    if first == b"i":
        end = buf.find(b"e", pos + 1)
        digits = buf[pos + 1 : end if end >= 0 else len(buf)]
        body = digits[1:] if digits[:1] == b"-" else digits
        if body and not body.isdigit() or (not body and end >= 0):
            raise _NotEncoded
        if end < 0:
            if len(digits) >= 24:
                raise _NotEncoded
            return None
        return int(digits), end + 1
    if first.isdigit():
        colon = pos
        while colon < len(buf) and buf[colon : colon + 1].isdigit():
            colon += 1
        if colon == len(buf):
            if colon - pos >= 7:
                raise _NotEncoded
            return None
        if buf[colon : colon + 1] != b":":
            raise _NotEncoded
        length = int(buf[pos:colon])
        if length > MAX_REPLY_BYTES:
            raise WireError(f"a {length}-byte value is longer than a reply may be ({MAX_REPLY_BYTES} bytes)")
        end = colon + 1 + length
        if len(buf) < end:
            return None
        return buf[colon + 1 : end].decode(errors="replace"), end
    raise _NotEncoded


def decode_request(buf: bytes) -> tuple[str, str, Value | None, int] | None:
    """Decode one command at the start of `buf` as a node does: (op, key, value, bytes used).

    Returns None while the command is incomplete; raises WireError for bytes that are not one.
    """
    if not buf:
        return None
    op = buf[:1]
    if op not in (b"s", b"g"):
        raise WireError(f"command starts with {op!r}, not s or g")
    try:
        key = _parse_value(buf, 1)
        if key is None:
            return None
        key_value, end = key
        if op == b"g":
            return "get", str(key_value), None, end
        value = _parse_value(buf, end)
    except _NotEncoded:
        raise WireError(f"command {buf[:40]!r} is not made of encoded values") from None
    if value is None:
        return None
    set_value, end = value
    return "set", str(key_value), set_value, end


def encode_reply(ok: bool, value: Value, raw_text: bool = False) -> bytes:
    """Encode a node's reply; raw_text sends an error's text bare, as some firmware does."""
    if raw_text and not ok:
        return b"-" + str(value).encode()
    return (b"+" if ok else b"-") + encode_value(value)
