"""The bridge as a process: real mosquitto, real UDP beacons and TCP nodes on 127/8."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from bridge.discovery import entity_configs
from emulator.nodes import EmulatedNode, Emulator, make_nodes
from hacer.messages import BridgeStats, ClientCommand, CommandResult, NodeMeta, NodeReadings, NodeValues
from hacer.topics import DiscoveryTopics

from support import presence_of, target, wait_until


@pytest.fixture
def nodes(bridge_env):
    """One emulated node of each type, on 127.0.0.2..5, serving this test's node port."""
    made = make_nodes(
        4,
        ["toggle", "light_rgb", "thermostat", "sensor_temp"],
        port=int(bridge_env["HACER_NODE_PORT"]),
        interval=0.5,
        base_id=uuid.uuid4().int % 10**9,
    )
    emulator = Emulator(made, target(bridge_env))
    yield made, emulator
    emulator.stop()


def test_beacon_becomes_retained_presence_with_source_ip(start_bridge, bridge_env, watch, topics, make_bus):
    start_bridge()
    node = EmulatedNode(1234567, "toggle", "127.0.0.7", interval=60)
    Emulator([node], target(bridge_env), serve_tcp=False).send_beacon(node)
    presence = watch(topics.filter("node_presence")).wait_for(lambda m: True)
    got = presence_of(presence)
    assert (got.id, got.type, got.ip, got.state) == (1234567, "toggle", "127.0.0.7", "online")
    assert presence.topic == "hacer/nodes/1234567/presence"
    # a late subscriber gets it retained
    late = watch(topics.build("node_presence", 1234567))
    assert late.messages and late.messages[0].retain


def test_presence_published_on_change_only_then_offline_and_back(start_bridge, bridge_env, watch, topics):
    start_bridge()
    watcher = watch(topics.filter("node_presence"))
    node = EmulatedNode(42, "light_rgb", "127.0.0.9", interval=60)
    emulator = Emulator([node], target(bridge_env), serve_tcp=False)
    for _ in range(20):
        emulator.send_beacon(node)
    last_beacon = time.time()
    watcher.wait_for(lambda m: presence_of(m).state == "online")
    offline = watcher.wait_for(lambda m: presence_of(m).state == "offline", timeout=5)
    went_offline = presence_of(offline)
    assert (went_offline.since - went_offline.last_seen).total_seconds() == pytest.approx(1.5, abs=0.01)
    # seen by a subscriber within one second of the deadline (last beacon + HACER_OFFLINE_AFTER)
    late_by = watcher.arrival_times[watcher.messages.index(offline)] - (last_beacon + 1.5)
    assert -0.05 < late_by < 1.0
    assert len(watcher.messages) == 2  # 20 beacons, one announcement
    emulator.send_beacon(node)
    back = watcher.wait_for(lambda m: presence_of(m).state == "online", start=2)
    assert presence_of(back).ip == "127.0.0.9"


def test_ip_change_is_announced(start_bridge, bridge_env, watch, topics):
    start_bridge()
    watcher = watch(topics.filter("node_presence"))
    emulator = Emulator([], target(bridge_env), serve_tcp=False)
    emulator.send_beacon(EmulatedNode(43, "toggle", "127.0.0.10"))
    emulator.send_beacon(EmulatedNode(43, "toggle", "127.0.0.11"))
    moved = watcher.wait_for(lambda m: presence_of(m).ip == "127.0.0.11")
    assert presence_of(moved).state == "online"


