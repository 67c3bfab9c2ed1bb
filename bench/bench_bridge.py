"""Bridge benchmarks, each printed as a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_bridge.py            # everything (about 2 minutes)
    .venv/bin/python bench/bench_bridge.py --quick    # smaller counts

1. ingest: beacons per second through the bridge's listener and tracker, against a bare
   `recvfrom` + `json.loads` loop on the same socket set-up, both fed by one sender process.
2. hold: 100 000 emulated node ids beaconing (interval scaled down 10x to 6 s, so the load is
   ten times the real one) for longer than the offline deadline: no node may go offline.
3. presence latency: first beacon of a new node -> retained presence at a subscriber.
4. command round trip: set through the bridge (MQTT -> TCP -> MQTT) against a direct TCP
   exchange with the same emulated node.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import broker_saving_on_every_change, free_port, percentile  # noqa: E402
from bridge.listener import _grow_receive_buffer, socket_drops  # noqa: E402
from bridge.service import Bridge  # noqa: E402
from emulator.nodes import EmulatedNode, Emulator  # noqa: E402
from hacer.bus import Bus, Message  # noqa: E402
from hacer.messages import Presence  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def start_sender(port: int, ids: int, rounds: int, pace_seconds: float = 0.0) -> subprocess.Popen[bytes]:
    """Send beacons from another process (the other core): `rounds` x `ids` datagrams."""
    code = f"""
import socket, time
from hacer.nodewire import Beacon
payloads = [Beacon(i, "toggle").to_payload() for i in range({ids})]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.2", 0))
pace = {pace_seconds}
for r in range({rounds}):
    start = time.monotonic()
    slices = 100 if pace else 1
    per = len(payloads) // slices
    for s in range(slices):
        for p in payloads[s * per:(s + 1) * per]:
            sock.sendto(p, ("127.0.0.1", {port}))
        if pace:
            time.sleep(max(0.0, start + pace * (s + 1) / slices - time.monotonic()))
