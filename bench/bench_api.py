"""Api benchmarks, each printed against a baseline measured in the same run.

    .venv/bin/python bench/bench_api.py            # about 2 minutes
    .venv/bin/python bench/bench_api.py --quick

1. beacon -> websocket event at 200 connected clients, p50/p99 (goal p99 < 20 ms), against the
   same beacon -> retained presence at a plain MQTT subscriber. The 200 clients are raw websocket
   connections on one asyncio loop in their own process, stamping each frame as it is read: 200
   browsers would be on other machines, so their cost should not be the server's. One client of
   the python-socketio library checks that a real client sees the same.
2. GET /api/nodes with 10 000 nodes (goal p50 < 50 ms), against GET /api/node_types on the
   same server (the cost of a request that reads next to nothing).
3. recorder throughput: log entries written per second with none lost (goal >= 5 000/s on
   SQLite), against what the same broker delivers to mosquitto_sub on a durable QoS 1 session,
   for the project's broker (saving every second) and for one that saves on every change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import socketio
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import broker_saving_on_every_change, free_port, percentile, wait_for  # noqa: E402
from hacer.bus import Bus  # noqa: E402
from hacer.messages import LogEntry, RunStatus, bus_time  # noqa: E402
from hacer.models import Database, Node  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess, port_answers  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("websocket", "nodes", "recorder"), help="run one benchmark")
    args = parser.parse_args()
    clients_count, samples = (50, 30) if args.quick else (200, 100)
    node_count, entries_count = (2_000, 10_000) if args.quick else (10_000, 50_000)

    with tempfile.TemporaryDirectory(prefix="hacer-bench-") as tmp:
        work = Path(os.environ.get("HACER_BENCH_DIR") or tmp)
        broker = BrokerProcess(work / "broker", [free_port()])
        broker.start()
        env = {
            **os.environ,
            "HACER_MQTT_URL": broker.url,
            "HADB_PATH": str(work / "hacer.db"),
            "HACER_HTTP_PORT": str(free_port()),
            "HACER_DISCOVERY_HOST": "127.0.0.1",
            "HACER_DISCOVERY_PORT": str(free_port(socket.SOCK_DGRAM)),
            "HACER_STATE_DIR": str(work / "state"),
            "HACER_RECORDER_ID": f"bench-{uuid.uuid4().hex[:6]}",
        }
        url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}"
        processes = [
            subprocess.Popen(
                [sys.executable, str(PROJECT / "manage.py"), part],
                env=env,
                stdout=open(work / f"{part}.log", "ab"),
                stderr=subprocess.STDOUT,
            )
            for part in ("bridge", "api")
        ]
        topics = Topics("hacer")
        try:
            wait_for(lambda: port_answers("127.0.0.1", int(env["HACER_HTTP_PORT"])), 30, "the api")
            if args.only in (None, "websocket"):
                beacon_to_websocket(url, broker, env, topics, clients_count, samples)
            if args.only in (None, "nodes"):
                nodes_endpoint(url, work, node_count)
            if args.only in (None, "recorder"):
                recorder_throughput(work, topics, entries_count)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(15)
            broker.stop()


def client_process(port: int, count: int, ready, arrivals, stop) -> None:
    """`count` websocket clients on one asyncio loop; for each node seen online by all of them,
    report (node id, arrival time of each client)."""
    asyncio.run(_clients(port, count, ready, arrivals, stop))


async def _clients(port: int, count: int, ready, arrivals, stop) -> None:
    # Raw Engine.IO/Socket.IO v4 over the `websockets` library: a frame is stamped as soon as it
    # is read, so what is measured is the server's delivery, not a client library's dispatch
    # (200 browsers would run on 200 machines, not on the server's two cores).
    seen: dict[int, list[float]] = {}
    url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"

    async def client() -> None:
        async with websockets.connect(url, compression=None, max_size=None) as ws:
            await ws.recv()  # Engine.IO open
            await ws.send("40")  # Socket.IO connect to "/"
            connected.append(ws)
            reported: set[int] = set()  # a node's first online event only (a rename would follow)
            async for frame in ws:
                now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
                if frame == "2":
                    await ws.send("3")  # Engine.IO ping -> pong
                elif frame.startswith('42["event"'):
                    event = json.loads(frame[2:])[1]
                    node_id = event["data"].get("id")
                    if event["kind"] == "node" and event["data"].get("state") == "online" and node_id not in reported:
                        reported.add(node_id)
                        times = seen.setdefault(node_id, [])
                        times.append(now)
                        if len(times) == count:
                            arrivals.put((node_id, times))

    connected: list = []
    tasks = [asyncio.create_task(client()) for _ in range(count)]
    while len(connected) < count:
        await asyncio.sleep(0.05)
    ready.put(count)
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for ws in connected:
        await ws.close()
    await asyncio.gather(*tasks, return_exceptions=True)


def beacon_to_websocket(
    url: str, broker: BrokerProcess, env: dict[str, str], topics: Topics, clients_count: int, samples: int
) -> None:
    print(f"1. beacon -> event, {clients_count} websocket clients in one asyncio process, {samples} new nodes")
    context = multiprocessing.get_context("spawn")
    ready, arrivals, stop = context.Queue(), context.Queue(), context.Event()
    worker = context.Process(
        target=client_process, args=(int(env["HACER_HTTP_PORT"]), clients_count, ready, arrivals, stop)
    )
    worker.start()
    ready.get(timeout=60)
    # One more client in this process: the python-socketio client library, as an application
    # would use it, to check the raw clients see what a real client sees.
    probe_arrivals: dict[int, float] = {}
    probe = socketio.Client(reconnection=False)
    probe.on(
        "event",
        lambda e: (
            e.get("kind") == "node"
            and e["data"].get("state") == "online"
            and probe_arrivals.setdefault(e["data"]["id"], time.perf_counter())
        ),
    )
    probe.connect(url, transports=["websocket"], wait_timeout=10)
    mqtt_arrivals: dict[int, float] = {}
    watcher = Bus(broker.url, topics, "bench-mqtt-watch")
    watcher.subscribe(
        topics.filter("node_presence"),
        lambda m: mqtt_arrivals.setdefault(json.loads(m.payload)["id"], time.perf_counter()),
    )
    watcher.start()
    watcher.wait_connected(10)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.2", 0))
    target = ("127.0.0.1", int(env["HACER_DISCOVERY_PORT"]))
    websocket_ms, mqtt_ms, probe_ms = [], [], []
    base = 500_000_000 + uuid.uuid4().int % 1000 * 1000
    for index in range(samples):
        node_id = base + index
        sent = time.perf_counter()
        sock.sendto(json.dumps({"id": node_id, "type": "toggle"}).encode(), target)
        arrived_id, times = arrivals.get(timeout=10)
        assert arrived_id == node_id and len(times) == clients_count
        websocket_ms.extend((arrived - sent) * 1000 for arrived in times)
        wait_for(lambda n=node_id: n in mqtt_arrivals and n in probe_arrivals, 10, "the probes")
        mqtt_ms.append((mqtt_arrivals[node_id] - sent) * 1000)
        probe_ms.append((probe_arrivals[node_id] - sent) * 1000)
        time.sleep(0.01)  # a beacon every 10 ms, not a burst: this measures latency, not throughput
    stop.set()
    worker.join(30)
    probe.disconnect()
    watcher.stop()
    print(
        f"   plain MQTT subscriber:   p50 {percentile(mqtt_ms, 0.5):6.2f} ms  p99 {percentile(mqtt_ms, 0.99):6.2f} ms"
    )
    print(
        f"   python-socketio client:  p50 {percentile(probe_ms, 0.5):6.2f} ms  p99 {percentile(probe_ms, 0.99):6.2f} ms"
    )
    print(
        f"   every client:            p50 {percentile(websocket_ms, 0.5):6.2f} ms  "
        f"p99 {percentile(websocket_ms, 0.99):6.2f} ms   (goal p99 < 20 ms)"
    )
    print(f"   ratio every client / MQTT at p50: {percentile(websocket_ms, 0.5) / percentile(mqtt_ms, 0.5):.1f}x")


def nodes_endpoint(url: str, work: Path, node_count: int) -> None:
    print(f"2. GET /api/nodes with {node_count} nodes")
    database = Database(f"sqlite:///{work / 'hacer.db'}")
    with database.session() as session:
        session.add_all(
            Node(id=1_000_000 + i, name=f"node {i}", type_id=1, ip=f"10.0.{i // 250}.{i % 250}")
            for i in range(node_count)
        )
        session.commit()
    http = requests.Session()
    for path in ("/api/nodes", "/api/node_types"):
        http.get(url + path)  # warm up
    nodes_ms, small_ms = [], []
    for _ in range(30):  # request to last byte received; the client's JSON parsing is not the server's
        started = time.perf_counter()
        raw = http.get(url + "/api/nodes").content
        nodes_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        http.get(url + "/api/node_types").raise_for_status()
        small_ms.append((time.perf_counter() - started) * 1000)
    assert len(json.loads(raw)["node_list"]) >= node_count
    print(f"   GET /api/node_types:     p50 {statistics.median(small_ms):6.2f} ms")
    print(
        f"   GET /api/nodes:          p50 {statistics.median(nodes_ms):6.2f} ms"
        f"  p99 {percentile(nodes_ms, 0.99):6.2f} ms   (goal p50 < 50 ms)"
    )


def recorder_throughput(work: Path, topics: Topics, count: int) -> None:
    print(f"3. recorder: {count} log entries of 100 runs, published as a runner does, to a recorder alone")
    print(f"   bare executemany into SQLite: {bare_executemany(work, count):10,.0f} rows/s")
    for label, config in (
        ("project broker (saves every second)", PROJECT / "mosquitto" / "dev.conf"),
        ("broker saving on every change", broker_saving_on_every_change(work)),
    ):
        print(f"   {label}:")
        results = []
        for measure in (mosquitto_sub_rate, feed_a_recorder):  # a fresh broker each: no session left over
            broker = BrokerProcess(work / f"broker-{config.stem}-{measure.__name__}", [free_port()], template=config)
            broker.start()
            try:
                results.append(measure(broker, work / f"{config.stem}-{measure.__name__}", topics, count))
            finally:
                broker.stop()
        bare, (rate, lost) = results
        print(f"     mosquitto_sub, durable QoS 1:  {bare:8,.0f} entries/s   (what the broker delivers)")
        print(
            f"     recorder:                     {rate:8,.0f} entries/s, lost {lost}   (goal >= 5 000/s)"
            f"   ratio {rate / bare:.2f}"
        )


def publish_entries(bus: Bus, topics: Topics, runs: list[str], count: int) -> None:
    """`count` entries of `runs`, interleaved as concurrent runs log."""
    for seq in range(1, count // len(runs) + 1):
        for run_id in runs:
            bus.publish(
                topics.build("run_log", run_id),
                LogEntry(run_id, seq, bus_time(time.time()), "output", f"line {seq}").to_payload(),
            )


def mosquitto_sub_rate(broker: BrokerProcess, out: Path, topics: Topics, count: int) -> float:
    """Baseline: mosquitto's own C client on a durable QoS 1 session, as the recorder subscribes."""
    host, port = broker.url.rsplit("//", 1)[1].split(":")
    ready_topic = topics.build("run_log", "bench-ready")
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            host,
            "-p",
            port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-c",
            "-x",
            "600",
            "-i",
            f"bench-sub-{uuid.uuid4().hex[:6]}",
            "-t",
            topics.filter("run_log"),
            "-F",
            "x",
        ],
        stdout=open(out, "wb"),
    )
    bus = Bus(broker.url, topics, "bench-sub-feed")
    bus.start()
    bus.wait_connected(10)
    try:

        def subscribed() -> bool:  # one "x\n" a message
            bus.publish(ready_topic, b"{}")
            time.sleep(0.1)
            return out.stat().st_size > 0

        wait_for(subscribed, 30, "mosquitto_sub")
        time.sleep(0.3)  # ready markers still on their way
        before = out.stat().st_size // 2
        started = time.perf_counter()
        publish_entries(bus, topics, [uuid.uuid4().hex for _ in range(100)], count)
        wait_for(lambda: out.stat().st_size // 2 >= before + count, 300, "mosquitto_sub to get every entry")
        return count / (time.perf_counter() - started)
    finally:
        bus.stop()
        sub.terminate()
        sub.wait(10)


def bare_executemany(work: Path, count: int) -> float:
    """Baseline: the same rows straight into a table of the same shape, one executemany."""
    bare = sqlite3.connect(work / "bare.db")
    bare.execute("PRAGMA journal_mode=WAL")
    bare.execute(
        "CREATE TABLE e (id INTEGER PRIMARY KEY, timestamp TEXT, thread_id INT, seq INT, script_name TEXT,"
        " params TEXT, entry_type_id INT, data TEXT, UNIQUE (thread_id, seq))"
    )
    rows = [
        (str(time.time()), t, s, "bench", "[]", 2, f"line {s}") for t in range(100) for s in range(1, count // 100 + 1)
    ]
    started = time.perf_counter()
    bare.executemany(
        "INSERT INTO e (timestamp, thread_id, seq, script_name, params, entry_type_id, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    bare.commit()
    return len(rows) / (time.perf_counter() - started)


def feed_a_recorder(broker: BrokerProcess, path: Path, topics: Topics, count: int) -> tuple[float, int]:
    """Start a recorder on `broker`, publish `count` entries, return (entries/s, lost)."""
    db_path = path.with_suffix(".db")
    env = {
        **os.environ,
        "HACER_MQTT_URL": broker.url,
        "HADB_PATH": str(db_path),
        "HACER_RECORDER_ID": f"bench-{uuid.uuid4().hex[:6]}",
    }
    recorder = subprocess.Popen(
        [sys.executable, str(PROJECT / "manage.py"), "recorder"],
        env=env,
        stdout=open(db_path.with_suffix(".log"), "ab"),
        stderr=subprocess.STDOUT,
    )
    bus = Bus(broker.url, topics, "bench-recorder-feed")
    bus.start()
    bus.wait_connected(10)
    db = sqlite3.connect(db_path)

    def written() -> int:
        try:
            return db.execute("SELECT count(*) FROM script_log_entry").fetchone()[0]
        except sqlite3.OperationalError:  # the recorder has not made the table yet
            return -1

    try:
        wait_for(lambda: written() >= 0, 30, "the recorder's schema")
        runs = [uuid.uuid4().hex for _ in range(100)]

        def runs_recorded() -> bool:
            # Sent until recorded: what is published before the recorder subscribes is not kept.
            for run_id in runs:
                bus.publish(
                    topics.build("run_status", run_id),
                    RunStatus(run_id, "bench", ("node", "p"), "running", "bench").to_payload(),
                )
            time.sleep(0.2)
            return db.execute("SELECT count(*) FROM run").fetchone()[0] >= 100

        wait_for(runs_recorded, 30, "the runs recorded")
        started = time.perf_counter()
        publish_entries(bus, topics, runs, count)
        wait_for(lambda: written() >= count, 300, "every entry written")
        rate = count / (time.perf_counter() - started)
        return rate, count - written()
    finally:
        bus.stop()
        recorder.terminate()
        recorder.wait(15)


if __name__ == "__main__":
    main()