def test_bridge_restart_keeps_timers_and_announces_nothing_twice(start_bridge, bridge_env, watch, topics):
    bridge_env["HACER_OFFLINE_AFTER"] = "4"
    bridge = start_bridge()
    watcher = watch(topics.filter("node_presence"))
    emulator = Emulator([], target(bridge_env), serve_tcp=False)
    quiet = EmulatedNode(50, "toggle", "127.0.0.12")
    emulator.send_beacon(quiet)
    first = watcher.wait_for(lambda m: True)
    assert bridge.stop() == 0, bridge.output()
    start_bridge()
    offline = watcher.wait_for(lambda m: presence_of(m).state == "offline", timeout=8)
    # on time: 4 s after the only beacon, though the bridge restarted in between
    assert abs((presence_of(offline).since - presence_of(first).last_seen).total_seconds() - 4) < 1.0
    assert [presence_of(m).state for m in watcher.messages] == ["online", "offline"]


def test_bridge_killed_restores_from_retained(start_bridge, bridge_env, watch, topics):
    bridge_env["HACER_OFFLINE_AFTER"] = "4"
    bridge = start_bridge()
    watcher = watch(topics.filter("node_presence"))
    emulator = Emulator([], target(bridge_env), serve_tcp=False)
    emulator.send_beacon(EmulatedNode(51, "thermostat", "127.0.0.13"))
    watcher.wait_for(lambda m: True)
    bridge.stop(kill=True)
    start_bridge()
    watcher.wait_for(lambda m: presence_of(m).state == "offline", timeout=8)
    assert [presence_of(m).state for m in watcher.messages] == ["online", "offline"]


def command(bus, topics, node_id, op, payload, correlation=None):
    bus.publish(topics.build(f"node_{op}", node_id), payload, correlation=correlation)


def result_of(message):
    return CommandResult.from_payload(message.payload)


def test_set_and_get_round_trips_for_every_type(start_bridge, nodes, make_bus, watch, topics):
    start_bridge()
    made, emulator = nodes
    made[2].split_replies = True  # a reply split across reads
    presence = watch(topics.filter("node_presence"))
    emulator.start()
    for node in made:
        presence.wait_for(lambda m, n=node: presence_of(m).id == n.id)
    results = watch(topics.filter("node_result"))
    states = watch(topics.filter("node_state"))
    bus = make_bus()
    toggle, light, thermostat, sensor = made
    cases = [
        (toggle, "set", '{"on": 1}', {"ok": True, "value": 1, "raw": "+i1e"}),
        (toggle, "get", "on", {"ok": True, "value": 1, "raw": "+i1e"}),
        (light, "set", json.dumps({"color": 0x00FF80}), {"ok": True, "value": 0x00FF80, "raw": "+15:Key Set Success"}),
        (light, "set", '{"name": "desk"}', {"ok": True, "value": "desk"}),
        (light, "get", '"color"', {"ok": True, "value": 0x00FF80, "raw": "+i65408e"}),
        (thermostat, "get", "temperature", {"ok": True, "value": 21, "raw": "+i21e"}),
        (thermostat, "set", '{"target": 23}', {"ok": True, "value": 23}),
        (
            thermostat,
            "set",
            '{"temperature": 30}',
            {"ok": False, "error": "Key Is Read Only", "raw": "-Key Is Read Only"},
        ),
        (sensor, "get", "humidity", {"ok": False, "error": "Key Not Found", "raw": "-Key Not Found"}),
        (light, "get", "humidity", {"ok": False, "error": "Key Not Found", "raw": "-13:Key Not Found"}),
        (sensor, "get", '["temperature", "name"]', {"ok": True, "value": 21}),
    ]
    for index, (node, op, payload, expected) in enumerate(cases):
        correlation = f"c{index}".encode()
        command(bus, topics, node.id, op, payload, correlation)
        message = results.wait_for(lambda m, c=correlation: m.correlation == c)
        result = result_of(message)
        assert result.node_id == node.id and result.op == op
        assert result.correlation == correlation.decode()
        for field, value in expected.items():
            assert getattr(result, field) == value, (payload, result)
    assert toggle.values["on"] == 1 and light.values == {"color": 0x00FF80, "name": "desk"}
    assert thermostat.values["target"] == 23
    states.wait_for(
        lambda m: (
            topics.node_id(m.topic) == light.id
            and NodeValues.from_payload(m.payload).values == {"color": 0x00FF80, "name": "desk"}
        )
    )
    late = watch(topics.build("node_state", thermostat.id))
    assert late.messages[0].retain
    assert NodeValues.from_payload(late.messages[0].payload).values == {"temperature": 21, "target": 23}


