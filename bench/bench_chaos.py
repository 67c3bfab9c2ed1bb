"""The long chaos run: runs requested over REST and MQTT while the broker is killed again and again,
a runner and a recorder are killed, on PostgreSQL with two runners and two recorders.

    .venv/bin/python bench/bench_chaos.py                  # 1 000 runs, 20 broker kills: a few minutes
    .venv/bin/python bench/bench_chaos.py --runs 200 --kills 6

Prints how many runs were lost (never recorded finished), started twice, or recorded incomplete
(a finished run whose log has a gap or lacks lines), and the worst time from a request to its
run recorded whole. The short version is tests/system/test_chaos.py.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, wait_for  # noqa: E402
from hacer import runstates  # noqa: E402
from hacer.bus import Bus  # noqa: E402
from hacer.messages import RunRequest  # noqa: E402
from hacer.models import Database, Run, ScriptLogEntry  # noqa: E402
from hacer.parentdeath import child_env  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess, port_answers  # noqa: E402
from scripting.runrequest import request_until_claimed  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("HACER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
LINES = 5
SCRIPT = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
    "os.write(fd, (os.environ['HACER_RUN_ID'] + '\\n').encode())\n"
    f"for i in range({LINES}):\n"
    "    print('line', i, flush=True)\n"
    "    time.sleep(0.05)\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    schema = f"chaos_{uuid.uuid4().hex[:8]}"
    admin = Database(POSTGRES)
    with admin.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        with tempfile.TemporaryDirectory(prefix="hacer-chaos-") as folder:
            run(Path(folder), f"{POSTGRES}?options=-csearch_path%3D{schema}", args.runs, args.kills)
    finally:
        with admin.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def run(work: Path, database_url: str, count: int, kills: int) -> None:
    rng = random.Random()
    (work / "scripts").mkdir()
    (work / "scripts" / "chaos.py").write_text(SCRIPT)
    starts = work / "starts.txt"
    broker = BrokerProcess(work / "broker", [free_port()])
    broker.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))},
        "HACER_MQTT_URL": broker.url,
        "HACER_DATABASE_URL": database_url,
        "HACER_SCRIPTS_DIR": str(work / "scripts"),
        "HACER_RUNNER_TAKEOVER": "3",
        "HACER_RESEND_AFTER": "1",
        "HACER_RESCUE_AFTER": "2",
        "HACER_HTTP_PORT": str(free_port()),
        "HACER_STATE_DIR": str(work / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, part: str, **extra: str) -> None:
        log = open(work / f"{name}.log", "ab")
        processes[name] = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), part],
            env=child_env({**env, **extra}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    for index in (1, 2):
        start(f"runner{index}", "runner", HACER_RUNNER_ID=f"runner{index}")
        start(f"recorder{index}", "recorder", HACER_RECORDER_ID=f"recorder{index}")
    start("api", "api")
    wait_for(lambda: port_answers("127.0.0.1", int(env["HACER_HTTP_PORT"])), 60, "the api")
    url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}/api/scripts/exec/name/chaos"
    bus = Bus(broker.url, Topics(), f"chaos-{uuid.uuid4().hex[:6]}")
    bus.start()
    bus.wait_connected(10)
    requested: dict[str, float] = {}
    lock = threading.Lock()

    def over_rest(index: int) -> None:
        for _ in range(300):
            try:
                answer = requests.post(url, json={"params": [str(starts)]}, timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        with lock:
            requested[answer.json()["run_id"]] = time.monotonic()

    def over_mqtt(index: int) -> None:
        run_id = f"mqtt-{index}-{uuid.uuid4().hex[:6]}"
        with lock:
            requested[run_id] = time.monotonic()
        while request_until_claimed(bus, RunRequest("chaos", (str(starts),), run_id, "chaos"), timeout=30) is None:
            pass

    def kill_the_broker() -> None:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 3.0))
            broker.stop(kill=True)
            time.sleep(rng.uniform(0.3, 2.0))
            broker.start()

    database = Database(database_url)
    whole_at: dict[str, float] = {}
    rows: dict[str, tuple[Run, list[tuple[int, str, str]]]] = {}
    requesting = threading.Event()
    requesting.set()

    def watch() -> None:  # when each run is first seen whole in the database
        nonlocal rows
        deadline = None
        while len(whole_at) < count and (deadline is None or time.monotonic() < deadline):
            rows = read_runs(database)
            now = time.monotonic()
            with lock:
                for run_id in requested:
                    if run_id not in whole_at and run_id in rows and is_whole(*rows[run_id]):
                        whole_at[run_id] = now
            if deadline is None and not requesting.is_set():
                deadline = now + 180
            time.sleep(0.25)

    began = time.monotonic()
    watcher = threading.Thread(target=watch)
    watcher.start()
    killer = threading.Thread(target=kill_the_broker)
    killer.start()
    spacing = kills * 2.8 / count  # requests spread over the kills
    with ThreadPoolExecutor(8) as pool:
        jobs = []
        for index in range(count):
            jobs.append(pool.submit(over_rest if index % 2 else over_mqtt, index))
            time.sleep(spacing)
            if index == count // 3:
                processes["runner1"].send_signal(signal.SIGKILL)
            elif index == 2 * count // 3:
                processes["recorder1"].send_signal(signal.SIGKILL)
                processes["recorder1"].wait()
                start("recorder1", "recorder", HACER_RECORDER_ID="recorder1")
        killer.join()
        for job in jobs:
            job.result()
    requesting.clear()
    print(
        f"{count} runs requested in {time.monotonic() - began:.0f} s across {kills} broker kills, "
        f"a runner kill and a recorder kill"
    )
    watcher.join()
    bus.stop()
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    for process in processes.values():
        process.wait(30)
    broker.stop()
    database.engine.dispose()

    started = starts.read_text().split()
    twice = sum(started.count(run_id) > 1 for run_id in set(started))
    lost = [r for r in requested if r not in rows or rows[r][0].state not in runstates.FINISHED_STATES]
    incomplete = [
        r for r in requested if r in rows and rows[r][0].state in runstates.FINISHED_STATES and not is_whole(*rows[r])
    ]
    killed = sum(rows[r][0].state == runstates.LOST for r in requested if r in rows)
    worst = max((whole_at[r] - requested[r] for r in whole_at), default=float("nan"))
    print(
        f"lost: {len(lost)}   started twice: {twice}   recorded incomplete: {len(incomplete)}   "
        f"ended `lost` with the killed runner: {killed}"
    )
    print(f"worst request -> recorded whole: {worst:.1f} s")
    for run_id in (lost + incomplete)[:10]:
        run, entries = rows.get(run_id, (None, []))
        print(
            f"  {run_id}: {run.state if run else 'no row'}, runner {run.runner if run else '?'}, "
            f"entries {[(seq, kind) for seq, kind, _ in entries]}"
        )


def read_runs(database: Database) -> dict[str, tuple[Run, list[tuple[int, str, str]]]]:
    with database.session() as session:
        runs = {r.run_id: r for r in session.scalars(select(Run))}
        entries: dict[int, list[tuple[int, str, str]]] = {}
        for entry in session.scalars(select(ScriptLogEntry).order_by(ScriptLogEntry.seq)):
            entries.setdefault(entry.thread_id, []).append((entry.seq, entry.entry_type.name, entry.data))
    return {run_id: (run, entries.get(run.id, [])) for run_id, run in runs.items()}


def is_whole(run: Run, entries: list[tuple[int, str, str]]) -> bool:
    """Finished, its seqs without a gap, and (unless lost with its runner) every line and the exit entry."""
    if run.state not in runstates.FINISHED_STATES or [e[0] for e in entries] != list(range(1, len(entries) + 1)):
        return False
    if run.state == runstates.LOST:
        return True
    lines = "\n".join(data for _, kind, data in entries if kind == "output").split("\n")
    return bool(entries) and entries[-1][1] == "exit_status" and lines == [f"line {i}" for i in range(LINES)]


if __name__ == "__main__":
    main()
