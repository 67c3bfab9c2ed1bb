"""Bus payloads, declared once as msgspec structs: their types, ranges and lengths are the checks.

Each payload has to_payload() and from_payload() (raising MessageError); hacer/schemas.py derives
from the same declarations the JSON schemas that the AsyncAPI and OpenAPI documents show.
Times on the bus are RFC 3339 UTC strings ("2026-11-27T20:35:36.123456Z"), read by people with
mosquitto_sub as easily as by programs; in Python they are aware datetimes.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar, Union, get_args

import msgspec
from msgspec import Meta, Struct, field
from msgspec.structs import force_setattr

from hacer.nodewire import MAX_NODE_ID, NODE_TYPES, Value, json_decode_error, node_type
from hacer.runstates import RunState

ONLINE: Final = "online"
OFFLINE: Final = "offline"
MAX_NODE_NAME = 64  # the node.name column
MAX_KEY_CHARS = 64
MAX_PARAMS = 32
MAX_PARAM_CHARS = 1024
MAX_SCRIPT_CHARS = 255  # the run.script column
MAX_RUNNER_CHARS = 128  # the run.runner column
MAX_REQUESTER_CHARS = 64  # the run.requested_by column
MAX_ERROR_CHARS = 4096
MAX_SEQ = 2**31 - 1
MAX_ENTRY_CHARS = 1 << 20  # above the runner's own batches (64 KiB) and under the broker's packet limit
MAX_RECORDED_RUNS = 10_000
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=UTC)  # later times are someone's mistake, not a node's

# No database column holds a NUL; the pattern reads the same in Python and in JSON Schema.
NO_NUL = "^[^\\u0000]*$"


Name = Annotated[str, Meta(max_length=MAX_NODE_NAME, pattern=NO_NUL)]
Address = Annotated[str, Meta(max_length=80, pattern=NO_NUL)]
ScriptName = Annotated[str, Meta(max_length=MAX_SCRIPT_CHARS, pattern=NO_NUL)]
RunnerName = Annotated[str, Meta(max_length=MAX_RUNNER_CHARS, pattern=NO_NUL)]
PartName = Annotated[str, Meta(min_length=1, max_length=MAX_RUNNER_CHARS, pattern=NO_NUL)]
Requester = Annotated[str, Meta(max_length=MAX_REQUESTER_CHARS, pattern=NO_NUL)]
ErrorText = Annotated[str, Meta(max_length=MAX_ERROR_CHARS, pattern=NO_NUL)]
Param = Annotated[str, Meta(max_length=MAX_PARAM_CHARS, pattern=NO_NUL)]
EntryData = Annotated[str, Meta(max_length=MAX_ENTRY_CHARS, pattern=NO_NUL)]
# Results go to callers, not to the database: bounded, but a node's NUL may pass.
ResultText = Annotated[str, Meta(max_length=8192)]
NodeId = Annotated[int, Meta(ge=0, le=MAX_NODE_ID)]
Time = Annotated[datetime, Meta(tz=True)]
Key = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_CHARS)]
RunId = Annotated[str, Meta(pattern=r"^(?!\.\.?$)[A-Za-z0-9_.-]{1,64}$")]
# The run ids of automation fires (hacer/automations.py fire_run_id): runners run one only as the scheduler stored it.
FIRE_RUN_PREFIX = "auto-"
STEP_RUN_MARK = "-step"  # a `run` step's run id: its fire's, this, its place
Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ)]
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
# A value as the database keeps it: a 64-bit integer (history stores numbers as doubles) or a text.
ReadingValue = Union[Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)], str]
Availability = Literal["online", "offline"]
EntryType = Literal["launch", "output", "sent_set", "sent_get", "result", "exception", "exit_status"]
LOG_ENTRY_TYPES: tuple[str, ...] = get_args(EntryType)
Entry = tuple[EntryType, str]  # a log entry's type and data, before the runner numbers it
NodeValuesBody = Annotated[dict[Key, int | str], Meta(max_length=1024)]
# What a set request may hold; booleans, integral floats and digit strings become integers.
SetBody = Annotated[dict[Key, bool | int | float | str], Meta(min_length=1, max_length=256)]
GetBody = Key | Annotated[list[Key], Meta(min_length=1, max_length=256)]


class MessageError(ValueError):
    """A payload that is not the message it should be."""


def bus_time(timestamp: float) -> datetime:
    """The bus's time of a Unix time."""
    return datetime.fromtimestamp(timestamp, UTC)