def test_response_topic_gets_the_result_too(start_bridge, nodes, make_bus, watch, topics):
    start_bridge()
    made, emulator = nodes
    presence = watch(topics.filter("node_presence"))
    emulator.start()
    presence.wait_for(lambda m: presence_of(m).id == made[0].id)
    replies = watch(topics.build("reply", "me"))
    bus = make_bus("me")
    command = ClientCommand(made[0].id, get=["on"]).to_payload()
    bus.publish(
        topics.build("client_command", "me"), command, correlation=b"xyz", response_topic=topics.build("reply", "me")
    )
    reply = replies.wait_for(lambda m: True)
    assert reply.correlation == b"xyz" and result_of(reply).value == 0


def test_dead_node_times_out_without_blocking_others(start_bridge, bridge_env, nodes, make_bus, watch, topics):
    bridge_env["HACER_NODE_TIMEOUT"] = "1"
    start_bridge()
    made, emulator = nodes
    made[0].mute = True
    presence = watch(topics.filter("node_presence"))
    emulator.start()
    for node in made:
        presence.wait_for(lambda m, n=node: presence_of(m).id == n.id)
    # a node whose address refuses connections
    refused_ip = "127.0.0.250"
    Emulator([], target(bridge_env), serve_tcp=False).send_beacon(EmulatedNode(99, "toggle", refused_ip))
    presence.wait_for(lambda m: presence_of(m).id == 99)
    results = watch(topics.filter("node_result"))
    bus = make_bus()
    command(bus, topics, made[0].id, "get", "on", b"mute")
    command(bus, topics, 99, "get", "on", b"refused")
    command(bus, topics, 123456789, "get", "on", b"unknown")
    for index in range(10):  # the other node answers while the mute one waits
        command(bus, topics, made[1].id, "get", "color", f"ok{index}".encode())
    fast = [result_of(results.wait_for(lambda m, i=i: m.correlation == f"ok{i}".encode())) for i in range(10)]
    assert all(r.ok for r in fast)
    refused = result_of(results.wait_for(lambda m: m.correlation == b"refused"))
    assert not refused.ok and "cannot reach" in refused.error
    unknown = result_of(results.wait_for(lambda m: m.correlation == b"unknown"))
    assert not unknown.ok and unknown.error == "unknown node"
    timed_out = results.wait_for(lambda m: m.correlation == b"mute")
    assert results.messages.index(timed_out) > max(
        results.messages.index(m) for m in results.messages if m.correlation and m.correlation.startswith(b"ok")
    )
    assert "no reply within 1 s" in result_of(timed_out).error


