"""What the bridge's own reads of node values cost commands: two bridges side by side, one polling.

    .venv/bin/python bench/bench_polling.py            # about 9 minutes
    .venv/bin/python bench/bench_polling.py --plans default --pairs 80000   # 16 minutes
    .venv/bin/python bench/bench_polling.py --quick

Paired, so that the machine's noise falls on both sides alike: two `manage.py bridge`
processes run at once on one broker (topic prefixes `pa` and `pb`), each serving 1 000 emulated
2015 nodes of its own (`manage.py emulate`, a process per set: each node on its own loopback
address, a quarter of each type). One bridge polls, the other does not; commands (a set to a
random node, one at a time, through the broker: MQTT -> TCP -> MQTT) alternate between the two,
so consecutive samples of the two sides are a few milliseconds apart. Each comparison runs
twice with the two bridges' roles swapped, which cancels whatever differs between the two
processes and their node sets. Compared with polling off: the default plan (HACER_POLL's
default, about 25 reads a second over 1 000 nodes) and a plan ten times as heavy (every node
every 5 s: 200 reads a second). Commands start once every node's first read is due.

Printed per plan: reads made while the commands ran, round trip p50 and p99 of both sides, and
the p99 ratio with its 95 % interval (bootstrap over the pairs). The goal "p99 unchanged within
10 %" is shown when the interval's upper end is below 1.10.
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
from hacer.bus import Bus, Message  # noqa: E402
from hacer.messages import BridgeStats, Presence  # noqa: E402
from hacer.settings import DEFAULT_POLL, parse_poll_plans  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
PLANS = {
    "default": DEFAULT_POLL,
    "10x default": "thermostat:temperature,target@5 sensor_temp:temperature@5 toggle:on@5 light_rgb:color@5",
}
TYPES = ["light_rgb", "thermostat", "toggle", "sensor_temp"]


class Site:
    """A bridge with its own emulated nodes, under its own topic prefix."""

    def __init__(self, broker: BrokerProcess, workdir: Path, prefix: str, first_ip: str, nodes: int) -> None:
        self.topics = Topics(prefix)
        self.workdir = workdir / prefix
        self.workdir.mkdir()
        self.broker = broker
        self.nodes = nodes
        self.discovery, self.node_port = free_port(socket.SOCK_DGRAM), free_port()
        self.first_ip = first_ip
        # Lights and thermostats take a name: the set every command does.
        self.named = [
            1000 + index for index in range(nodes) if TYPES[index % len(TYPES)] in ("light_rgb", "thermostat")
        ]
        self.stats: list[BridgeStats] = []
        self.bridge: subprocess.Popen[bytes] | None = None
        self.emulator: subprocess.Popen[bytes] | None = None

    def start_emulator(self) -> None:
        self.emulator = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), "emulate", "--count", str(self.nodes)]
            + ["--types", ",".join(TYPES), "--interval", "10", "--first-ip", self.first_ip]
            + ["--target", f"127.0.0.1:{self.discovery}", "--port", str(self.node_port)],
            stdout=open(self.workdir / "emulator.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    def start_bridge(self, plan: str) -> None:
        env = {
            "HACER_MQTT_URL": self.broker.url,
            "HACER_TOPIC_PREFIX": self.topics.prefix,
            "HACER_DISCOVERY_HOST": "127.0.0.1",
            "HACER_DISCOVERY_PORT": str(self.discovery),
            "HACER_NODE_PORT": str(self.node_port),
            "HACER_STATE_DIR": str(self.workdir / "state"),
            "HACER_POLL": plan,
            "HACER_HA_DISCOVERY": "off",
            "HACER_STATS_INTERVAL": "1",
            "HACER_NEW_NODES_PER_SECOND": "100000",  # every node at once, as after a power cut
            "PATH": "/usr/bin:/bin",
        }
        self.bridge = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), "bridge"],
            env=env,
            stdout=open(self.workdir / "bridge.log", "ab"),
            stderr=subprocess.STDOUT,
            cwd=PROJECT,
        )

    def reads(self) -> int:
        return sum(self.stats[-1].polls.values()) if self.stats else 0


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(15)


def wait_online(client: Bus, sites: list[Site]) -> None:
    """Wait until every node of every site is online."""
    seen: set[tuple[str, int]] = set()
    everyone = threading.Event()
    total = sum(site.nodes for site in sites)

    def on_presence(message: Message) -> None:
        if message.payload:
            seen.add((message.topic.split("/", 1)[0], Presence.from_payload(message.payload).id))
            if len(seen) >= total:
                everyone.set()

    for site in sites:
        client.subscribe(site.topics.filter("node_presence"), on_presence)
    if not everyone.wait(180):
        raise RuntimeError(f"only {len(seen)} of {total} nodes came online")
    for site in sites:
        client.unsubscribe(site.topics.filter("node_presence"))


def measure(client: Bus, sites: list[Site], pairs: int) -> list[list[float]]:
    """Round trips (ms) of sets to random nodes, alternating between the sites: one list per site, in pairs."""
    results: dict[bytes, float] = {}
    arrived = threading.Event()

    def on_result(message: Message) -> None:
        if message.correlation is not None:
            results[message.correlation] = time.perf_counter()
            arrived.set()

    for site in sites:
        client.subscribe(site.topics.filter("node_result"), on_result)
    client.sync()
    times: list[list[float]] = [[] for _ in sites]
    for _ in range(pairs):
        order = list(enumerate(sites))
        random.shuffle(order)  # neither side always goes first
        for side, site in order:
            correlation = f"{site.topics.prefix}-{time.monotonic_ns()}".encode()
            arrived.clear()
            started = time.perf_counter()
            node = random.choice(site.named)
            client.publish(site.topics.build("node_set", node), '{"name": "x"}', correlation=correlation)
            deadline = time.monotonic() + 10
            while correlation not in results:
                if not arrived.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("a command got no result within 10 s")
                arrived.clear()
            times[side].append((results.pop(correlation) - started) * 1000)
    for site in sites:
        client.unsubscribe(site.topics.filter("node_result"))
    return times


def p99_ratio_interval(polled: list[float], baseline: list[float], draws: int = 2000) -> tuple[float, float]:
    """The 95 % bootstrap interval of p99(polled) / p99(baseline), resampling the pairs together."""
    pairs = len(polled)
    ratios = []
    for _ in range(draws):
        picks = [random.randrange(pairs) for _ in range(pairs)]
        ratios.append(percentile([polled[i] for i in picks], 0.99) / percentile([baseline[i] for i in picks], 0.99))
    return percentile(ratios, 0.025), percentile(ratios, 0.975)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, help="commands to each side per round (default 20 000)")
    parser.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS), help="plans to compare")
    args = parser.parse_args()
    plans = {name: PLANS[name] for name in args.plans}
    nodes = 200 if args.quick else 1000
    pairs = args.pairs or (300 if args.quick else 20_000)
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        broker = BrokerProcess(workdir / "broker", [free_port()])
        broker.start()
        sites = [Site(broker, workdir, "pa", "127.0.0.2", nodes), Site(broker, workdir, "pb", "127.0.64.2", nodes)]
        client = Bus(broker.url, sites[0].topics, "bench-polling")
        for site in sites:
            client.subscribe(
                site.topics.build("bridge_stats"),
                lambda m, site=site: site.stats.append(BridgeStats.from_payload(m.payload)),
            )
        client.start()
        client.wait_connected(10)
        polled: dict[str, list[float]] = {name: [] for name in plans}
        baseline: dict[str, list[float]] = {name: [] for name in plans}
        reads: dict[str, int] = {name: 0 for name in plans}
        try:
            for site in sites:
                site.start_emulator()
            for name, plan in plans.items():
                for polling in range(len(sites)):  # each site polls once
                    for index, site in enumerate(sites):
                        site.stats.clear()
                        site.start_bridge(plan if index == polling else "off")
                    wait_online(client, sites)
                    # A node's first read falls anywhere in its interval: the load is steady after one.
                    settle = max((p.interval for p in parse_poll_plans(plan).values()), default=0) + 5
                    time.sleep(5 if args.quick else settle)  # a load to be under, not an event to wait for
                    before = sites[polling].reads()
                    times = measure(client, sites, pairs)
                    reads[name] += sites[polling].reads() - before
                    polled[name] += times[polling]
                    baseline[name] += times[1 - polling]
                    for site in sites:
                        stop(site.bridge)
                    print(f"{name}: polled by {sites[polling].topics.prefix} done", flush=True)
        finally:
            for site in sites:
                stop(site.emulator)
            client.stop()
            broker.stop()
    print(f"\n{nodes} nodes a bridge, {pairs} commands to each bridge a round, 2 rounds a plan (roles swapped)")
    columns = ("reads", 7), ("p50 off", 8), ("p50 on", 7), ("p99 off", 8), ("p99 on", 7), ("p99 ratio", 10)
    print(f"{'polling':>12} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  95 %")
    for name in plans:
        on, off = polled[name], baseline[name]
        low, high = p99_ratio_interval(on, off)
        ratio = percentile(on, 0.99) / percentile(off, 0.99)
        print(
            f"{name:>12} {reads[name]:>7} {percentile(off, 0.5):>8.2f} {percentile(on, 0.5):>7.2f} "
            f"{percentile(off, 0.99):>8.2f} {percentile(on, 0.99):>7.2f} {ratio:>10.2f}  {low:.2f}-{high:.2f}"
            f"  (within 10 %: {'shown' if high < 1.10 else 'not shown'})"
        )


if __name__ == "__main__":
    main()
