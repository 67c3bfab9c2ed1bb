"""The bus client against a real mosquitto: who sends a publish, and in what order."""

import socket
import threading

import pytest

from hacer.bus import Message, named_decoder
from hacer.messages import RunnerState

from support import Watcher, wait_until


def test_a_publish_goes_out_from_its_own_thread_while_the_network_thread_is_busy(make_bus, watch):
    watcher = watch("hacer/test/out")
    bus = make_bus(send_from_caller=True)
    in_handler, release = threading.Event(), threading.Event()

    def hold_the_network_thread(message: Message) -> None:
        in_handler.set()
        release.wait(30)

    bus.subscribe("hacer/test/hold", hold_the_network_thread)
    bus.sync()
    bus.publish("hacer/test/hold", b"")
    try:
        assert in_handler.wait(10)  # paho's network thread is inside the handler now
        bus.publish("hacer/test/out", b"sent meanwhile")
        watcher.wait_for(lambda message: message.payload == b"sent meanwhile")
    finally:
        release.set()


def test_publishes_from_many_threads_arrive_all_and_each_threads_in_order(topics, make_bus):
    # A small send buffer and large payloads among small ones: a socket that takes part of a
    # packet leaves the rest first in line, for whichever thread sends next.
    receiver = make_bus()
    seen = Watcher(receiver, "hacer/test/threads/+")
    receiver.sync()
    sender = make_bus(send_from_caller=True)
    echoed = Watcher(sender, "hacer/test/threads/+")  # its network thread acknowledges these meanwhile
    sender.sync()
    sender._client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    short_writes = count_short_writes(sender._client)
    threads, count = 6, 300

    def send(index: int) -> None:
        for seq in range(count):
            padding = b"x" * (200_000 if seq % 50 == 7 else 10)
            sender.publish(f"hacer/test/threads/{index}", b"%d " % seq + padding)

    workers = [threading.Thread(target=send, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    wait_until(lambda: len(seen.messages) == len(echoed.messages) == threads * count, 60, "every publish")
    for watcher in (seen, echoed):
        for index in range(threads):
            sequence = [int(m.payload.split()[0]) for m in watcher.topic(f"hacer/test/threads/{index}")]
            assert sequence == list(range(count))
    assert short_writes[0] > 0  # the case above did happen


def count_short_writes(client) -> list[int]:
    """Count the sends that took part of what they were given, on a paho client."""
    counted = [0]
    send = client._sock_send

    def counting(data: bytes) -> int:
        sent = send(data)
        counted[0] += sent < len(data)
        return sent

    client._sock_send = counting
    return counted


@pytest.mark.parametrize("send_from_caller", [False, True], ids=["network-thread", "same-thread"])
def test_a_threads_publishes_keep_their_order_across_a_broker_restart(make_bus, broker, send_from_caller):
    # paho re-sends what the broker did not acknowledge once CONNACK comes; a publish made from
    # the reconnect on must not overtake those.
    receiver = make_bus(clean_start=False, session_expiry=600)  # what comes meanwhile is kept for it
    seen = Watcher(receiver, "hacer/test/stream")
    receiver.sync()
    sender = make_bus(send_from_caller=send_from_caller)
    reconnects = []
    sender.on_connect(reconnects.append)
    sent, stop = [0], threading.Event()

    def stream() -> None:
        while not stop.is_set():
            sender.publish("hacer/test/stream", b"%d" % sent[0])
            sent[0] += 1

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        wait_until(lambda: len(seen.messages) > 200, 30, "the stream before the restart")
        broker.restart()
        wait_until(lambda: reconnects, 30, "the sender's reconnect")
        after = sent[0]
        wait_until(lambda: sent[0] > after + 2000, 30, "the stream after the restart")
    finally:
        stop.set()
        streaming.join(60)
    total = sent[0]
    wait_until(lambda: {int(m.payload) for m in seen.messages} >= set(range(total)), 60, "every publish")
    first_seen = list(dict.fromkeys(int(m.payload) for m in seen.messages))  # QoS 1 may deliver one twice
    assert first_seen == list(range(total))


def test_a_handler_may_publish_while_another_thread_completes_a_qos_0_send(make_bus, watch):
    # Completing a QoS 0 packet calls on_publish under paho's callback lock, which a handler on the
    # network thread holds while it publishes: the thread completing it must not hold paho's
    # message lock meanwhile, which that publish waits for.
    watcher = watch("hacer/test/done/+")
    bus = make_bus(send_from_caller=True)
    in_handler, go = threading.Event(), threading.Event()

    def publish_when_told(message: Message) -> None:
        in_handler.set()
        go.wait(30)
        bus.publish("hacer/test/done/handler", b"")

    bus.subscribe("hacer/test/hold", publish_when_told)
    bus.sync()
    full, rest_sent = threading.Event(), threading.Event()
    send = bus._client._sock_send

    def sending(data: bytes) -> int:
        if full.is_set():
            raise BlockingIOError
        rest_sent.set()
        return send(data)

    bus._client._sock_send = sending
    bus.publish("hacer/test/hold", b"")
    assert in_handler.wait(10)  # the network thread holds paho's callback lock from here
    full.set()
    bus.publish("hacer/test/done/qos0", b"", qos=0)  # the socket takes none of it: left queued
    full.clear()
    threading.Thread(target=bus.publish, args=("hacer/test/done/worker", b""), daemon=True).start()
    assert rest_sent.wait(10)  # that thread sends the QoS 0 packet, and waits for the callback lock
    go.set()
    for topic in ("qos0", "worker", "handler"):
        watcher.wait_for(lambda message, topic=topic: message.topic == f"hacer/test/done/{topic}")


def test_a_packet_queued_for_the_old_connection_does_not_go_before_connect(make_bus, broker):
    # Another thread may queue a packet (an ack) between reconnect() emptying the queue and CONNECT:
    # sent first, the broker takes it for a protocol error and closes the new connection.
    bus = make_bus()
    reconnected = threading.Event()
    bus.on_connect(lambda session_present: reconnected.set())
    bus._client.on_pre_connect = lambda client, userdata: client._send_puback(1)  # at every attempt
    broker.restart()
    assert reconnected.wait(30)


def test_a_burst_of_messages_is_handled_whole_before_the_drained_hooks(make_bus):
    # The broker sends a filter's retained messages at once on subscribe: they are handled in one
    # read, then the hooks run once, so what the burst changed is sent on once (api/live.py).
    publisher = make_bus()
    for index in range(100):
        publisher.publish(f"hacer/test/burst/{index}", b"%d" % index, retain=True)
    publisher.sync()
    marks: list[str] = []
    receiver = make_bus()
    receiver.on_drained(lambda: marks.append("drained"))
    receiver.subscribe("hacer/test/burst/+", lambda message: marks.append("message"))
    wait_until(lambda: marks.count("message") == 100 and marks[-1] == "drained", 10, "the burst and a drain")
    assert marks.count("drained") < 10  # paho alone reads one packet per poll: 100 drains
    for index in range(100):
        publisher.publish(f"hacer/test/burst/{index}", b"", retain=True)


def test_a_decoded_subscription_hands_on_only_what_it_decodes_and_counts_the_rest(make_bus, topics, caplog):
    bus = make_bus()
    decoded: list[RunnerState] = []
    subscription = topics.filter("runner_state")
    runner_state = named_decoder(topics, RunnerState.from_payload, lambda state: state.runner, "runner")
    bus.subscribe_decoded(subscription, runner_state, decoded.append)
    bus.sync()
    good = RunnerState("r1", "online", 4, (), 0).to_payload()
    bus.publish(topics.build("runner_state", "r1"), b'{"runner": "r1"')  # cut short
    bus.publish(topics.build("runner_state", "r2"), good)  # the topic names another runner
    bus.publish(topics.build("runner_state", "r1"), good)
    wait_until(lambda: decoded, 10, "the good state")
    bus.sync()
    assert decoded == [RunnerState.from_payload(good)]
    assert bus.refused == {subscription: 2}
    refusals = [record.getMessage() for record in caplog.records if record.getMessage().startswith("refused ")]
    assert len(refusals) == 2 and "another runner" in refusals[1]