def test_the_bridge_reads_values_itself_and_says_when_a_node_stops_answering(
    start_bridge, bridge_env, nodes, watch, topics
):
    bridge_env["HACER_POLL"] = "thermostat:temperature,target@1 sensor_temp:temperature@1"
    bridge_env["HACER_NODE_TIMEOUT"] = "1"
    start_bridge()
    made, emulator = nodes
    toggle, light, thermostat, sensor = made
    readings = watch(topics.filter("node_readings"))
    results = watch(topics.filter("node_result"))
    stats = watch(topics.build("bridge_stats"))
    emulator.start()

    seen = [0]  # each wait looks only at what came after the previous one's match

    def reading_of(node, check, start=None):
        message = readings.wait_for(
            lambda m: topics.node_id(m.topic) == node.id and check(NodeReadings.from_payload(m.payload)),
            timeout=15,
            start=seen[0] if start is None else start,
        )
        seen[0] = max(seen[0], readings.messages.index(message) + 1)
        return NodeReadings.from_payload(message.payload)

    reading_of(thermostat, lambda r: r.values.keys() == {"temperature", "target"}, start=0)
    reading_of(sensor, lambda r: "temperature" in r.values, start=0)
    thermostat.values["temperature"] = 25  # the room warms; nobody asks
    warmer = reading_of(thermostat, lambda r: r.values["temperature"].value == 25)
    assert warmer.values["target"].at < warmer.values["temperature"].at and warmer.answering
    sensor.mute = True
    silent = reading_of(sensor, lambda r: not r.answering)
    assert silent.error == "no reply within 1 s" and silent.values["temperature"].value == 21
    sensor.mute = False
    back = reading_of(sensor, lambda r: r.answering)
    assert back.since > silent.since and back.error is None
    late = watch(topics.build("node_state", thermostat.id))
    assert NodeValues.from_payload(late.messages[0].payload).values == {"temperature": 25, "target": 20}
    polls = BridgeStats.from_payload(
        stats.wait_for(lambda m: "failed" in BridgeStats.from_payload(m.payload).polls).payload
    )
    assert polls.polls["ok"] > 0 and polls.commands == {}
    assert results.messages == []  # the bridge's own reads are nobody's results
    assert toggle.requests == light.requests == 0  # not in the plan


def test_bad_command_payloads_get_an_answer(start_bridge, make_bus, watch, topics):
    start_bridge()
    results = watch(topics.filter("node_result"))
    bus = make_bus()
    command(bus, topics, 5, "set", "not json", b"a")
    command(bus, topics, 5, "set", '{"on": [1]}', b"b")
    command(bus, topics, 5, "get", "[]", b"c")
    for correlation in (b"a", b"b", b"c"):
        result = result_of(results.wait_for(lambda m, c=correlation: m.correlation == c))
        assert not result.ok and result.error.startswith("bad request")


def test_bad_datagrams_are_counted_and_dropped(start_bridge, bridge_env, watch, topics):
    bridge = start_bridge()
    stats = watch(topics.build("bridge_stats"))
    presence = watch(topics.filter("node_presence"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in [
            b"garbage",
            b"[]",
            b'{"id": "x", "type": "toggle"}',
            b'{"id": 1}',
            b"{" * 2000,
            b'{"id": 1, "type": "toggle", "port": 0}',
        ]:
            sock.sendto(datagram, target(bridge_env))
        sock.sendto(b'{"id": 8, "type": "toggle"}', target(bridge_env))
    presence.wait_for(lambda m: presence_of(m).id == 8)
    message = stats.wait_for(lambda m: BridgeStats.from_payload(m.payload).accepted == 1, timeout=5)
    counted = BridgeStats.from_payload(message.payload)
    assert counted.dropped == {
        "not_json": 1,
        "not_object": 1,
        "bad_id": 1,
        "bad_type": 1,
        "too_large": 1,
        "bad_field": 1,
    }
    assert counted.datagrams == 7 and counted.kernel_drops == 0
    assert bridge.process.poll() is None
    assert "dropped 1 bad datagram" in bridge.output()


def test_broker_restart_mid_stream_presence_whole_again(
    start_bridge, bridge_env, broker, nodes, make_bus, watch, topics
):
    start_bridge()
    made, emulator = nodes
    presence = watch(topics.filter("node_presence"))
    emulator.start()
    for node in made:
        presence.wait_for(lambda m, n=node: presence_of(m).id == n.id)
    # Lose everything the broker held: stop it and wipe its persistence, then start it again.
    broker.stop(kill=True)
    for path in (broker.work_dir / "data").iterdir():
        path.unlink()
    extra = EmulatedNode(77, "toggle", "127.0.0.40")
    Emulator([], target(bridge_env), serve_tcp=False).send_beacon(extra)  # seen while the broker is down
    broker.start()
    fresh = watch(topics.filter("node_presence"))
    bridge_state = watch(topics.build("bridge_state"))
    bridge_state.wait_for(lambda m: m.payload == b"online", timeout=15)
    wanted = {n.id for n in made} | {77}
    wait_until(
        lambda: {presence_of(m).id for m in fresh.messages} >= wanted, timeout=15, what="all presences republished"
    )
    results = watch(topics.filter("node_result"))
    command(make_bus(), topics, made[0].id, "get", "on", b"after")
    assert result_of(results.wait_for(lambda m: m.correlation == b"after")).ok


def test_fuzzed_datagrams_never_stop_the_bridge(start_bridge, bridge_env, watch, topics):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    bridge = start_bridge()
    stats = watch(topics.build("bridge_stats"))
    sent = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(min_size=1, max_size=1500),
            st.dictionaries(
                st.sampled_from(["id", "type", "name", "interval", "port", "state"]),
                st.one_of(
                    st.integers(-2, 2**60), st.text(max_size=8), st.none(), st.floats(allow_nan=False), st.booleans()
                ),
            ).map(lambda d: json.dumps(d).encode()),
        )
    )
    def send(datagram):
        sock.sendto(datagram, target(bridge_env))
        sent.append(datagram)

    send()
    sock.close()
    final = stats.wait_for(lambda m: BridgeStats.from_payload(m.payload).datagrams == len(sent), timeout=10)
    counted = BridgeStats.from_payload(final.payload)
    assert counted.accepted + sum(counted.dropped.values()) == len(sent)
    assert "internal_error" not in counted.dropped and counted.kernel_drops == 0
    assert bridge.process.poll() is None