def _check_times(*moments: datetime | None) -> None:
    for moment in moments:
        # Compared before any conversion: a far offset may not convert (9999-12-31T23:00-05:00).
        if moment is not None and not EARLIEST_TIME <= moment < LATEST_TIME:
            raise MessageError(f"time {moment.isoformat()[:40]} is not between 1970 and 2200")


_ENCODER = msgspec.json.Encoder()
P = TypeVar("P", bound="Payload")


@functools.cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


def decode(kind: Any, payload: bytes | str, what: str) -> Any:
    """Decode JSON as the declared `kind`; raise MessageError saying what is wrong."""
    try:
        return _decoder(kind).decode(payload)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bad {what}: {validation_error(exc)}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(json_decode_error(exc)) from None


def convert(kind: Any, body: Any, what: str) -> Any:
    """Check an already parsed JSON value (a REST body) as the declared `kind`, as decode() checks JSON text."""
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bad {what}: {validation_error(exc)}") from None


_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]+)`(?: - at `(\$[^`]*)`)?$")


def validation_error(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with the path of an unknown field named like every other field's (`$.trigger.colour`)."""
    unknown = _UNKNOWN_FIELD.match(str(exc))
    if unknown is None:
        return str(exc)
    return f"unknown field `{unknown[1]}` - at `{unknown[2] or '$'}.{unknown[1]}`"


class Payload(Struct, frozen=True):
    """A bus payload: a JSON object of the declared fields (unknown fields are ignored)."""

    what: ClassVar[str] = "payload"

    def to_payload(self) -> bytes:
        """Encode as JSON."""
        return _ENCODER.encode(self)

    @classmethod
    def from_payload(cls: type[P], payload: bytes | str) -> P:
        """Decode JSON, refusing what the declaration does not allow."""
        return decode(cls, payload, cls.what)


class Presence(Payload, frozen=True, omit_defaults=True):
    """Retained presence of a node, published by the bridge on change only."""

    what: ClassVar[str] = "presence"
    id: NodeId
    type: Name
    ip: Name
    state: Availability
    since: Time
    last_seen: Time
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    interval: Annotated[float, Meta(gt=0, lt=1e9)] | None = None
    name: Name | None = None
    # The address ("ip:port") a beacon last moved the node from, and when: beacons are
    # unauthenticated, so a move is shown rather than taken silently.
    moved_from: Address | None = None
    moved_at: Time | None = None

    def __post_init__(self) -> None:
        _check_times(self.since, self.last_seen, self.moved_at)
        if self.type not in NODE_TYPES:  # a newer bridge's type reads as `other`
            force_setattr(self, "type", node_type(self.type))


class NodeMeta(Payload, frozen=True):
    """Retained name and type of a node, published by the api (`{"id":1,"name":"lamp","type":"toggle"}`)."""

    what: ClassVar[str] = "meta"
    id: NodeId
    name: Name | None = ""
    type: Name = "other"

    def __post_init__(self) -> None:
        if self.name is None:
            force_setattr(self, "name", "")
        if self.type not in NODE_TYPES:
            force_setattr(self, "type", node_type(self.type))


class NodeValues(Struct, frozen=True):
    """Retained last known values of a node (`{"on": 1, "temperature": 21}`)."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the retained state JSON."""
        return _ENCODER.encode(self.values)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> NodeValues:
        """Decode a state JSON."""
        return cls(decode(NodeValuesBody, payload, "node values"))


class Reading(Struct, frozen=True):
    """One value of a node and when it was read (the first read that found it so)."""

    value: ReadingValue
    at: Time


class NodeReadings(Payload, frozen=True, omit_defaults=True):
    """Retained values of a node with their times, and whether the node answers now."""

    what: ClassVar[str] = "readings"
    node_id: NodeId
    values: Annotated[dict[Key, Reading], Meta(max_length=1024)]
    answering: bool
    since: Time  # when `answering` became what it is
    error: ErrorText | None = None  # why the node stopped answering

    def __post_init__(self) -> None:
        _check_times(self.since, *(reading.at for reading in self.values.values()))


def _command_value(value: bool | int | float | str) -> Value:
    if type(value) is bool:
        return int(value)
    if type(value) is float:
        if not value.is_integer():
            raise MessageError(f"value {value!r}: send an integer or a string")
        return int(value)
    if type(value) is str and value.isascii() and value.isdigit():
        return int(value)  # what the node receives anyway (the wire sends digits as integers)
    return value  # type: ignore[return-value]


class SetCommand(Struct, frozen=True):
    """A `set` request: key → value, one node command per key, in order."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the set JSON."""
        return _ENCODER.encode(self.values)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> SetCommand:
        """Decode a set JSON object; refuse empty objects and values a node cannot hold."""
        return cls.of(decode(SetBody, payload, "set"))

    @classmethod
    def from_body(cls, body: Any) -> SetCommand:
        """The command of a parsed set object (a REST body), checked as from_payload() checks JSON."""
        return cls.of(convert(SetBody, body, "set"))

    @classmethod
    def of(cls, body: dict[str, bool | int | float | str]) -> SetCommand:
        """A decoded set body's command, with values a node can hold."""
        return cls({key: _command_value(value) for key, value in body.items()})


class GetCommand(Struct, frozen=True):
    """A `get` request: one key as plain text or JSON, or a JSON list of keys."""

    keys: tuple[str, ...]

    def to_payload(self) -> bytes:
        """Encode as a JSON list of keys."""
        return _ENCODER.encode(self.keys)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> GetCommand:
        """Decode a key, a JSON string or a JSON list of keys."""
        try:
            body = _decoder(GetBody).decode(payload)
        except msgspec.ValidationError as exc:
            raise MessageError(f"bad get: {exc}") from None
        except msgspec.DecodeError:  # a bare key, as mosquitto_pub -m sends it
            text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
            body = decode(Key, _ENCODER.encode(text.strip()), "get")
        return cls.of(body)

    @classmethod
    def of_key(cls, key: str) -> GetCommand:
        """The command getting one key (a REST path's)."""
        return cls.of(convert(Key, key, "get"))

    @classmethod
    def of(cls, body: str | list[str]) -> GetCommand:
        """A decoded get body's command."""
        return cls(tuple(body) if isinstance(body, list) else (body,))


class ClientCommand(Struct, frozen=True, forbid_unknown_fields=True):
    """A node command on `clients/<client id>/command`: `set` or `get` as on the node's own topics."""

    node: NodeId
    set: SetBody | None = None
    get: GetBody | None = None

    def to_payload(self) -> bytes:
        """Encode as the command JSON."""
        return _ENCODER.encode(self)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> ClientCommand:
        """Decode a command; refuse one that is neither or both of set and get."""
        command: ClientCommand = decode(cls, payload, "command")
        if (command.set is None) == (command.get is None):
            raise MessageError("bad command: give either `set` or `get` - at `$`")
        return command

    def items(self) -> tuple[Literal["set", "get"], list[tuple[str, Value | None]]]:
        """The op and its (key, value) pairs, values checked as a `set` topic's are (None for a get)."""
        if self.set is not None:
            return "set", list(SetCommand.of(self.set).values.items())
        assert self.get is not None
        return "get", [(key, None) for key in GetCommand.of(self.get).keys]


class CommandResult(Payload, frozen=True):
    """The answer to one node command, success or failure, with the caller's correlation."""

    what: ClassVar[str] = "result"
    node_id: NodeId | None  # None when the command's topic named no valid node id
    op: Literal["set", "get"]
    key: ResultText
    ok: bool
    value: Value | None = None
    raw: ResultText = ""
    error: ResultText | None = None
    correlation: ResultText | None = None
    at: Time = EARLIEST_TIME
    # Why it failed, for programs: node_error, timeout, unreachable, unknown_node, bad_reply,
    # bad_request or busy (None on success).
    reason: ResultText | None = None


class LastSeenBatch(Payload, frozen=True):
    """Fresh last-seen times of the nodes that beaconed since the previous batch (`{"nodes": {"<id>": time}}`)."""

    what: ClassVar[str] = "last-seen batch"
    nodes: Annotated[dict[NodeId, Time], Meta(max_length=1_000_000)]

    def __post_init__(self) -> None:
        _check_times(*self.nodes.values())


class BridgeStats(Payload, frozen=True):
    """The bridge's counters, published retained so anyone can watch for trouble."""

    what: ClassVar[str] = "stats"
    datagrams: Count
    accepted: Count
    dropped: dict[str, Count]
    kernel_drops: Count
    nodes_online: Count
    nodes_offline: Count
    commands: dict[str, Count] = field(default_factory=dict)
    publish_failures: Count = 0
    polls: dict[str, Count] = field(default_factory=dict)  # the bridge's own reads of node values


# --- runs --------------------------------------------------------------------------------------


class RunRequest(Payload, frozen=True, omit_defaults=True):
    """A request to run `script` with `params` (the node name first, as in 2015)."""

    script: ScriptName
    params: tuple[str, ...] = ()
    run_id: str | None = None
    requested_by: str = ""
    timeout: float | None = None

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RunRequest:
        """Decode a request; numbers among the params and a numeric run id become text."""
        return cls.of(decode(RunRequestPayload, payload, "request"))

    @classmethod
    def from_body(cls, body: Any) -> RunRequest:
        """The request of a parsed JSON object (a REST body's), checked as from_payload() checks JSON."""
        return cls.of(convert(RunRequestPayload, body, "request"))

    @classmethod
    def of(cls, body: RunRequestPayload) -> RunRequest:
        """The request of a checked body: numbers among the params and a numeric run id as text."""
        return cls(
            body.script,
            tuple(str(param) for param in body.params),
            None if body.run_id is None else str(body.run_id),  # an integer's digits are a valid id
            body.requested_by[:MAX_REQUESTER_CHARS],
            body.timeout,
        )

    @staticmethod
    def run_id_of(payload: bytes | str) -> str | None:
        """The valid run id of a request that may be bad otherwise, so its refusal reaches the requester."""
        try:
            run_id = decode(_RunIdOnly, payload, "request").run_id
        except MessageError:
            return None
        return None if run_id is None else str(run_id)


class RunRequestPayload(Struct, frozen=True):
    """What a run request may hold on the bus: more than RunRequest, as 2015 clients send numbers."""

    script: Annotated[str, Meta(min_length=1, max_length=MAX_SCRIPT_CHARS, pattern=NO_NUL)]
    params: Annotated[tuple[Param | int | float, ...], Meta(max_length=MAX_PARAMS)] = ()
    run_id: RunId | Annotated[int, Meta(ge=0)] | None = None
    requested_by: Annotated[str, Meta(max_length=1 << 16, pattern=NO_NUL)] = ""  # cut to its column's length
    timeout: Annotated[float, Meta(gt=0, lt=1e9)] | None = None


class _RunIdOnly(Struct):
    run_id: RunId | Annotated[int, Meta(ge=0)] | None = None


class RunStatus(Payload, frozen=True):
    """A run's state, published by the runner at every change."""

    what: ClassVar[str] = "status"
    run_id: RunId
    script: ScriptName
    params: Annotated[tuple[Param, ...], Meta(max_length=MAX_PARAMS)]
    state: RunState
    runner: RunnerName
    exit_code: Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)] | None = None
    queued_at: Time | None = None
    started_at: Time | None = None
    finished_at: Time | None = None
    error: ErrorText | None = None
    requested_by: Requester = ""

    def __post_init__(self) -> None:
        _check_times(self.queued_at, self.started_at, self.finished_at)