"""
    return subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT)


# --- 1. ingest -----------------------------------------------------------------------------


def bare_loop(total: int, ids: int) -> tuple[float, int]:
    """The baseline: the fastest a Python loop can receive and parse beacons here."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _grow_receive_buffer(sock)
    sock.bind(("127.0.0.1", 0))
    sender = start_sender(sock.getsockname()[1], ids, total // ids)
    sock.settimeout(2.0)
    received = 0
    first = last = 0.0
    try:
        while received < total:
            data = sock.recvfrom(2048)[0]
            json.loads(data)
            received += 1
            if received == 1:
                first = time.perf_counter()
            last = time.perf_counter()
    except TimeoutError:
        pass
    sender.wait()
    drops = socket_drops(sock)
    sock.close()
    return (received - 1) / (last - first), drops


def bridge_ingest(broker: BrokerProcess, total: int, ids: int) -> tuple[float, int, int]:
    """The bridge's listener + tracker, wired to a real broker, on the same burst."""
    topics = Topics("bench")
    bus = Bus(broker.url, topics, "bench-bridge", presence_topic=topics.build("bridge_state"))
    bridge = Bridge(
        bus,
        topics,
        discovery_host="127.0.0.1",
        discovery_port=0,
        node_port=7777,
        offline_after=600,
        node_timeout=3,
        state_dir=None,
        max_nodes=10**7,
        new_nodes_per_second=10**7,
    )
    bridge.start()
    port = bridge.listener.port
    # Register the ids first: the steady state is known nodes refreshing their last-seen time.
    warm = start_sender(port, ids, 1)
    warm.wait()
    while bridge.listener.accepted < ids:
        time.sleep(0.01)
    base = bridge.listener.accepted
    sender = start_sender(port, ids, total // ids)
    first = last = 0.0
    seen = base
    idle_since = time.perf_counter()
    while True:
        count = bridge.listener.accepted
        now = time.perf_counter()
        if count != seen:
            if seen == base:
                first = now
            seen, last, idle_since = count, now, now
        elif sender.poll() is not None and now - idle_since > 1.0:
            break
        time.sleep(0.01)  # coarse polling: keep the GIL for the bridge
    drops = bridge.listener.kernel_drops()
    bridge.stop()
    return (seen - base) / (last - first), seen - base, drops


# --- 2. hold 100 000 nodes -----------------------------------------------------------------


def hold(broker: BrokerProcess, ids: int, interval: float, rounds: int) -> tuple[int, int, int, int]:
    topics = Topics("hold")
    offline = []
    watcher = Bus(broker.url, topics, "bench-hold-watch")
    watcher.subscribe(
        topics.filter("node_presence"), lambda m: offline.append(m) if b'"offline"' in m.payload else None
    )
    watcher.start()
    watcher.wait_connected(10)
    bus = Bus(broker.url, topics, "bench-hold-bridge")
    bridge = Bridge(
        bus,
        topics,
        discovery_host="127.0.0.1",
        discovery_port=0,
        node_port=7777,
        offline_after=None,
        node_timeout=3,
        state_dir=None,
        max_nodes=10**7,
        new_nodes_per_second=10**7,
    )
    bridge.start()
    # The tracker's default (3 x the announced interval) with the scaled-down interval:
    bridge.tracker._offline_after = 3 * interval
    sender = start_sender(bridge.listener.port, ids, rounds, pace_seconds=interval)
    sender.wait()
    while True:  # let the listener drain what is still in its buffer
        before = bridge.listener.accepted
        time.sleep(0.2)
        if bridge.listener.accepted == before:
            break
    online, offline_count = bridge.tracker.counts()
    stats = bridge.stats()
    bridge.stop()
    watcher.stop()
    return online, len(offline) + offline_count, stats.kernel_drops, stats.accepted


# --- 3. presence latency -------------------------------------------------------------------


def start_bridge_process(
    broker: BrokerProcess, workdir: Path, discovery: int, node_port: int, prefix: str
) -> subprocess.Popen[bytes]:
    env = {
        "HACER_MQTT_URL": broker.url,
        "HACER_TOPIC_PREFIX": prefix,
        "HACER_DISCOVERY_HOST": "127.0.0.1",
        "HACER_DISCOVERY_PORT": str(discovery),
        "HACER_NODE_PORT": str(node_port),
        "HACER_STATE_DIR": str(workdir / "state"),
        "PATH": "/usr/bin:/bin",
    }
    log = open(workdir / f"bridge-{prefix}.log", "ab")
    return subprocess.Popen(
        [sys.executable, str(PROJECT / "manage.py"), "bridge"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=PROJECT,
    )


class Arrivals:
    """Records when messages arrive, keyed by a function of the message."""

    def __init__(self, key) -> None:
        self.times: dict[object, float] = {}
        self.events: dict[object, threading.Event] = {}
        self._key = key

    def expect(self, key: object) -> threading.Event:
        self.events[key] = threading.Event()
        return self.events[key]

    def __call__(self, message: Message) -> None:
        key = self._key(message)
        self.times[key] = time.perf_counter()
        event = self.events.get(key)
        if event is not None:
            event.set()


def presence_latency(broker: BrokerProcess, workdir: Path, count: int) -> list[float]:
    topics = Topics("lat")
    discovery = free_port(socket.SOCK_DGRAM)
    arrivals = Arrivals(lambda m: Presence.from_payload(m.payload).id)
    watcher = Bus(broker.url, topics, "bench-lat-watch")
    watcher.subscribe(topics.filter("node_presence"), arrivals)
    state = threading.Event()
    watcher.subscribe(topics.build("bridge_state"), lambda m: m.payload == b"online" and state.set())
    watcher.start()
    watcher.wait_connected(10)
    process = start_bridge_process(broker, workdir, discovery, free_port(), "lat")
    state.wait(15)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.2", 0))
    latencies = []
    for node_id in range(1, count + 1):
        arrived = arrivals.expect(node_id)
        sent = time.perf_counter()
        sock.sendto(json.dumps({"id": node_id, "type": "toggle"}).encode(), ("127.0.0.1", discovery))
        if not arrived.wait(5):
            raise RuntimeError(f"presence of {node_id} never arrived")
        latencies.append((arrivals.times[node_id] - sent) * 1000)
    process.terminate()
    process.wait()
    watcher.stop()
    return latencies


# --- 4. command round trip -----------------------------------------------------------------


def command_round_trips(broker: BrokerProcess, workdir: Path, count: int) -> tuple[list[float], list[float]]:
    topics = Topics("cmd")
    discovery, node_port = free_port(socket.SOCK_DGRAM), free_port()
    node = EmulatedNode(4242, "toggle", "127.0.0.3", node_port)
    emulator = Emulator([node], ("127.0.0.1", discovery))
    arrivals = Arrivals(lambda m: m.correlation)
    client = Bus(broker.url, topics, "bench-cmd")
    client.subscribe(topics.build("node_result", node.id), arrivals)
    presence = threading.Event()
    client.subscribe(topics.build("node_presence", node.id), lambda m: presence.set())
    client.start()
    client.wait_connected(10)
    process = start_bridge_process(broker, workdir, discovery, node_port, "cmd")
    emulator.start()
    presence.wait(15)

    direct = []
    with socket.create_connection((node.ip, node_port)) as sock:
        for index in range(count):
            started = time.perf_counter()
            sock.sendall(b"s2:oni%de" % (index % 2))
            reply = b""
            while not reply.endswith(b"e"):
                reply += sock.recv(64)
            direct.append((time.perf_counter() - started) * 1000)

    bridged = []
    set_topic = topics.build("node_set", node.id)
    for index in range(count):
        correlation = str(index).encode()
        arrived = arrivals.expect(correlation)
        started = time.perf_counter()
        client.publish(set_topic, f'{{"on": {index % 2}}}', correlation=correlation)
        if not arrived.wait(5):
            raise RuntimeError("no result")
        bridged.append((arrivals.times[correlation] - started) * 1000)
    process.terminate()
    process.wait()
    emulator.stop()
    client.stop()
    return direct, bridged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    total, ids = (50_000, 5_000) if args.quick else (200_000, 10_000)
    hold_ids, hold_interval, hold_rounds = (20_000, 2.0, 4) if args.quick else (100_000, 6.0, 5)
    samples = 300 if args.quick else 2000

    with tempfile.TemporaryDirectory(prefix="hacer-bench-") as tmp:
        workdir = Path(tmp)
        brokers: list[BrokerProcess] = []

        def fresh_broker(config: Path = PROJECT / "mosquitto" / "dev.conf") -> BrokerProcess:
            """A new broker per phase: mosquitto saves its whole store on every change (dev
            config), so the retained table one phase leaves would slow the next."""
            broker = BrokerProcess(workdir / f"broker{len(brokers)}", [free_port()], template=config)
            broker.start()
            brokers.append(broker)
            return broker

        try:
            print(f"1. ingest, burst of {total} beacons for {ids} known ids, from a second process")
            bare, bare_drops = bare_loop(total, ids)
            rate, handled, drops = bridge_ingest(fresh_broker(), total, ids)
            print(f"   bare recvfrom+json.loads loop: {bare:10,.0f} /s  (kernel drops {bare_drops})")
            print(f"   bridge listener + tracker:     {rate:10,.0f} /s  (handled {handled}, kernel drops {drops})")
            print(f"   ratio bridge / bare: {rate / bare:.2f}   (goal >= 0.5)")

            print(
                f"2. hold {hold_ids} ids, interval {hold_interval:g} s, offline after "
                f"{3 * hold_interval:g} s, {hold_rounds} rounds ({hold_ids / hold_interval:,.0f} beacons/s)"
            )
            online, went_offline, hold_drops, accepted = hold(fresh_broker(), hold_ids, hold_interval, hold_rounds)
            print(
                f"   online at the end: {online}, offline events: {went_offline}, "
                f"kernel drops: {hold_drops}, beacons handled: {accepted} of {hold_ids * hold_rounds}"
            )

            gc.collect()  # the hold phase's 100 000 records must not be collected during timing
            print(f"3. presence latency, {samples} new nodes (first beacon -> retained presence at a subscriber)")
            for label, config in (
                ("project broker (saves every second)", PROJECT / "mosquitto" / "dev.conf"),
                ("broker saving on every change", broker_saving_on_every_change(workdir)),
            ):
                latencies = presence_latency(fresh_broker(config), workdir, samples)
                print(
                    f"   {label:40} p50 {percentile(latencies, 0.5):.2f} ms  "
                    f"p99 {percentile(latencies, 0.99):.2f} ms   (goal p99 < 5 ms)"
                )

            print(f"4. set round trip, {samples} each, same emulated node")
            direct, bridged = command_round_trips(fresh_broker(), workdir, samples)
            added = statistics.median(bridged) - statistics.median(direct)
            print(f"   direct TCP:   p50 {percentile(direct, 0.5):.3f} ms  p99 {percentile(direct, 0.99):.3f} ms")
            print(f"   via bridge:   p50 {percentile(bridged, 0.5):.3f} ms  p99 {percentile(bridged, 0.99):.3f} ms")
            print(f"   added at p50: {added:.3f} ms   (goal < 2 ms added)")
        finally:
            for broker in brokers:
                broker.stop()


if __name__ == "__main__":
    main()