def test_a_command_arriving_while_an_idle_connection_closes_is_answered(monkeypatch):
    import asyncio
    import queue
    import threading

    from bridge import commands

    from support import free_port

    node = EmulatedNode(7, "toggle", "127.0.0.31", free_port())
    emulator = Emulator([node], ("127.0.0.1", free_port(socket.SOCK_DGRAM)))
    emulator.start()
    results: queue.Queue = queue.Queue()
    relay = commands.CommandRelay(lambda node_id: (node.ip, node.port), lambda result, _: results.put(result), 2.0)
    monkeypatch.setattr(commands, "IDLE_CLOSE_SECONDS", 0.05)
    closing, release = threading.Event(), threading.Event()
    disconnect, calls = commands._NodeChannel._disconnect, []

    async def slow_disconnect(channel):
        calls.append(channel)
        if len(calls) == 2:  # the first is the first command's (no connection yet); this one: idle
            closing.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        await disconnect(channel)

    monkeypatch.setattr(commands._NodeChannel, "_disconnect", slow_disconnect)
    relay.start()
    try:
        relay.submit(commands.Command(7, "get", "on"))
        assert results.get(timeout=5).ok
        assert closing.wait(5), "the idle connection was never closed"
        relay.submit(commands.Command(7, "get", "on", correlation=b"late"))
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), relay._loop).result(5)  # the submit has run
        release.set()
        late = results.get(timeout=5)
        assert late.correlation == "late" and late.ok
    finally:
        release.set()
        relay.stop()
        emulator.stop()


def test_polls_due_together_are_spread_over_their_period():
    """A second's polls once went into the relay's loop at once: a command then waited behind them all."""
    import queue

    from bridge import commands

    from support import free_port

    nodes = [EmulatedNode(20 + i, "toggle", f"127.0.0.{40 + i}", free_port()) for i in range(5)]
    emulator = Emulator(nodes, ("127.0.0.1", free_port(socket.SOCK_DGRAM)))
    emulator.start()
    by_id = {node.id: node for node in nodes}
    answered: queue.Queue = queue.Queue()
    relay = commands.CommandRelay(
        lambda node_id: (by_id[node_id].ip, by_id[node_id].port),
        lambda result, command: answered.put((time.monotonic(), result, command)),
        2.0,
    )
    relay.start()
    try:
        relay.poll([(node.id, ("on",)) for node in nodes], over=0.5)  # at 0, 0.1, ... 0.4 s
        polls = [answered.get(timeout=10) for _ in nodes]
    finally:
        relay.stop()
        emulator.stop()
    assert all(command.poll and result.ok for _, result, command in polls)
    assert [result.node_id for _, result, _ in polls] == [node.id for node in nodes]
    assert polls[-1][0] - polls[0][0] >= 0.35