class LogEntry(Payload, frozen=True):
    """One entry of a run's log; `seq` numbers a run's entries from 1 without gaps."""

    what: ClassVar[str] = "log entry"
    run_id: RunId
    seq: Seq
    timestamp: Time
    entry_type: EntryType
    data: EntryData

    def __post_init__(self) -> None:
        _check_times(self.timestamp)


class Launch(Struct, frozen=True):
    """The data of a run's `launch` entry: the script and its parameters (spaced as 2015's json.dumps)."""

    script: ScriptName
    params: Annotated[tuple[Param, ...], Meta(max_length=MAX_PARAMS)] = ()

    def to_data(self) -> str:
        """The entry's data."""
        return json.dumps({"script": self.script, "params": list(self.params)})

    @classmethod
    def from_data(cls, data: str) -> Launch:
        """Decode an entry's data; raise MessageError."""
        return decode(cls, data, "launch entry")


class LogEntrySeq(Struct):
    """The seq of a log payload that may be bad otherwise."""

    seq: Seq | None = None


class RunnerState(Payload, frozen=True):
    """A runner's retained state: capacity and what it runs now."""

    what: ClassVar[str] = "runner state"
    runner: PartName
    state: Availability
    capacity: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    running: Annotated[tuple[RunId, ...], Meta(max_length=1024)] = ()
    queued: Annotated[int, Meta(ge=0, le=2**31)] = 0


