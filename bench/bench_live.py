"""Live events as browsers meet them: beacon -> websocket event, events and bytes per change.

    .venv/bin/python bench/bench_live.py                  # both scenarios, about 1 minute
    .venv/bin/python bench/bench_live.py --clients 50     # one scenario
    .venv/bin/python bench/bench_live.py --one-core       # the server on one core, the clients on the other
    .venv/bin/python bench/bench_live.py --split          # the bridge and the api (eventlet) each a process

A bridge and an api in one process, as runserver has them (`manage.py parts bridge api`; `--split`:
`manage.py bridge` and `manage.py api` on eventlet), on their own mosquitto. Clients are
python-socketio `AsyncClient`s on the websocket transport, 50 to a process, one asyncio loop a
process (the library a script or a test would use; heavier than a raw socket, lighter than a
phone's browser). 40 new emulated nodes (serving the 2015 protocol, so the bridge reads their
values) beacon 20 a second; the latency is from each beacon to the first event naming that node,
at every client. Each client counts the events and payload bytes naming those nodes, and the
changes among them (an event whose node differs from that node's previous event: the node
appears, its values are read): events per change above 1 are events that told a client nothing
new. The clients' CPU (user + system, all client processes) is printed beside the figures:
on 2 cores, the harness competes with the server it measures.

Scenarios (the issue's): 50 clients; 200 clients in 4 processes while 4 threads poll
`GET /api/nodes` with 1 000 nodes in the database. Baseline in the same run: the same beacon ->
retained presence at a plain MQTT subscriber. Goal: beacon -> event p99 < 20 ms in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import socketio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HARNESS_CORE, SERVER_CORE, free_port, one_core_prefix, percentile, wait_for  # noqa: E402
from emulator.nodes import Emulator, make_nodes  # noqa: E402
from hacer.bus import Bus  # noqa: E402
from hacer.models import Database, Node  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess, port_answers  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
CLIENTS_PER_PROCESS = 50
NEW_NODES, BEACONS_PER_SECOND = 40, 20
GOAL_P99_MS = 20.0


@dataclass
class LiveFigures:
    """One scenario's outcome."""

    clients: int
    p50_ms: float
    p99_ms: float
    mqtt_p50_ms: float
    events_per_node: float
    events_per_change: float
    bytes_per_change: float
    client_cpu_s: float
    wall_s: float


