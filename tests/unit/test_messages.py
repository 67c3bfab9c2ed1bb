"""Payload checks: what bus messages may hold before anything uses them, and the schemas shown of them."""

import json
from datetime import UTC, datetime

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hacer.messages import (
    DECLARATIONS,
    BridgeStats,
    ClientCommand,
    CommandResult,
    GetCommand,
    LastSeenBatch,
    LogEntry,
    MessageError,
    NodeMeta,
    NodeReadings,
    NodeValues,
    Presence,
    Reading,
    RecorderState,
    RunnerState,
    RunRecorded,
    RunRequest,
    RunsRecorded,
    RunStatus,
    SetCommand,
    bus_time,
)
from hacer.schemas import json_schemas

T1 = bus_time(1.0)


@pytest.mark.parametrize(
    "body",
    [
        {"script": "toggle", "timeout": float("nan")},
        {"script": "toggle", "timeout": float("inf")},
        {"script": "to\u0000ggle"},
        {"script": "toggle", "requested_by": "x\u0000"},
    ],
)
def test_bad_requests_are_refused(body):
    with pytest.raises(MessageError):
        RunRequest.from_payload(json.dumps(body))


@pytest.mark.parametrize(
    "change",
    [
        {"exit_code": {"a": 1}},
        {"exit_code": 2**40},
        {"state": "exploded"},
        {"error": 5},
        {"error": "e" * 5000},
        {"runner": "r\u0000"},
        {"params": "notalist"},
        {"finished_at": "9999-12-31T23:00-05:00"},
    ],
)
def test_bad_statuses_are_refused(change):
    body = json.loads(RunStatus("p", "x", (), "running", "r").to_payload())
    with pytest.raises(MessageError):
        RunStatus.from_payload(json.dumps({**body, **change}))


def test_names_with_a_nul_are_refused():
    presence = json.loads(Presence(7, "toggle", "10.0.0.7", "online", T1, T1).to_payload())
    with pytest.raises(MessageError):
        Presence.from_payload(json.dumps({**presence, "name": "a\u0000b"}))
    with pytest.raises(MessageError):
        NodeMeta.from_payload('{"id": 7, "name": "a\\u0000b", "type": "toggle"}')
    with pytest.raises(MessageError):
        RunnerState.from_payload('{"runner": "r", "state": "offline", "running": [{"x": 1}]}')


def test_the_run_id_of_a_bad_request_is_read_when_it_can_be():
    assert RunRequest.run_id_of(b'{"run_id": "abc", "script": ""}') == "abc"
    assert RunRequest.run_id_of(b'{"run_id": "../x", "script": "t"}') is None
    assert RunRequest.run_id_of(b"not json") is None


def test_times_of_older_producers_and_unknown_fields_are_read():
    entry = LogEntry.from_payload(
        b'{"run_id":"r","seq":1,"timestamp":"2026-11-27T20:35:36.123Z","entry_type":"output","data":"x","new":1}'
    )
    assert entry.timestamp == datetime(2026, 11, 27, 20, 35, 36, 123000, tzinfo=UTC)
    assert NodeMeta.from_payload(b'{"id":1,"name":null,"type":"toaster"}') == NodeMeta(1, "", "other")