class RunWritten(Struct, frozen=True):
    """What is written of one run: log entries 1..seq, and its state ("" while no status is)."""

    seq: Annotated[int, Meta(ge=0, le=MAX_SEQ)]
    state: RunState | Literal[""]


class RunRecorded(Struct, frozen=True):
    """What a recorder has durably written of one run."""

    run_id: str
    seq: int
    state: str


class RunsRecorded(Payload, frozen=True):
    """What a recorder has written of the runs one batch touched, in one message (not one per run).

    `{"recorder":"kitchen-pi","runs":{"a1b2c3":{"seq":4,"state":"succeeded"}}}`
    """

    what: ClassVar[str] = "recorded"
    recorder: PartName
    runs: Annotated[dict[RunId, RunWritten], Meta(max_length=MAX_RECORDED_RUNS)]

    @classmethod
    def of(cls, recorder: str, runs: list[RunRecorded]) -> RunsRecorded:
        """The message saying what `recorder` has written of `runs`."""
        return cls(recorder, {run.run_id: RunWritten(run.seq, run.state) for run in runs})  # type: ignore[arg-type]

    def recorded(self) -> list[RunRecorded]:
        """Each run's record."""
        return [RunRecorded(run_id, written.seq, written.state) for run_id, written in self.runs.items()]