def client_process(url: str, count: int, node_ids: list[int], ready: Any, results: Any, core: int | None) -> None:
    """`count` AsyncClients on one loop; report (first arrivals per node, events, bytes, changes, cpu)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    results.put(asyncio.run(_clients(url, count, set(node_ids), ready)))


async def _clients(url: str, count: int, watched: set[int], ready: Any) -> tuple[dict, int, int, int, float]:
    arrivals: dict[int, list[float]] = {node_id: [] for node_id in watched}
    counted = {"events": 0, "bytes": 0, "changes": 0}
    done = asyncio.Event()
    complete = [0]

    def make_client() -> socketio.AsyncClient:
        client = socketio.AsyncClient(reconnection=False)
        seen: set[int] = set()
        shown: dict[int, Any] = {}

        @client.on("event")
        async def on_event(event: dict) -> None:
            now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            data = event.get("data") or {}
            node_id = data.get("id") if event.get("kind") in ("node", "node_removed") else None
            if node_id not in watched:
                return
            counted["events"] += 1
            counted["bytes"] += len(json.dumps(["event", event], separators=(",", ":"))) + 2  # "42" prefix
            if shown.get(node_id) != (event["kind"], data):
                shown[node_id] = (event["kind"], data)
                counted["changes"] += 1
            if node_id not in seen:
                seen.add(node_id)
                arrivals[node_id].append(now)
                if len(seen) == len(watched):
                    complete[0] += 1
                    if complete[0] == count:
                        done.set()

        return client

    clients = [make_client() for _ in range(count)]
    await asyncio.gather(*(c.connect(url, transports=["websocket"], wait_timeout=20) for c in clients))
    ready.put(count)
    start = resource.getrusage(resource.RUSAGE_SELF)
    try:
        await asyncio.wait_for(done.wait(), 120)
        await asyncio.sleep(1.0)  # events a change makes after its first (values, readings) arrive
    finally:
        used = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
    cpu = used.ru_utime - start.ru_utime + used.ru_stime - start.ru_stime
    return arrivals, counted["events"], counted["bytes"], counted["changes"], cpu


def poll_nodes(url: str, stop: threading.Event, counts: list[int]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            session.get(f"{url}/api/nodes", timeout=30).raise_for_status()
            counts.append(1)


def scenario(
    url: str,
    broker: BrokerProcess,
    discovery_port: int,
    clients: int,
    pollers: int,
    wait_between: float,
    one_core: bool = False,
) -> LiveFigures:
    """Beacon NEW_NODES new ids at BEACONS_PER_SECOND to `clients` AsyncClients; measure at each."""
    base = 600_000_000 + uuid.uuid4().int % 100_000 * 1000
    nodes = make_nodes(NEW_NODES, ["toggle", "thermostat", "light_rgb"], base_id=base)
    for node in nodes:
        node.silent = True  # they answer; the beacons are sent below, on time
    emulator = Emulator(nodes, ("127.0.0.1", discovery_port))
    emulator.start()
    node_ids = [node.id for node in nodes]
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    processes = []
    for offset in range(0, clients, CLIENTS_PER_PROCESS):
        count = min(CLIENTS_PER_PROCESS, clients - offset)
        core = HARNESS_CORE if one_core else None
        process = context.Process(target=client_process, args=(url, count, node_ids, ready, results, core))
        process.start()
        processes.append(process)
    for _ in processes:
        ready.get(timeout=120)
    topics = Topics("hacer")
    mqtt_arrivals: dict[int, float] = {}
    watcher = Bus(broker.url, topics, f"bench-live-{uuid.uuid4().hex[:6]}")
    watcher.subscribe(
        topics.filter("node_presence"),
        lambda m: mqtt_arrivals.setdefault(json.loads(m.payload)["id"], time.perf_counter()),
    )
    watcher.start()
    watcher.wait_connected(10)
    stop, polls = threading.Event(), []
    threads = [threading.Thread(target=poll_nodes, args=(url, stop, polls), daemon=True) for _ in range(pollers)]
    for thread in threads:
        thread.start()
    time.sleep(wait_between)  # pollers under way
    sockets = []
    for node in nodes:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((node.ip, 0))
        sockets.append(sock)
    sent: dict[int, float] = {}
    began = time.perf_counter()
    for index, (node, sock) in enumerate(zip(nodes, sockets, strict=True)):
        due = began + index / BEACONS_PER_SECOND
        time.sleep(max(0.0, due - time.perf_counter()))
        sent[node.id] = time.perf_counter()
        sock.sendto(node.beacon(), ("127.0.0.1", discovery_port))
    outcomes = [results.get(timeout=180) for _ in processes]
    wall = time.perf_counter() - began
    stop.set()
    for thread in threads:
        thread.join(30)
    for process in processes:
        process.join(30)
    watcher.stop()
    emulator.stop()
    for sock in sockets:
        sock.close()
    latencies = [
        (arrived - sent[node_id]) * 1000
        for arrivals, *_ in outcomes
        for node_id, times in arrivals.items()
        for arrived in times
    ]
    mqtt_ms = [(mqtt_arrivals[n] - sent[n]) * 1000 for n in node_ids if n in mqtt_arrivals]
    events, changes = sum(o[1] for o in outcomes), sum(o[3] for o in outcomes)
    return LiveFigures(
        clients=clients,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        mqtt_p50_ms=percentile(mqtt_ms, 0.5),
        events_per_node=events / (clients * NEW_NODES),
        events_per_change=events / changes,
        bytes_per_change=sum(o[2] for o in outcomes) / changes,
        client_cpu_s=sum(o[4] for o in outcomes),
        wall_s=wall,
    )


class LiveServer:
    """A mosquitto, a bridge and an api in a folder of their own."""

    def __init__(self, work: Path, nodes_in_database: int, one_core: bool = False, split: bool = False) -> None:
        self.work = work
        self.one_core = one_core
        # Each part a process (the api on eventlet), or in one process as runserver's default layout has them.
        self.commands = [["bridge"], ["api"]] if split else [["parts", "bridge", "api"]]
        self.broker = BrokerProcess(work / "broker", [free_port()])
        self.http_port = free_port()
        self.discovery_port = free_port(socket.SOCK_DGRAM)
        self.env = {
            **os.environ,
            "HADB_PATH": str(work / "hacer.db"),
            "HACER_HTTP_PORT": str(self.http_port),
            "HACER_DISCOVERY_HOST": "127.0.0.1",
            "HACER_DISCOVERY_PORT": str(self.discovery_port),
            "HACER_STATE_DIR": str(work / "state"),
            # The clients all come from 127.0.0.1; 200 browsers would come from 200 addresses.
            "HACER_HTTP_MAX_PER_CLIENT": "1000",
        }
        self.nodes_in_database = nodes_in_database
        self.processes: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> LiveServer:
        self.broker.start()
        if self.one_core and self.broker.process is not None:
            os.sched_setaffinity(self.broker.process.pid, {SERVER_CORE})
        self.env["HACER_MQTT_URL"] = self.broker.url
        database = Database(f"sqlite:///{self.env['HADB_PATH']}")
        database.init()
        with database.session() as session, session.begin():
            session.add_all(Node(id=index + 1, type_id=1) for index in range(self.nodes_in_database))
        database.engine.dispose()
        for command in self.commands:
            self.processes.append(
                subprocess.Popen(
                    [*one_core_prefix(self.one_core), sys.executable, str(PROJECT / "manage.py"), *command],
                    env=self.env,
                    stdout=open(self.work / f"{command[-1]}.log", "ab"),
                    stderr=subprocess.STDOUT,
                )
            )
        wait_for(lambda: port_answers("127.0.0.1", self.http_port), 30, "the api")
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(15)
        self.broker.stop()


def report(figures: LiveFigures, pollers: int) -> None:
    load = f", {pollers} threads polling GET /api/nodes" if pollers else ""
    print(f"{figures.clients} AsyncClients in {-(-figures.clients // CLIENTS_PER_PROCESS)} process(es){load}:")
    print(
        f"   beacon -> event  p50 {figures.p50_ms:6.2f} ms  p99 {figures.p99_ms:6.2f} ms   "
        f"(goal p99 < {GOAL_P99_MS:.0f} ms; plain MQTT subscriber p50 {figures.mqtt_p50_ms:.2f} ms)"
    )
    print(
        f"   each client: {figures.events_per_node:.2f} events per new node, {figures.events_per_change:.2f} per "
        f"change, {figures.bytes_per_change:.0f} bytes per change; clients' CPU {figures.client_cpu_s:.2f} s "
        f"over {figures.wall_s:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, choices=(50, 200), help="one scenario only")
    parser.add_argument("--one-core", action="store_true", help="the server on core 0, the clients on core 1")
    parser.add_argument("--split", action="store_true", help="the bridge and the api (eventlet) each a process")
    args = parser.parse_args()
    if args.one_core:
        os.sched_setaffinity(0, {HARNESS_CORE})
    with tempfile.TemporaryDirectory(prefix="hacer-bench-live-") as tmp:
        with LiveServer(Path(os.environ.get("HACER_BENCH_DIR") or tmp), 1000, args.one_core, args.split) as server:
            for clients, pollers in ((50, 0), (200, 4)):
                if args.clients in (None, clients):
                    figures = scenario(
                        server.url, server.broker, server.discovery_port, clients, pollers, 1.0, args.one_core
                    )
                    report(figures, pollers)


if __name__ == "__main__":
    main()
