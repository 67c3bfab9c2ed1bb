"""The bus client against a real mosquitto: who sends a publish, and in what order."""

import socket
import threading

from hacer.bus import Message

from conftest import Watcher, wait_until


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
