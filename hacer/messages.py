"""Bus payloads as typed values: each has to_payload() and from_payload(), raising MessageError.

Times on the bus are ISO 8601 UTC strings with milliseconds ("2026-11-27T20:35:36.123Z"), read
by people with mosquitto_sub as easily as by programs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from hacer import runstates
from hacer.nodewire import MAX_NODE_ID, NODE_TYPES, Value

ONLINE = "online"
OFFLINE = "offline"
MAX_NODE_NAME = 64  # the node.name column
LATEST_TIME = 7_258_118_400.0  # 2200-01-01: later times are someone's mistake, not a node's


class MessageError(ValueError):
    """A payload that is not the message it should be."""


def iso_time(timestamp: float) -> str:
    """Format a Unix time as the bus's ISO 8601 UTC string."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: Any) -> float:
    """Parse the bus's ISO 8601 string back into a Unix time."""
    if type(text) is not str:
        raise MessageError(f"time {text!r} is not a string")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        timestamp = moment.timestamp()
    except (ValueError, OverflowError):
        raise MessageError(f"time {text[:40]!r} is not ISO 8601") from None
    if not 0 <= timestamp < LATEST_TIME:
        raise MessageError(f"time {text[:40]!r} is not between 1970 and 2200")
    return timestamp


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


def _text(value: Any, what: str, max_chars: int, *, empty: bool = True) -> str:
    """A string of at most `max_chars` characters without NUL (no database column holds one)."""
    if type(value) is not str or len(value) > max_chars or "\0" in value or (not empty and not value):
        raise MessageError(
            f"{what} {str(value)[:40]!r} is not a{'' if empty else ' non-empty'} string of at most "
            f"{max_chars} characters without NUL"
        )
    return value


def _optional_text(value: Any, what: str, max_chars: int) -> str | None:
    return None if value is None else _text(value, what, max_chars)


