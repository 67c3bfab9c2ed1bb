"""The 2015 wire formats: beacon JSON and the TCP value encoding, including fuzzing."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hacer.nodewire import (
    Beacon,
    BeaconError,
    Reply,
    ReplyDecoder,
    WireError,
    decode_beacon,
    decode_request,
    encode_get,
    encode_reply,
    encode_set,
    encode_value,
)


def test_2015_beacon_decodes():
    beacon = decode_beacon(b'{ "id": 1234567, "type": "toggle" }')
    assert (beacon.id, beacon.type, beacon.name, beacon.interval) == (1234567, "toggle", None, None)


def test_unknown_type_maps_to_other():
    assert decode_beacon(b'{"id": 1, "type": "toaster"}').type == "other"


def test_newer_optional_fields():
    beacon = decode_beacon(
        json.dumps(
            {"id": 7, "type": "thermostat", "name": "hall", "interval": 30, "port": 8000, "state": {"temperature": 21}}
        ).encode()
    )
    assert (beacon.name, beacon.interval, beacon.port, beacon.state) == ("hall", 30.0, 8000, {"temperature": 21})


@pytest.mark.parametrize(
    "datagram, reason",
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'{"type": "toggle"}', "bad_id"),
        (b'{"id": "12", "type": "toggle"}', "bad_id"),
        (b'{"id": true, "type": "toggle"}', "bad_id"),
        (b'{"id": -1, "type": "toggle"}', "bad_id"),
        (b'{"id": 9007199254740992, "type": "toggle"}', "bad_id"),
        (b'{"id": 1.5, "type": "toggle"}', "bad_id"),
        (b'{"id": 1}', "bad_type"),
        (b'{"id": 1, "type": 3}', "bad_type"),
        (b'{"id": 1, "type": "toggle", "interval": 0}', "bad_field"),
        (b'{"id": 1, "type": "toggle", "port": 70000}', "bad_field"),
        (b'{"id": 1, "type": "toggle", "name": 5}', "bad_field"),
        (b'{"id": 1, "type": "toggle", "state": {"on": [1]}}', "bad_field"),
        (b'{"id": 1, "type": "toggle", "x": "' + b"a" * 1024 + b'"}', "too_large"),
    ],
)
def test_bad_beacons_name_their_reason(datagram, reason):
    with pytest.raises(BeaconError) as caught:
        decode_beacon(datagram)
    assert caught.value.reason == reason


@given(st.binary(max_size=1100))
def test_fuzz_beacon_bytes_only_raise_beacon_error(data):
    try:
        beacon = decode_beacon(data)
    except BeaconError as exc:
        assert exc.reason
    else:
        assert 0 <= beacon.id < 2**53


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["id", "type", "name", "interval", "port", "state", "x"]), json_values))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_fuzz_beacon_objects_only_raise_beacon_error(body):
    try:
        decode_beacon(json.dumps(body).encode())
    except BeaconError:
        pass


def test_value_encoding_matches_2015():
    assert encode_value(1) == b"i1e"
    assert encode_value("on") == b"2:on"
    assert encode_value("1") == b"i1e"  # a string of digits goes as an integer
    assert encode_value(-4) == b"i-4e"
    assert encode_set("on", 1) == b"s2:oni1e"
    assert encode_get("temperature") == b"g11:temperature"
    assert encode_value("héllo") == b"6:h\xc3\xa9llo"  # length in bytes
    with pytest.raises(WireError):
        encode_value(1.5)


@pytest.mark.parametrize(
    "raw, reply",
    [
        (b"+i23e", Reply(True, 23, "+i23e")),
        (b"+15:Key Set Success", Reply(True, "Key Set Success", "+15:Key Set Success")),
        (b"-13:Key Not Found", Reply(False, "Key Not Found", "-13:Key Not Found")),
        (b"+i-5e", Reply(True, -5, "+i-5e")),
    ],
)
def test_replies_decode_whole_or_byte_by_byte(raw, reply):
    assert ReplyDecoder().feed(raw) == reply
    decoder = ReplyDecoder()
    results = [decoder.feed(raw[i : i + 1]) for i in range(len(raw))]
    assert results[-1] == reply and all(r is None for r in results[:-1])


def test_raw_error_text_ends_at_the_pause():
    decoder = ReplyDecoder()
    assert decoder.feed(b"-Key Not") is None
    assert decoder.raw_error_pending
    assert decoder.feed(b" Found") is None
    assert decoder.finish() == Reply(False, "Key Not Found", "-Key Not Found")


def test_bad_success_reply_is_an_error():
    with pytest.raises(WireError):
        ReplyDecoder().feed(b"+hello")
    with pytest.raises(WireError):
        ReplyDecoder().feed(b"xyz")


def test_incomplete_encoded_reply_is_an_error_at_close():
    decoder = ReplyDecoder()
    assert decoder.feed(b"+15:Key") is None
    assert not decoder.raw_error_pending
    with pytest.raises(WireError):
        decoder.finish()


values = st.one_of(st.integers(min_value=-(2**40), max_value=2**40), st.text(max_size=40))


@given(values, st.booleans(), st.data())
def test_fuzz_reply_roundtrip_any_split(value, ok, data):
    raw = encode_reply(ok, value)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    decoder = ReplyDecoder()
    got = None
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        result = decoder.feed(raw[start:end])
        if result is not None:
            got = result
    expected = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
    assert got is not None and got.ok == ok and got.value == expected


@given(st.binary(max_size=64))
@settings(max_examples=300)
def test_fuzz_reply_garbage_only_raises_wire_error(data):
    decoder = ReplyDecoder()
    try:
        decoder.feed(data)
        decoder.finish()
    except WireError:
        pass


def test_requests_decode_as_a_node_does():
    assert decode_request(b"s2:oni1e") == ("set", "on", 1, 8)
    assert decode_request(b"g11:temperature") == ("get", "temperature", None, 15)
    assert decode_request(b"s2:on") is None
    with pytest.raises(WireError):
        decode_request(b"x")


def test_beacon_payload_roundtrip():
    beacon = Beacon(5, "toggle", name="lamp", interval=30.0)
    assert decode_beacon(beacon.to_payload()) == beacon


def test_an_emulated_thermometer_that_drifts_moves_within_a_rooms_range_and_a_steady_one_does_not():
    import random

    from emulator.nodes import EmulatedNode

    random.seed(7)  # the walk is random; this one is the same every time
    steady, drifting = (
        EmulatedNode(1, "sensor_temp", "127.0.0.2"),
        EmulatedNode(2, "sensor_temp", "127.0.0.3", drift=True),
    )
    seen = set()
    for _ in range(400):
        assert steady.answer("get", "temperature", None) == b"+i21e"
        drifting.answer("get", "temperature", None)
        seen.add(drifting.values["temperature"])
    assert len(seen) > 3 and min(seen) >= 15 and max(seen) <= 28