class RecorderState(Payload, frozen=True):
    """A recorder's retained state and counters."""

    what: ClassVar[str] = "recorder state"
    recorder: PartName
    state: Availability
    written: Count = 0
    set_aside: Count = 0


# --- schemas -----------------------------------------------------------------------------------

# Each payload's declaration, by the name docs/topics.md and the OpenAPI document give it.
DECLARATIONS: dict[str, Any] = {
    "Presence": Presence,
    "NodeMeta": NodeMeta,
    "NodeValues": NodeValuesBody,
    "NodeReadings": NodeReadings,
    "SetCommand": SetBody,
    "GetCommand": GetBody,
    "ClientCommand": ClientCommand,
    "CommandResult": CommandResult,
    "LastSeenBatch": LastSeenBatch,
    "BridgeStats": BridgeStats,
    "RunRequestPayload": RunRequestPayload,
    "RunStatus": RunStatus,
    "LogEntry": LogEntry,
    "RunsRecorded": RunsRecorded,
    "RunnerState": RunnerState,
    "RecorderState": RecorderState,
}


# Built now, so a declaration msgspec cannot check fails at import rather than at the first message.
for _kind in (*DECLARATIONS.values(), RunRequestPayload, _RunIdOnly, LogEntrySeq, Key):
    _decoder(_kind)


def step_run_id(fire_run_id: str, position: int) -> str:
    """The run id of a `run` step: its fire's, and its place."""
    return f"{fire_run_id}{STEP_RUN_MARK}{position}"


def step_of_run(run_id: str) -> tuple[str, int] | None:
    """The fire's run id and the place of the `run` step a run id names (see step_run_id), or None."""
    fire, mark, position = run_id.rpartition(STEP_RUN_MARK)
    if not mark or not fire.startswith(FIRE_RUN_PREFIX) or not (position.isascii() and position.isdigit()):
        return None
    return fire, int(position)
