"""Payload checks: what a run's messages may hold before anything uses them."""

import json

import pytest

from hacer.messages import MessageError, NodeMeta, Presence, RunnerState, RunRequest, RunStatus, bus_time

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
