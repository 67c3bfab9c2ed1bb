"""Scheduler benchmarks, each against a baseline measured in the same run.

    .venv/bin/python bench/bench_scheduler.py            # 10 000 time automations, 1 000 triggers
    .venv/bin/python bench/bench_scheduler.py --quick    # smaller counts

1. time: N `every 60 s` automations spread over the minute (N/60 fires a second) run by a
   `manage.py scheduler` process on SQLite: lateness of each fire (fired_at - due_at, from the
   fire rows), against a bare loop that only sleeps until each of the same due times.
2. idle: the same process with N automations due in an hour: CPU and memory over 20 s, against
   a bare `python -c` interpreter's memory; then N presence automations `for` an hour, each node
   offline, so N waits pending: CPU against the time triggers'.
3. triggers: M value automations on M nodes, readings published at R a second (one in ten
   a threshold crossing, the next one of that node re-arming it): crossing published -> its run
   request at a subscriber, against the same readings messages' own trip to a plain subscriber.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, percentile, wait_for  # noqa: E402
from hacer.automations import AutomationSpec, Every, NodePresence, NodeValue  # noqa: E402
from hacer.bus import Bus, Message  # noqa: E402
from hacer.messages import NodeReadings, Presence, Reading  # noqa: E402
from hacer.models import Automation, AutomationFire, AutomationWait, Database, Node  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def broker_and_database(work: Path, name: str) -> tuple[BrokerProcess, Path, Database]:
    """A fresh broker and SQLite database for one benchmark."""
    broker = BrokerProcess(work / f"broker-{name}", [free_port()])
    broker.start()
    db_path = work / f"{name}.db"
    database = Database(f"sqlite:///{db_path}")
    database.init()
    return broker, db_path, database


def scheduler_process(broker: BrokerProcess, db_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HACER_MQTT_URL": broker.url, "HADB_PATH": str(db_path), "HACER_SCHEDULER_ID": "bench"}
    log = open(db_path.with_suffix(".log"), "ab")
    return subprocess.Popen([sys.executable, str(PROJECT / "manage.py"), "scheduler"], env=env, stdout=log, stderr=log)


def add_time_automations(database: Database, count: int, every: int, first_due: datetime) -> None:
    """`count` automations every `every` s, their first due times spread over one period from `first_due`."""
    with database.session() as session:
        for n in range(count):
            spec = AutomationSpec(f"a{n}", Every(every), "toggle")
            changed = first_due - timedelta(seconds=every) + timedelta(seconds=every * n / count)
            session.add(
                Automation(
                    name=spec.name,
                    definition=spec.to_json().decode(),
                    enabled=True,
                    changed_at=changed.replace(tzinfo=None),
                )
            )
        session.commit()


def bare_lateness(dues: list[float]) -> list[float]:
    """The baseline: a thread that only sleeps until each due time, as lateness in ms."""
    late = []
    wake = threading.Event()
    for due in dues:
        wake.wait(max(0.0, due - time.time()))
        late.append((time.time() - due) * 1000)
    return late


def time_fires(work: Path, count: int, seconds: float) -> None:
    print(f"1. time: {count} automations every 60 s ({count / 60:,.0f} fires/s), for {seconds:g} s")
    broker, db_path, database = broker_and_database(work, "time")
    first_due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    add_time_automations(database, count, 60, first_due)
    process = scheduler_process(broker, db_path)
    try:
        start = first_due.timestamp()
        dues = [start + 60 * n / count for n in range(int(count * seconds / 60))]
        bare = bare_lateness(dues)  # runs meanwhile, in this process: the same machine's load
        wait_for(lambda: fire_count(database) >= len(dues), 120, "the fires")
        with database.session() as session:
            rows = session.query(AutomationFire.due_at, AutomationFire.fired_at).all()
        late = [(fired - due).total_seconds() * 1000 for due, fired in rows]
        print(f"   scheduler: {spread(late)}  ({len(late)} fires)")
        print(f"   bare sleep loop: {spread(bare)}")
        print(f"   goal p99 < 50 ms; ratio p99 scheduler / bare {ratio(late, bare):.1f}")
    finally:
        process.terminate()
        process.wait(20)
        broker.stop()


def spread(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):6.2f} ms  p99 {percentile(values, 0.99):6.2f} ms"


def ratio(values: list[float], baseline: list[float]) -> float:
    return percentile(values, 0.99) / max(percentile(baseline, 0.99), 0.01)


def fire_count(database: Database) -> int:
    with database.session() as session:
        return session.query(AutomationFire).count()


def idle(work: Path, count: int) -> None:
    print(f"2. idle: {count} automations, none due for an hour, for 20 s; then {count} `for` waits pending")
    broker, db_path, database = broker_and_database(work, "idle")
    add_time_automations(database, count, 3600, datetime.now(UTC) + timedelta(hours=1))
    try:
        timed, rss = idle_cpu(broker, db_path, lambda: True)
    finally:
        broker.stop()
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    time.sleep(1)
    bare_rss = rss_mb(bare.pid)
    bare.wait()
    print(f"   time triggers: scheduler CPU {100 * timed / 20:.1f} % of a core, memory {rss:.1f} MB")
    print(f"   bare interpreter memory {bare_rss:.1f} MB")

    broker, db_path, database = broker_and_database(work, "waits")
    went = datetime.now(UTC).replace(microsecond=0)
    with database.session() as session:
        for n in range(count):
            spec = AutomationSpec(f"w{n}", NodePresence(10_000 + n, "offline", 3600), "toggle")
            session.add(Automation(name=spec.name, definition=spec.to_json().decode(), enabled=True,
                                   changed_at=(went - timedelta(minutes=1)).replace(tzinfo=None)))  # fmt: skip
        session.commit()
    bus = Bus(broker.url, Topics(), "bench-presence")
    bus.start()
    bus.wait_connected(10)
    for n in range(count):  # each node offline, retained as the bridge leaves it: a wait each, due in an hour
        presence = Presence(10_000 + n, "toggle", "10.0.0.1", "offline", went, went)
        bus.publish(f"hacer/nodes/{10_000 + n}/presence", presence.to_payload(), retain=True)
    bus.sync(60)
    bus.stop()
    try:
        waiting, rss = idle_cpu(broker, db_path, lambda: wait_count(database) == count)
    finally:
        broker.stop()
    print(f"   {count} waits pending: scheduler CPU {100 * waiting / 20:.1f} % of a core, memory {rss:.1f} MB")
    print(f"   ratio CPU waits / time triggers {waiting / max(timed, 0.01):.2f}")


def wait_count(database: Database) -> int:
    with database.session() as session:
        return session.query(AutomationWait).count()


def idle_cpu(broker: BrokerProcess, db_path: Path, ready: Callable[[], bool]) -> tuple[float, float]:
    """A scheduler's CPU seconds over 20 s once `ready`, and its memory."""
    process = scheduler_process(broker, db_path)
    try:
        wait_for(ready, 120, "the scheduler's start")
        time.sleep(5)  # start-up and the first plan
        before = cpu_seconds(process.pid)
        time.sleep(20)
        return cpu_seconds(process.pid) - before, rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(20)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def triggers(work: Path, nodes: int, rate: int, seconds: float) -> None:
    print(f"3. triggers: {nodes} value automations on {nodes} nodes, {rate} readings/s for {seconds:g} s")
    broker, db_path, database = broker_and_database(work, "triggers")
    topics = Topics()
    with database.session() as session:
        for n in range(nodes):
            session.add(Node(id=n + 1, name=None, type_id=1, ip="127.0.0.1"))
            spec = AutomationSpec(f"t{n}", NodeValue(n + 1, "v", below=50), "toggle", mode="parallel")
            session.add(
                Automation(
                    name=spec.name,
                    definition=spec.to_json().decode(),
                    enabled=True,
                    changed_at=datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=5),
                )
            )
        session.commit()
    sent: dict[int, float] = {}  # node -> when its last crossing was published
    requested: list[float] = []
    plain: list[float] = []
    publisher = Bus(broker.url, topics, "bench-nodes")
    watcher = Bus(broker.url, topics, "bench-watch")

    def on_request(message: Message) -> None:
        node = int(json.loads(message.payload)["run_id"].split("-")[1])  # auto-<automation id>-...
        if node in sent:
            requested.append((time.perf_counter() - sent.pop(node)) * 1000)

    def on_readings(message: Message) -> None:
        stamp = json.loads(message.payload)["values"].get("t")
        if stamp:
            plain.append((time.perf_counter() - stamp["value"] / 1e6) * 1000)

    def readings(node: int, **values: int) -> bytes:  # as the bridge publishes a node's values
        at = datetime.now(UTC)
        return NodeReadings(node, {key: Reading(value, at) for key, value in values.items()}, True, at).to_payload()

    watcher.subscribe(topics.build("run_request"), on_request)
    watcher.subscribe(topics.filter("node_readings"), on_readings)
    for bus in (publisher, watcher):
        bus.start()
        bus.wait_connected(10)
    process = scheduler_process(broker, db_path)
    try:
        for n in range(nodes):  # every node above the threshold first: armed
            publisher.publish(topics.build("node_readings", n + 1), readings(n + 1, v=60), retain=True)
        time.sleep(5)  # the scheduler's first plan and first sight of every node
        total, started = int(rate * seconds), time.perf_counter()
        for i in range(total):
            node = i % nodes + 1
            crossing = (i // nodes + node) % 10 == 9  # each node every tenth of its messages, spread over nodes
            value = 40 if crossing else 60
            if crossing:
                sent[node] = time.perf_counter()
            body = readings(node, v=value, t=int(time.perf_counter() * 1e6))  # node values are integers or strings
            publisher.publish(topics.build("node_readings", node), body, retain=True)
            time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
        time.sleep(2)
        print(f"   crossing -> run request: {spread(requested)}  ({len(requested)} of {total // 10} crossings)")
        print(f"   readings message -> plain subscriber: {spread(plain)}")
        print(f"   goal p99 < 20 ms; ratio p99 {ratio(requested, plain):.1f}")
    finally:
        process.terminate()
        process.wait(20)
        publisher.stop()
        watcher.stop()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("time", "idle", "triggers"))
    args = parser.parse_args()
    count, seconds = (2_000, 30.0) if args.quick else (10_000, 60.0)
    nodes, rate, trigger_seconds = (200, 500, 10.0) if args.quick else (1_000, 1_000, 20.0)
    with tempfile.TemporaryDirectory(prefix="hacer-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "time"):
            time_fires(work, count, seconds)
        if args.only in (None, "idle"):
            idle(work, count)
        if args.only in (None, "triggers"):
            triggers(work, nodes, rate, trigger_seconds)


if __name__ == "__main__":
    main()