def _int_in(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise MessageError(f"{what} {value!r} is not an integer in {low}..{high}")
    return value


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
    # The address ("ip:port") a beacon last moved the node from, and when: beacons are
    # unauthenticated, so a move is shown rather than taken silently.
    moved_from: str | None = None
    moved_at: float | None = None

    def to_payload(self) -> bytes:
        """Encode as the retained presence JSON."""
        body = asdict(self)
        body["since"] = iso_time(self.since)
        body["last_seen"] = iso_time(self.last_seen)
        if self.moved_at is not None:
            body["moved_at"] = iso_time(self.moved_at)
        return _dump({k: v for k, v in body.items() if v is not None})

    @classmethod
    def from_payload(cls, payload: bytes | str) -> Presence:
        """Decode a presence JSON."""
        body = _json_object(payload)
        try:
            interval = body.get("interval")
            if interval is not None and (type(interval) not in (int, float) or not 0 < interval < 1e9):
                raise MessageError(f"presence interval {interval!r} is not a positive number")
            port = body.get("port")
            presence = cls(
                id=_node_id(body["id"]),
                type=body["type"] if body["type"] in NODE_TYPES else "other",
                ip=_text(body["ip"], "presence ip", 64),
                state=body["state"],
                since=parse_time(body["since"]),
                last_seen=parse_time(body["last_seen"]),
                port=None if port is None else _int_in(port, "presence port", 1, 65535),
                interval=interval,
                name=_optional_text(body.get("name"), "presence name", MAX_NODE_NAME),
                moved_from=_optional_text(body.get("moved_from"), "presence moved_from", 80),
                moved_at=None if body.get("moved_at") is None else parse_time(body["moved_at"]),
            )
        except KeyError as exc:
            raise MessageError(f"presence lacks {exc}") from None
        if presence.state not in (ONLINE, OFFLINE):
            raise MessageError(f"presence state {presence.state!r} is not online or offline")
        return presence


@dataclass(frozen=True)
class NodeMeta:
    """Retained name and type of a node, published by the api (`{"id":1,"name":"lamp","type":"toggle"}`)."""

    id: int
    name: str
    type: str

    def to_payload(self) -> bytes:
        """Encode as the retained meta JSON."""
        return _dump(asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> NodeMeta:
        """Decode a meta JSON; a missing name is "" and an unknown type `other`."""
        body = _json_object(payload)
        node_type = body.get("type")
        try:
            return cls(
                _node_id(body["id"]),
                _text(body.get("name") or "", "meta name", MAX_NODE_NAME),
                node_type if node_type in NODE_TYPES else "other",
            )
        except KeyError as exc:
            raise MessageError(f"meta lacks {exc}") from None


@dataclass(frozen=True)
class NodeValues:
    """Retained last known values of a node (`{"on": 1, "temperature": 21}`)."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the retained state JSON."""
        return _dump(dict(self.values))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> NodeValues:
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
    if type(value) is str and value.isascii() and value.isdigit():
        return int(value)  # what the node receives anyway (the wire sends digits as integers)
    return value


@dataclass(frozen=True)
class SetCommand:
    """A `set` request: key → value, one node command per key, in order."""

    values: dict[str, Value]

    def to_payload(self) -> bytes:
        """Encode as the set JSON."""
        return _dump(dict(self.values))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> SetCommand:
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
    def from_payload(cls, payload: bytes | str) -> GetCommand:
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

    node_id: int | None  # None when the command's topic named no valid node id
    op: str  # "set" or "get"
    key: str
    ok: bool
    value: Value | None = None
    raw: str = ""
    error: str | None = None
    correlation: str | None = None
    at: float = 0.0
    # Why it failed, for programs: node_error, timeout, unreachable, unknown_node, bad_reply,
    # bad_request or busy (None on success).
    reason: str | None = None

    def to_payload(self) -> bytes:
        """Encode as the result JSON."""
        body = asdict(self)
        body["at"] = iso_time(self.at)
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> CommandResult:
        """Decode a result JSON."""
        body = _json_object(payload)
        try:
            return cls(
                node_id=None if body["node_id"] is None else _node_id(body["node_id"]),
                op=body["op"],
                key=body["key"],
                ok=bool(body["ok"]),
                value=body.get("value"),
                raw=body.get("raw") or "",
                error=body.get("error"),
                correlation=body.get("correlation"),
                at=parse_time(body["at"]),
                reason=body.get("reason"),
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
    def from_payload(cls, payload: bytes | str) -> LastSeenBatch:
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
    def from_payload(cls, payload: bytes | str) -> BridgeStats:
        """Decode the stats JSON."""
        body = _json_object(payload)
        try:
            return cls(**body)
        except TypeError as exc:
            raise MessageError(f"bad stats: {exc}") from None


# --- runs --------------------------------------------------------------------------------------

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PARAMS = 32
MAX_PARAM_CHARS = 1024
MAX_SCRIPT_CHARS = 255  # the run.script column
MAX_RUNNER_CHARS = 128  # the run.runner column
MAX_REQUESTER_CHARS = 64  # the run.requested_by column
MAX_ERROR_CHARS = 4096
MAX_SEQ = 2**31 - 1
MAX_ENTRY_CHARS = 1 << 20  # above the runner's own batches (64 KiB) and under the broker's packet limit


def check_run_id(value: Any) -> str:
    """Return a run id as text; raise MessageError unless it is 1-64 of [A-Za-z0-9_.-]."""
    if type(value) is int and value >= 0:
        value = str(value)
    if type(value) is not str or not RUN_ID_PATTERN.fullmatch(value) or value in (".", ".."):
        raise MessageError(f"run_id {value!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


def _optional_time(value: float | None) -> str | None:
    return None if value is None else iso_time(value)


def _parse_optional_time(value: Any) -> float | None:
    return None if value is None else parse_time(value)


@dataclass(frozen=True)
class RunRequest:
    """A request to run `script` with `params` (the node name first, as in 2015)."""

    script: str
    params: tuple[str, ...] = ()
    run_id: str | None = None
    requested_by: str = ""
    timeout: float | None = None

    def to_payload(self) -> bytes:
        """Encode as the request JSON."""
        body: dict[str, Any] = {"script": self.script, "params": list(self.params), "requested_by": self.requested_by}
        if self.run_id is not None:
            body["run_id"] = self.run_id
        if self.timeout is not None:
            body["timeout"] = self.timeout
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RunRequest:
        """Decode a request; numbers among the params become text, anything else is refused."""
        body = _json_object(payload)
        script = _text(body.get("script"), "script", MAX_SCRIPT_CHARS, empty=False)
        params = body.get("params", [])
        if type(params) is not list or len(params) > MAX_PARAMS:
            raise MessageError(f"params must be a list of at most {MAX_PARAMS} strings")
        texts = []
        for param in params:
            if type(param) in (int, float):
                param = str(param)
            if type(param) is not str or len(param) > MAX_PARAM_CHARS or "\0" in param:
                raise MessageError(f"param {str(param)[:40]!r} is not a string of at most {MAX_PARAM_CHARS} characters")
            texts.append(param)
        run_id = body.get("run_id")
        timeout = body.get("timeout")
        if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout < 1e9):
            raise MessageError(f"timeout {timeout!r} is not a positive number of seconds")
        requested_by = _text(body.get("requested_by") or "", "requested_by", 1 << 16)
        return cls(
            script,
            tuple(texts),
            None if run_id is None else check_run_id(run_id),
            requested_by[:MAX_REQUESTER_CHARS],
            None if timeout is None else float(timeout),
        )

    @staticmethod
    def run_id_of(payload: bytes | str) -> str | None:
        """The valid run id of a request that may be bad otherwise, so its refusal reaches the requester."""
        try:
            return check_run_id(_json_object(payload).get("run_id"))
        except MessageError:
            return None


@dataclass(frozen=True)
class RunStatus:
    """A run's state, published by the runner at every change."""

    run_id: str
    script: str
    params: tuple[str, ...]
    state: str
    runner: str
    exit_code: int | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    requested_by: str = ""

    def to_payload(self) -> bytes:
        """Encode as the status JSON."""
        body = asdict(self)
        body["params"] = list(self.params)
        for name in ("queued_at", "started_at", "finished_at"):
            body[name] = _optional_time(body[name])
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RunStatus:
        """Decode a status JSON, refusing what a run's row cannot hold."""
        body = _json_object(payload)
        try:
            params = body.get("params") or []
            if type(params) is not list or len(params) > MAX_PARAMS:
                raise MessageError(f"params must be a list of at most {MAX_PARAMS} strings")
            exit_code = body.get("exit_code")
            state = body["state"]
            if state not in runstates.ALL_STATES:
                raise MessageError(f"state {str(state)[:40]!r} is not one of {', '.join(runstates.ALL_STATES)}")
            return cls(
                run_id=check_run_id(body["run_id"]),
                script=_text(body["script"], "script", MAX_SCRIPT_CHARS),
                params=tuple(_text(p, "param", MAX_PARAM_CHARS) for p in params),
                state=state,
                runner=_text(body.get("runner") or "", "runner", MAX_RUNNER_CHARS),
                exit_code=None if exit_code is None else _int_in(exit_code, "exit_code", -(2**31), 2**31 - 1),
                queued_at=_parse_optional_time(body.get("queued_at")),
                started_at=_parse_optional_time(body.get("started_at")),
                finished_at=_parse_optional_time(body.get("finished_at")),
                error=_optional_text(body.get("error"), "error", MAX_ERROR_CHARS),
                requested_by=_text(body.get("requested_by") or "", "requested_by", MAX_REQUESTER_CHARS),
            )
        except KeyError as exc:
            raise MessageError(f"status lacks {exc}") from None


LOG_ENTRY_TYPES = ("launch", "output", "sent_set", "sent_get", "result", "exception", "exit_status")


@dataclass(frozen=True)
class LogEntry:
    """One entry of a run's log; `seq` numbers a run's entries from 1 without gaps."""

    run_id: str
    seq: int
    timestamp: float
    entry_type: str
    data: str

    def to_payload(self) -> bytes:
        """Encode as the log JSON."""
        body = asdict(self)
        body["timestamp"] = iso_time(self.timestamp)
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> LogEntry:
        """Decode a log JSON."""
        body = _json_object(payload)
        try:
            entry = cls(
                check_run_id(body["run_id"]),
                _int_in(body["seq"], "seq", 1, MAX_SEQ),
                parse_time(body["timestamp"]),
                str(body["entry_type"]),
                _text(body["data"], "data", MAX_ENTRY_CHARS),
            )
        except KeyError as exc:
            raise MessageError(f"log entry lacks {exc}") from None
        if entry.entry_type not in LOG_ENTRY_TYPES:
            raise MessageError(f"entry type {entry.entry_type!r} is not one of {LOG_ENTRY_TYPES}")
        return entry


@dataclass(frozen=True)
class RunnerState:
    """A runner's retained state: capacity and what it runs now."""

    runner: str
    state: str
    capacity: int = 0
    running: tuple[str, ...] = ()
    queued: int = 0

    def to_payload(self) -> bytes:
        """Encode as the runner state JSON."""
        body = asdict(self)
        body["running"] = list(self.running)
        return _dump(body)

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RunnerState:
        """Decode a runner state JSON."""
        body = _json_object(payload)
        try:
            running = body.get("running") or []
            if type(running) is not list or len(running) > 1024:
                raise MessageError("running must be a list of run ids")
            state = body["state"]
            if state not in (ONLINE, OFFLINE):
                raise MessageError(f"runner state {str(state)[:40]!r} is not online or offline")
            return cls(
                _text(body["runner"], "runner", MAX_RUNNER_CHARS, empty=False),
                state,
                _int_in(body.get("capacity", 0), "capacity", 0, 1_000_000),
                tuple(check_run_id(r) for r in running),
                _int_in(body.get("queued", 0), "queued", 0, 2**31),
            )
        except KeyError as exc:
            raise MessageError(f"runner state lacks {exc}") from None


@dataclass(frozen=True)
class RunRecorded:
    """What a recorder has durably written of one run: log entries 1..seq, and the run's state."""

    run_id: str
    seq: int
    state: str  # "" while no status is recorded


MAX_RECORDED_RUNS = 10_000


@dataclass(frozen=True)
class RunsRecorded:
    """What a recorder has written of the runs one batch touched, in one message (not one per run).

    `{"recorder":"kitchen-pi","runs":{"a1b2c3":{"seq":4,"state":"succeeded"}}}`
    """

    recorder: str
    runs: tuple[RunRecorded, ...]

    def to_payload(self) -> bytes:
        """Encode as the recorded JSON."""
        return _dump(
            {"recorder": self.recorder, "runs": {run.run_id: {"seq": run.seq, "state": run.state} for run in self.runs}}
        )

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RunsRecorded:
        """Decode a recorded JSON."""
        body = _json_object(payload)
        runs = body.get("runs")
        if type(runs) is not dict or len(runs) > MAX_RECORDED_RUNS:
            raise MessageError(f"runs must be an object of at most {MAX_RECORDED_RUNS} runs")
        recorded = []
        for run_id, written in runs.items():
            if type(written) is not dict:
                raise MessageError(f"run {str(run_id)[:40]!r}: not an object")
            state = written.get("state")
            if state != "" and state not in runstates.ALL_STATES:
                raise MessageError(f"state {str(state)[:40]!r} is not a run state")
            recorded.append(RunRecorded(check_run_id(run_id), _int_in(written.get("seq"), "seq", 0, MAX_SEQ), state))
        return cls(_text(body.get("recorder"), "recorder", MAX_RUNNER_CHARS, empty=False), tuple(recorded))


@dataclass(frozen=True)
class RecorderState:
    """A recorder's retained state and counters."""

    recorder: str
    state: str
    written: int = 0
    set_aside: int = 0

    def to_payload(self) -> bytes:
        """Encode as the recorder state JSON."""
        return _dump(asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes | str) -> RecorderState:
        """Decode a recorder state JSON."""
        body = _json_object(payload)
        try:
            state = body["state"]
            if state not in (ONLINE, OFFLINE):
                raise MessageError(f"recorder state {str(state)[:40]!r} is not online or offline")
            return cls(
                _text(body["recorder"], "recorder", MAX_RUNNER_CHARS, empty=False),
                state,
                _int_in(body.get("written", 0), "written", 0, 2**63),
                _int_in(body.get("set_aside", 0), "set_aside", 0, 2**63),
            )
        except KeyError as exc:
            raise MessageError(f"recorder state lacks {exc}") from None