EXAMPLES = {
    "Presence": Presence(7, "toggle", "10.0.0.7", "online", T1, T1, port=8000, interval=30.0, name="lamp"),
    "NodeMeta": NodeMeta(7, "lamp", "toggle"),
    "NodeValues": NodeValues({"on": 1, "mode": "eco"}),
    "NodeReadings": NodeReadings(7, {"temperature": Reading(21, T1), "mode": Reading("eco", T1)}, False, T1, "timeout"),
    "SetCommand": SetCommand({"on": 1}),
    "GetCommand": GetCommand(("temperature", "target")),
    "ClientCommand": ClientCommand(7, set={"on": 1}),
    "CommandResult": CommandResult(7, "get", "temperature", True, 21, "+i21e", at=T1),
    "LastSeenBatch": LastSeenBatch({7: T1}),
    "BridgeStats": BridgeStats(3, 2, {"not_json": 1}, 0, 1, 0, {"ok": 2}),
    "RunRequestPayload": RunRequest("toggle", ("lamp", "on"), "r1", "rest", 30.0),
    "RunStatus": RunStatus("r1", "toggle", ("lamp",), "succeeded", "runner-a", 0, T1, T1, T1),
    "LogEntry": LogEntry("r1", 1, T1, "output", "hello"),
    "RunsRecorded": RunsRecorded.of("rec", [RunRecorded("r1", 4, "succeeded")]),
    "RunnerState": RunnerState("runner-a", "online", 4, ("r1",), 2),
    "RecorderState": RecorderState("rec", "online", 10, 1),
}


def schema_of(name):
    schemas = json_schemas()
    return {**schemas[name], "$defs": schemas}


def test_what_hacer_sends_fits_the_schemas_it_shows():
    assert set(EXAMPLES) == set(DECLARATIONS)
    for name, example in EXAMPLES.items():
        payload = example.to_payload()
        jsonschema.validate(json.loads(payload), schema_of(name))
        assert type(example).from_payload(payload) == example, name


@pytest.mark.parametrize(
    "name, payload",
    [
        ("RunnerState", {"runner": "", "state": "online"}),
        ("RunnerState", {"runner": "r", "state": "online", "capacity": -1}),
        ("RecorderState", {"recorder": "r", "state": "away"}),
        (
            "LogEntry",
            {"run_id": "..", "seq": 1, "timestamp": "2026-01-01T00:00:00Z", "entry_type": "output", "data": ""},
        ),
        (
            "LogEntry",
            {"run_id": "r", "seq": 0, "timestamp": "2026-01-01T00:00:00Z", "entry_type": "output", "data": ""},
        ),
        ("SetCommand", {}),
        ("NodeValues", {"on": [1]}),
        ("RunRequestPayload", {"script": "t", "params": [None]}),
    ],
)
def test_what_a_schema_refuses_the_decoder_refuses(name, payload):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, schema_of(name))
    with pytest.raises(MessageError):
        type(EXAMPLES[name]).from_payload(json.dumps(payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@given(
    st.sampled_from(["RunnerState", "RecorderState", "RunsRecorded", "NodeMeta", "BridgeStats", "NodeValues"]),
    st.dictionaries(
        st.sampled_from(
            [
                "runner",
                "recorder",
                "state",
                "capacity",
                "running",
                "queued",
                "written",
                "runs",
                "id",
                "name",
                "type",
                "datagrams",
                "dropped",
                "on",
            ]
        ),
        json_values,
    ),
)
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_the_decoder_accepts_nothing_its_schema_refuses(name, body):
    try:
        type(EXAMPLES[name]).from_payload(json.dumps(body))
    except MessageError:
        return
    jsonschema.validate(body, schema_of(name))


@pytest.mark.parametrize(
    "body",
    [
        {"script": "toggle", "params": ["lamp", 1], "run_id": 7},
        {"script": "toggle", "params": ["lamp", 1.5]},
        {"script": "../etc", "params": []},
        {"script": "toggle", "timeout": "soon"},
        {"params": ["x"]},
    ],
)
def test_a_rest_body_is_checked_as_the_same_json_on_the_bus_is(body):
    def outcome(read):
        try:
            return read()
        except MessageError as exc:
            return str(exc)

    from_bus = outcome(lambda: RunRequest.from_payload(json.dumps(body)))
    assert outcome(lambda: RunRequest.from_body(body)) == from_bus
    for values in ({"on": 1, "name": "lamp"}, {}, {"on": [1]}, {"x" * 100: 1}):
        assert outcome(lambda: SetCommand.from_body(values)) == outcome(  # noqa: B023
            lambda: SetCommand.from_payload(json.dumps(values))  # noqa: B023
        )
