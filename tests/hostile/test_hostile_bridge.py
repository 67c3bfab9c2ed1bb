"""One bad LAN host against the bridge: hostile node replies, made-up ids, forged addresses."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from emulator.nodes import EmulatedNode, Emulator
from hacer.bus import MessageTooLarge
from hacer.messages import BridgeStats, CommandResult

from support import presence_of, target, wait_until


class HostileNode:
    """A TCP 'node' on a loopback address that answers every request with `reply()`'s bytes."""

    def __init__(self, ip: str, port: int, reply) -> None:
        self.server = socket.create_server((ip, port))
        self.reply = reply
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(4096):
                    self.requests += 1
                    for chunk in self.reply():
                        conn.sendall(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def announce(env, node_id, ip, **fields):
    body = {"id": node_id, "type": "sensor_temp", **fields}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        sock.sendto(json.dumps(body).encode(), target(env))


def result_of(message):
    return CommandResult.from_payload(message.payload)


@pytest.fixture
def online(watch, topics, bridge_env):
    """Announce a node from `ip` and return once its presence is on the bus."""
    presence = watch(topics.filter("node_presence"))

    def announce_and_wait(node_id, ip, **fields):
        announce(bridge_env, node_id, ip, **fields)
        return presence_of(presence.wait_for(lambda m: presence_of(m).id == node_id))

    return announce_and_wait


def endless(chunk: bytes, first: bytes = b""):
    def reply():
        yield first
        while True:
            yield chunk

    return reply


@pytest.mark.parametrize(
    "reply",
    [
        lambda: iter([b"+999999:" + b"x" * 1_000_000]),  # declares 1 MB, sends it
        endless(b"y" * 65536, first=b"-"),  # a raw error text that never pauses
        endless(b"7" * 65536, first=b"+i"),  # an integer that never ends
    ],
    ids=["declared-megabyte", "endless-raw-error", "endless-integer"],
)
def test_a_hostile_reply_ends_in_a_bounded_result_and_the_bridge_stays_connected(
    reply, start_bridge, bridge_env, online, make_bus, watch, topics
):
    bridge_env["HACER_NODE_TIMEOUT"] = "2"
    start_bridge()
    state = watch(topics.build("bridge_state"))
    node = HostileNode("127.0.0.61", int(bridge_env["HACER_NODE_PORT"]), reply)
    friendly = EmulatedNode(62, "toggle", "127.0.0.62", port=int(bridge_env["HACER_NODE_PORT"]))
    emulator = Emulator([friendly], target(bridge_env))
    try:
        online(61, "127.0.0.61")
        emulator.start()
        friend_presence = watch(topics.build("node_presence", 62))
        emulator.send_beacon(friendly)
        friend_presence.wait_for(lambda m: True)
        results = watch(topics.filter("node_result"))
        bus = make_bus()
        started = time.monotonic()
        bus.publish(topics.build("node_get", 61), "temperature", correlation=b"hostile")
        bad = result_of(results.wait_for(lambda m: m.correlation == b"hostile", timeout=15))
        assert not bad.ok and bad.reason in ("bad_reply", "timeout"), bad
        assert len(bad.raw) <= 200 and len(bad.error or "") <= 400
        assert time.monotonic() - started < 10
        # The bridge kept its connection (no will, no reconnect loop) and serves other nodes.
        bus.publish(topics.build("node_get", 62), "on", correlation=b"friend")
        assert result_of(results.wait_for(lambda m: m.correlation == b"friend", timeout=10)).ok
        assert b"offline" not in [m.payload for m in state.messages]
    finally:
        node.close()
        emulator.stop()


def test_a_command_is_answered_only_on_its_senders_own_reply_topics(
    start_bridge, bridge_env, online, make_bus, watch, topics
):
    """A response topic is honoured only on `clients/<id>/command` and only under `replies/<id>/`: no
    request makes the bridge publish over a part's topic, or hand another client a result it did not ask for."""
    from hacer.messages import ClientCommand

    start_bridge()
    online(71, "127.0.0.71")  # no TCP server there: the command ends `unreachable`
    state = watch(topics.build("bridge_state"))
    replies = watch(topics.prefix + "/replies/#")
    results = watch(topics.filter("node_result"))
    attacker = make_bus("attacker")
    victim_reply = topics.build("reply", "victim")
    get_on = ClientCommand(71, get="on").to_payload()
    for topic, payload, response_topic, correlation in (
        (topics.build("node_get", 71), b"on", topics.build("bridge_state"), b"over a part's topic"),
        (topics.build("node_get", 71), b"on", victim_reply, b"to the victim, on a node's topic"),
        (topics.build("client_command", "attacker"), get_on, victim_reply, b"to the victim, as itself"),
        (topics.build("client_command", "attacker"), get_on, topics.build("reply", "attacker"), b"its own"),
    ):
        attacker.publish(topic, payload, correlation=correlation, response_topic=response_topic)
    for correlation in (b"over a part's topic", b"to the victim, on a node's topic", b"to the victim, as itself"):
        results.wait_for(lambda m, c=correlation: m.correlation == c)  # each still has its result, on the node's topic
    replies.wait_for(lambda m: m.correlation == b"its own")
    assert [m.topic for m in replies.messages] == [topics.build("reply", "attacker")]
    assert [m.payload for m in state.messages] == [b"online"]
    stats = watch(topics.build("bridge_stats"))
    stats.wait_for(lambda m: BridgeStats.from_payload(m.payload).commands.get("bad_response_topic") == 3)


def test_a_bad_client_command_is_answered_on_its_senders_reply_topic(start_bridge, make_bus, watch, topics):
    start_bridge()
    replies = watch(topics.build("reply", "me"))
    me = make_bus("me")
    for payload in (b'{"node": 71}', b'{"node": 71, "set": {"on": 1}, "get": "on"}', b'{"node": 71, "colour": 1}'):
        me.publish(
            topics.build("client_command", "me"),
            payload,
            correlation=payload,
            response_topic=topics.build("reply", "me"),
        )
    for payload in (b'{"node": 71}', b'{"node": 71, "set": {"on": 1}, "get": "on"}', b'{"node": 71, "colour": 1}'):
        result = result_of(replies.wait_for(lambda m, p=payload: m.correlation == p))
        assert result.reason == "bad_request" and not result.ok


@pytest.mark.parametrize("level", ["abc", "１０００", "99999999999999999999", "-1"])
def test_a_command_to_a_bad_node_id_gets_a_bad_request_result(level, start_bridge, bridge_env, make_bus, watch, topics):
    start_bridge()
    node = EmulatedNode(1000, "toggle", "127.0.0.72", port=int(bridge_env["HACER_NODE_PORT"]))
    emulator = Emulator([node], target(bridge_env))
    emulator.start()
    try:
        emulator.send_beacon(node)
        watch(topics.build("node_presence", 1000)).wait_for(lambda m: True)
        results = watch(topics.prefix + "/nodes/+/result")
        bus = make_bus()
        bus.publish(f"{topics.prefix}/nodes/{level}/set", '{"on": 1}', correlation=b"bad-id")
        message = results.wait_for(lambda m: m.correlation == b"bad-id")
        result = result_of(message)
        assert message.topic == f"{topics.prefix}/nodes/{level}/result"
        assert (result.ok, result.reason, result.node_id) == (False, "bad_request", None)
        assert "ASCII digits" in result.error
        assert node.requests == 0
    finally:
        emulator.stop()


def test_a_flood_of_new_ids_is_bounded_and_counted(start_bridge, bridge_env, watch, topics):
    bridge_env["HACER_MAX_NODES"] = "300"
    bridge_env["HACER_NEW_NODES_PER_SECOND"] = "100"
    start_bridge()
    stats = watch(topics.build("bridge_stats"))
    presence = watch(topics.filter("node_presence"))
    base = uuid.uuid4().int % 10**9
    sent = 20_000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index in range(sent):
            sock.sendto(b'{"id":%d,"type":"toggle"}' % (base + index), target(bridge_env))
    final = BridgeStats.from_payload(
        stats.wait_for(lambda m: BridgeStats.from_payload(m.payload).datagrams == sent, timeout=30).payload
    )
    assert final.accepted + sum(final.dropped.values()) == sent
    assert final.dropped.get("new_node_rate", 0) > 0
    # At 100 a second, well under 300 nodes could join while the burst lasted.
    assert 1 <= final.nodes_online + final.nodes_offline < 300
    assert final.accepted == final.nodes_online + final.nodes_offline
    # Past the table's size a new id is refused whatever the rate.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for round_ in range(40):
            for index in range(sent, sent + 100):
                sock.sendto(b'{"id":%d,"type":"toggle"}' % (base + index + 100 * round_), target(bridge_env))
            if "node_limit" in BridgeStats.from_payload(stats.messages[-1].payload).dropped:
                break
            stats.wait_for(lambda m: True, start=len(stats.messages))
    full = BridgeStats.from_payload(
        stats.wait_for(lambda m: "node_limit" in BridgeStats.from_payload(m.payload).dropped, timeout=30).payload
    )
    assert full.nodes_online + full.nodes_offline == 300
    assert len({presence_of(m).id for m in presence.messages}) <= 300


def test_a_beacon_moving_a_known_node_is_shown_in_its_presence(start_bridge, bridge_env, online, watch, topics):
    bridge = start_bridge()
    node_port = int(bridge_env["HACER_NODE_PORT"])
    first = online(81, "127.0.0.81")
    assert first.moved_from is None
    presence = watch(topics.build("node_presence", 81))
    announce(bridge_env, 81, "127.0.0.81", port=6666)
    moved = presence_of(presence.wait_for(lambda m: presence_of(m).port == 6666))
    assert moved.moved_from == f"127.0.0.81:{node_port}" and moved.moved_at is not None
    announce(bridge_env, 81, "127.0.0.82", port=6666)
    again = presence_of(presence.wait_for(lambda m: presence_of(m).ip == "127.0.0.82"))
    assert again.moved_from == "127.0.0.81:6666"
    wait_until(
        lambda: "node 81 moved from 127.0.0.81:6666 to 127.0.0.82:6666" in bridge.output(),
        what="the move in the bridge's log",
    )


def test_a_publish_larger_than_the_broker_accepts_is_dropped_and_counted(make_bus, watch, topics):
    bus = make_bus()
    watcher = watch(topics.prefix + "/replies/#")
    assert bus.max_packet == 1048576  # announced by the project's broker config
    with pytest.raises(MessageTooLarge):
        bus.publish(topics.prefix + "/replies/big", b"x" * 2_000_000)
    bus.publish(topics.prefix + "/replies/small", b"still connected")
    watcher.wait_for(lambda m: m.payload == b"still connected")
    assert bus.too_large == 1 and bus.connected