def test_a_command_sent_while_the_bridge_restarts_is_answered_when_it_is_back(
    start_bridge, nodes, make_bus, watch, topics
):
    bridge = start_bridge()
    made, emulator = nodes
    presence = watch(topics.filter("node_presence"))
    emulator.start()
    presence.wait_for(lambda m: presence_of(m).id == made[0].id)
    results = watch(topics.build("node_result", made[0].id))
    bridge.stop(kill=True)  # as a crash: its session stays in the broker
    sender = make_bus()
    sender.publish(topics.build("node_set", made[0].id), b'{"on": 1}', correlation=b"while away")
    sender.sync()  # the broker has it, queued for the bridge's session
    start_bridge()
    result = result_of(results.wait_for(lambda m: m.correlation == b"while away", timeout=20))
    assert result.ok and made[0].values["on"] == 1


# --- the bridge publishing them --------------------------------------------------------------------


def test_the_bridge_publishes_configs_renames_clears_and_answers_home_assistants_birth(
    start_bridge, bridge_env, watch, topics, make_bus
):
    start_bridge()
    types = ["toggle", "light_rgb", "sensor_temp", "thermostat"]
    nodes = make_nodes(4, types, port=int(bridge_env["HACER_NODE_PORT"]), base_id=uuid.uuid4().int % 10**9)
    presence = watch(topics.filter("node_presence"))
    configs = watch("homeassistant/#")
    emulator = Emulator(nodes, target(bridge_env), serve_tcp=False)
    for node in nodes:
        emulator.send_beacon(node)
        presence.wait_for(lambda m, n=node: presence_of(m).id == n.id)

    def latest(topic):
        message = configs.wait_for(lambda m: m.topic == topic)
        return [m for m in configs.messages if m.topic == topic][-1] if message else None

    toggle, light, sensor, thermostat = nodes
    expected = {  # which entities each type has: tests/unit/test_discovery.py
        DiscoveryTopics().config(component, node.id, object_id)
        for node in nodes
        for component, object_id in entity_configs(topics, node.id, node.type, "")
    }
    for topic in expected:
        latest(topic)
    switch_topic = DiscoveryTopics().config("switch", toggle.id, "on")
    assert json.loads(latest(switch_topic).payload)["device"]["name"] == f"toggle {toggle.id}"

    bus = make_bus()
    bus.publish(
        topics.build("node_meta", toggle.id), NodeMeta(toggle.id, "hall lamp", "toggle").to_payload(), retain=True
    )
    configs.wait_for(lambda m: m.topic == switch_topic and b"hall lamp" in m.payload)

    seen = len(configs.messages)
    bus.publish("homeassistant/status", b"online")  # Home Assistant (re)started
    configs.wait_for(lambda m: {x.topic for x in configs.messages[seen:]} >= expected, start=seen)

    bus.publish(topics.build("node_presence", thermostat.id), b"", retain=True)  # the api deleting it
    for object_id, component in (("temperature", "sensor"), ("target", "number")):
        topic = DiscoveryTopics().config(component, thermostat.id, object_id)
        configs.wait_for(lambda m, t=topic: m.topic == t and m.payload == b"", start=seen)
    late = watch("homeassistant/#")
    assert {m.topic for m in late.messages} == {t for t in expected if f"hacer_{thermostat.id}/" not in t}
    assert all(m.retain for m in late.messages)
