"""Api benchmarks, each printed against a baseline measured in the same run.

    .venv/bin/python bench/bench_api.py            # about 2 minutes
    .venv/bin/python bench/bench_api.py --quick

1. beacon -> websocket event at 200 connected clients, p50/p99 (goal p99 < 20 ms), against the
   same beacon -> retained presence at a plain MQTT subscriber.
2. GET /api/nodes with 10 000 nodes (goal p50 < 50 ms), against GET /api/node_types on the
   same server (the cost of a request that reads next to nothing).
3. recorder throughput: log entries written per second with none lost (goal >= 5 000/s on
   SQLite), against a bare executemany of the same rows into the same kind of table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
import socketio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hacer.broker import BrokerProcess, port_answers  # noqa: E402
from hacer.bus import Bus  # noqa: E402
from hacer.messages import LogEntry, RunStatus  # noqa: E402
from hacer.models import Database, Node  # noqa: E402
from hacer.topics import Topics  # noqa: E402

from bench.common import broker_saving_every_second, free_port, percentile, wait_for  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    clients_count, samples = (50, 30) if args.quick else (200, 100)
    node_count, entries_count = (2_000, 10_000) if args.quick else (10_000, 50_000)

    with tempfile.TemporaryDirectory(prefix="hacer-bench-") as tmp:
        work = Path(os.environ.get("HACER_BENCH_DIR") or tmp)
        broker = BrokerProcess(work / "broker", [free_port(), free_port()])
        broker.start()
        env = {**os.environ, "HACER_MQTT_URL": broker.url, "HADB_PATH": str(work / "hacer.db"),
               "HACER_HTTP_PORT": str(free_port()), "HACER_DISCOVERY_HOST": "127.0.0.1",
               "HACER_DISCOVERY_PORT": str(free_port(socket.SOCK_DGRAM)), "HACER_STATE_DIR": str(work / "state"),
               "HACER_RECORDER_ID": f"bench-{uuid.uuid4().hex[:6]}"}
        url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}"
        processes = [subprocess.Popen([sys.executable, str(PROJECT / "manage.py"), part], env=env,
                                      stdout=open(work / f"{part}.log", "ab"), stderr=subprocess.STDOUT)
                     for part in ("bridge", "api")]
        topics = Topics("hacer")
        try:
            wait_for(lambda: port_answers("127.0.0.1", int(env["HACER_HTTP_PORT"])), 30, "the api")
            beacon_to_websocket(url, broker, env, topics, clients_count, samples)
            nodes_endpoint(url, work, node_count)
            recorder_throughput(work, topics, entries_count)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(15)
            broker.stop()


def client_process(url: str, count: int, ready, arrivals, stop) -> None:
    """`count` websocket clients in one process; report (node id, arrival time) of online nodes."""
    seen: set[tuple[int, int]] = set()
    lock = threading.Lock()

    def listener(index: int):
        def on_event(event: dict) -> None:
            if event.get("kind") == "node" and event["data"].get("state") == "online":
                now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
                with lock:
                    if (index, event["data"]["id"]) not in seen:
                        seen.add((index, event["data"]["id"]))
                        arrivals.put((event["data"]["id"], now))
        return on_event

    clients = []
    for index in range(count):
        client = socketio.Client(reconnection=False)
        client.on("event", listener(index))
        client.connect(url, transports=["websocket"], wait_timeout=10)
        clients.append(client)
    ready.put(count)
    stop.wait()
    for client in clients:
        client.disconnect()


def beacon_to_websocket(url: str, broker: BrokerProcess, env: dict[str, str], topics: Topics,
                        clients_count: int, samples: int) -> None:
    processes_count = 4
    print(f"1. beacon -> event, {clients_count} websocket clients in {processes_count} processes, "
          f"{samples} new nodes")
    context = multiprocessing.get_context("spawn")
    ready, arrivals, stop = context.Queue(), context.Queue(), context.Event()
    workers = [context.Process(target=client_process, args=(url, clients_count // processes_count, ready, arrivals, stop))
               for _ in range(processes_count)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=60)
    # One more client in this process, alone on its thread: what a single browser sees while the
    # others are connected (their own parsing, in the worker processes, is not the server's).
    probe_arrivals: dict[int, float] = {}
    probe = socketio.Client(reconnection=False)
    probe.on("event", lambda e: e.get("kind") == "node" and e["data"].get("state") == "online"
             and probe_arrivals.setdefault(e["data"]["id"], time.perf_counter()))
    probe.connect(url, transports=["websocket"], wait_timeout=10)
    mqtt_arrivals: dict[int, float] = {}
    watcher = Bus(broker.url, topics, "bench-mqtt-watch")
    watcher.subscribe(topics.filter("node_presence"),
                      lambda m: mqtt_arrivals.setdefault(json.loads(m.payload)["id"], time.perf_counter()))
    watcher.start()
    watcher.wait_connected(10)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.2", 0))
    target = ("127.0.0.1", int(env["HACER_DISCOVERY_PORT"]))
    websocket_ms, mqtt_ms, probe_ms = [], [], []
    base = 500_000_000 + uuid.uuid4().int % 1000 * 1000
    expected = clients_count // processes_count * processes_count
    for index in range(samples):
        node_id = base + index
        sent = time.perf_counter()
        sock.sendto(json.dumps({"id": node_id, "type": "toggle"}).encode(), target)
        for _ in range(expected):
            arrived_id, arrived = arrivals.get(timeout=10)
            assert arrived_id == node_id
            websocket_ms.append((arrived - sent) * 1000)
        wait_for(lambda: node_id in mqtt_arrivals and node_id in probe_arrivals, 10, "the probes")
        mqtt_ms.append((mqtt_arrivals[node_id] - sent) * 1000)
        probe_ms.append((probe_arrivals[node_id] - sent) * 1000)
        time.sleep(0.01)  # a beacon every 10 ms, not a burst: this measures latency, not throughput
    stop.set()
    for worker in workers:
        worker.join(30)
    probe.disconnect()
    watcher.stop()
    print(f"   plain MQTT subscriber:   p50 {percentile(mqtt_ms, 0.5):6.2f} ms  p99 {percentile(mqtt_ms, 0.99):6.2f} ms")
    print(f"   one client among them:   p50 {percentile(probe_ms, 0.5):6.2f} ms  "
          f"p99 {percentile(probe_ms, 0.99):6.2f} ms")
    print(f"   every client:            p50 {percentile(websocket_ms, 0.5):6.2f} ms  "
          f"p99 {percentile(websocket_ms, 0.99):6.2f} ms   (goal p99 < 20 ms)")
    print(f"   ratio every client / MQTT at p50: {percentile(websocket_ms, 0.5) / percentile(mqtt_ms, 0.5):.1f}x")


def nodes_endpoint(url: str, work: Path, node_count: int) -> None:
    print(f"2. GET /api/nodes with {node_count} nodes")
    database = Database(f"sqlite:///{work / 'hacer.db'}")
    with database.session() as session:
        session.add_all(Node(id=1_000_000 + i, name=f"node {i}", type_id=1, ip=f"10.0.{i // 250}.{i % 250}")
                        for i in range(node_count))
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
        http.get(url + "/api/node_types").content
        small_ms.append((time.perf_counter() - started) * 1000)
    assert len(json.loads(raw)["node_list"]) >= node_count
    print(f"   GET /api/node_types:     p50 {statistics.median(small_ms):6.2f} ms")
    print(f"   GET /api/nodes:          p50 {statistics.median(nodes_ms):6.2f} ms  p99 {percentile(nodes_ms, 0.99):6.2f} ms"
          f"   (goal p50 < 50 ms)")


def recorder_throughput(work: Path, topics: Topics, count: int) -> None:
    print(f"3. recorder: {count} log entries of 100 runs, published as runners do, to a recorder alone")
    bare = bare_executemany(work, count)
    print(f"   bare executemany into SQLite: {bare:10,.0f} rows/s")
    for label, config in (("project broker (saves on every change)", PROJECT / "mosquitto" / "dev.conf"),
                          ("broker saving every second", broker_saving_every_second(work))):
        broker = BrokerProcess(work / f"broker-{config.stem}", [free_port(), free_port()], template=config)
        broker.start()
        try:
            rate, lost = feed_a_recorder(broker, work / f"{config.stem}.db", topics, count)
        finally:
            broker.stop()
        print(f"   {label:40} {rate:8,.0f} entries/s, lost {lost}   (goal >= 5 000/s)")


def bare_executemany(work: Path, count: int) -> float:
    """Baseline: the same rows straight into a table of the same shape, one executemany."""
    bare = sqlite3.connect(work / "bare.db")
    bare.execute("PRAGMA journal_mode=WAL")
    bare.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, timestamp TEXT, thread_id INT, seq INT, script_name TEXT,"
                 " params TEXT, entry_type_id INT, data TEXT, UNIQUE (thread_id, seq))")
    rows = [(str(time.time()), t, s, "bench", "[]", 2, f"line {s}") for t in range(100)
            for s in range(1, count // 100 + 1)]
    started = time.perf_counter()
    bare.executemany("INSERT INTO e (timestamp, thread_id, seq, script_name, params, entry_type_id, data)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    bare.commit()
    return len(rows) / (time.perf_counter() - started)


def feed_a_recorder(broker: BrokerProcess, db_path: Path, topics: Topics, count: int) -> tuple[float, int]:
    """Start a recorder on `broker`, publish `count` entries, return (entries/s, lost)."""
    env = {**os.environ, "HACER_MQTT_URL": broker.url, "HADB_PATH": str(db_path),
           "HACER_RECORDER_ID": f"bench-{uuid.uuid4().hex[:6]}"}
    recorder = subprocess.Popen([sys.executable, str(PROJECT / "manage.py"), "recorder"], env=env,
                                stdout=open(db_path.with_suffix(".log"), "ab"), stderr=subprocess.STDOUT)
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
                bus.publish(topics.build("run_status", run_id),
                            RunStatus(run_id, "bench", ("node", "p"), "running", "bench").to_payload())
            time.sleep(0.2)
            return db.execute("SELECT count(*) FROM run").fetchone()[0] >= 100

        wait_for(runs_recorded, 30, "the runs recorded")
        started = time.perf_counter()
        for seq in range(1, count // len(runs) + 1):
            for run_id in runs:
                bus.publish(topics.build("run_log", run_id),
                            LogEntry(run_id, seq, time.time(), "output", f"line {seq}").to_payload())
        wait_for(lambda: written() >= count, 300, "every entry written")
        rate = count / (time.perf_counter() - started)
        return rate, count - written()
    finally:
        bus.stop()
        recorder.terminate()
        recorder.wait(15)


if __name__ == "__main__":
    main()
