"""What the bridge's own reads of node values cost commands: 1 000 emulated nodes, polling off and on.

    .venv/bin/python bench/bench_polling.py            # about 8 minutes
    .venv/bin/python bench/bench_polling.py --quick

A `manage.py bridge` process serves 1 000 emulated 2015 nodes (`manage.py emulate`, a process of
its own: each node on its own loopback address, a quarter of each type). The same command load
(a set to a random node, one at a time, through the broker: MQTT -> TCP -> MQTT) is measured
with polling off (the baseline), at the default plan (HACER_POLL's default: about 25 reads a
second over 1 000 nodes) and at a plan ten times as heavy (every node every 5 s: 200 reads a
second), alternating the three in rounds so the machine's noise is shared; commands start once
every node's first read is due (one interval). Printed: the reads made while the commands ran,
command round trip p50 and p99 of each, and the ratio to the baseline of the same rounds.
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, percentile  # noqa: E402
from hacer.broker import BrokerProcess  # noqa: E402
from hacer.bus import Bus, Message  # noqa: E402
from hacer.messages import BridgeStats, Presence  # noqa: E402
from hacer.settings import DEFAULT_POLL, parse_poll_plans  # noqa: E402
from hacer.topics import Topics  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
PLANS = {
    "off (baseline)": "off",
    "default": DEFAULT_POLL,
    "10x default": "thermostat:temperature,target@5 sensor_temp:temperature@5 toggle:on@5 light_rgb:color@5",
}


def run_bridge(
    broker: BrokerProcess, workdir: Path, discovery: int, node_port: int, plan: str
) -> subprocess.Popen[bytes]:
    env = {
        "HACER_MQTT_URL": broker.url,
        "HACER_DISCOVERY_HOST": "127.0.0.1",
        "HACER_DISCOVERY_PORT": str(discovery),
        "HACER_NODE_PORT": str(node_port),
        "HACER_STATE_DIR": str(workdir / "state"),
        "HACER_POLL": plan,
        "HACER_HA_DISCOVERY": "off",
        "HACER_STATS_INTERVAL": "1",
        "HACER_NEW_NODES_PER_SECOND": "100000",  # every node at once, as after a power cut
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.Popen(
        [sys.executable, str(PROJECT / "manage.py"), "bridge"],
        env=env,
        stdout=open(workdir / "bridge.log", "ab"),
        stderr=subprocess.STDOUT,
        cwd=PROJECT,
    )


def measure(client: Bus, topics: Topics, node_ids: list[int], count: int, settle: float) -> list[float]:
    """Round trips (ms) of `count` sets to random nodes, after `settle` seconds of polling alone."""
    time.sleep(settle)  # a load to be under, not an event to wait for
    results: dict[bytes, float] = {}
    arrived = threading.Event()

    def on_result(message: Message) -> None:
        if message.correlation is not None:
            results[message.correlation] = time.perf_counter()
            arrived.set()

    client.subscribe(topics.filter("node_result"), on_result)
    client.sync()
    times = []
    for index in range(count):
        node_id = random.choice(node_ids)
        correlation = f"{time.monotonic_ns()}-{index}".encode()
        arrived.clear()
        started = time.perf_counter()
        client.publish(topics.build("node_set", node_id), '{"name": "x"}', correlation=correlation)
        deadline = time.monotonic() + 10
        while correlation not in results:
            if not arrived.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a command got no result within 10 s")
            arrived.clear()
        times.append((results[correlation] - started) * 1000)
    client.unsubscribe(topics.filter("node_result"))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    nodes_count, rounds, count = (200, 1, 100) if args.quick else (1000, 2, 2000)
    topics = Topics()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        broker = BrokerProcess(workdir / "broker", [free_port(), free_port()])
        broker.start()
        discovery, node_port = free_port(socket.SOCK_DGRAM), free_port()
        types = ["light_rgb", "thermostat", "toggle", "sensor_temp"]
        # Its own process, so serving the reads takes nothing from the client measuring commands.
        emulator = subprocess.Popen(
            [
                sys.executable,
                str(PROJECT / "manage.py"),
                "emulate",
                "--count",
                str(nodes_count),
                "--types",
                ",".join(types),
                "--interval",
                "10",
                "--target",
                f"127.0.0.1:{discovery}",
                "--port",
                str(node_port),
            ],
            stdout=open(workdir / "emulator.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        client = Bus(broker.url, topics, "bench-polling")
        latest_stats: list[BridgeStats] = []
        client.subscribe(
            topics.build("bridge_stats"), lambda m: latest_stats.append(BridgeStats.from_payload(m.payload))
        )
        client.start()
        client.wait_connected(10)
        # Lights and thermostats take a name: the set every command does.
        named = [
            1000 + index for index in range(nodes_count) if types[index % len(types)] in ("light_rgb", "thermostat")
        ]
        samples: dict[str, list[float]] = {name: [] for name in PLANS}
        reads: dict[str, int] = {name: 0 for name in PLANS}
        try:
            for round_number in range(rounds):
                for name, plan_text in PLANS.items():
                    bridge = run_bridge(broker, workdir, discovery, node_port, plan_text)
                    seen: set[int] = set()
                    everyone = threading.Event()

                    def on_presence(
                        message: Message, seen: set[int] = seen, everyone: threading.Event = everyone
                    ) -> None:
                        if message.payload:
                            seen.add(Presence.from_payload(message.payload).id)
                            if len(seen) >= nodes_count:
                                everyone.set()

                    client.subscribe(topics.filter("node_presence"), on_presence)
                    if not everyone.wait(120):
                        raise RuntimeError(f"only {len(seen)} of {nodes_count} nodes came online")
                    client.unsubscribe(topics.filter("node_presence"))
                    # A node's first read falls anywhere in its interval: the load is steady after one.
                    settle = max((plan.interval for plan in parse_poll_plans(plan_text).values()), default=0) + 5
                    before = sum(latest_stats[-1].polls.values()) if latest_stats else 0
                    samples[name] += measure(client, topics, named, count, 5 if args.quick else settle)
                    reads[name] += sum(latest_stats[-1].polls.values()) - before if latest_stats else 0
                    bridge.terminate()
                    bridge.wait(15)
                    latest_stats.clear()
                    print(f"round {round_number + 1}: {name} done", flush=True)
        finally:
            emulator.terminate()
            emulator.wait(15)
            client.stop()
            broker.stop()
    base = samples["off (baseline)"]
    print(f"\n{nodes_count} nodes, {rounds} rounds x {count} sets each, alternating")
    print(f"{'polling':>16} {'reads':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10} {'p99 ratio':>10}")
    for name, times in samples.items():
        p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
        ratio50, ratio99 = p50 / percentile(base, 0.5), p99 / percentile(base, 0.99)
        print(f"{name:>16} {reads[name]:>7} {p50:>8.2f} {p99:>8.2f} {ratio50:>10.2f} {ratio99:>10.2f}")


if __name__ == "__main__":
    main()
