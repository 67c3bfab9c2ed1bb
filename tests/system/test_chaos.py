"""Nothing lost, nothing run twice: runs requested over REST and MQTT while the broker, a runner
and the recorder are killed. Real mosquitto, real processes, SQLite; bench/bench_chaos.py is
the long version."""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import select

from hacer import runstates
from hacer.bus import Bus
from hacer.messages import RunRequest
from hacer.models import Database, Run, ScriptLogEntry
from ops.broker import port_answers
from scripting.runrequest import request_until_claimed

from support import free_port, wait_until

LINES = 5
CHAOS_SCRIPT = (  # prints its lines, and notes each start in a file: a run started twice shows there
    "import os, sys, time\n"
    "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
    "os.write(fd, (os.environ['HACER_RUN_ID'] + '\\n').encode())\n"
    f"for i in range({LINES}):\n"
    "    print(sys.argv[1], 'line', i, flush=True)\n"
    "    time.sleep(0.1)\n"
)


def database_runs(url):
    database = Database(url)
    try:
        with database.session() as session:
            runs = {r.run_id: r for r in session.scalars(select(Run))}
            entries: dict[int, list[ScriptLogEntry]] = {}
            for entry in session.scalars(select(ScriptLogEntry).order_by(ScriptLogEntry.seq)):
                entries.setdefault(entry.thread_id, []).append(entry)
            return {
                run_id: (run, [(e.seq, e.entry_type.name, e.data) for e in entries.get(run.id, [])])
                for run_id, run in runs.items()
            }
    finally:
        database.engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_broker_runner_and_recorder_kills_lose_nothing_and_run_nothing_twice(
    broker, spawn, hacer_env, tmp_path, topics, watch
):
    rng = random.Random(int(time.time()))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "chaos.py").write_text(CHAOS_SCRIPT)
    starts = tmp_path / "starts.txt"
    env = {
        **hacer_env,
        "HACER_SCRIPTS_DIR": str(scripts),
        "HACER_RUNNER_TAKEOVER": "3",
        "HACER_RESEND_AFTER": "1",
        "HACER_RESCUE_AFTER": "2",
        "HACER_HTTP_PORT": str(free_port()),
        "HACER_RUNNER_CAPACITY": "4",
        "HACER_RUN_DATA_EVERY": "1",  # the default, not the suite's 0: confirmations a second late
    }
    url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}"
    database_url = f"sqlite:///{env['HADB_PATH']}"
    runners = watch("hacer/runners/+/state")
    recorders = [spawn(["recorder"], {**env, "HACER_RECORDER_ID": "chaos"}, name="recorder")]
    doomed = spawn(["runner"], {**env, "HACER_RUNNER_ID": "doomed"}, name="runner-doomed")
    spawn(["runner"], {**env, "HACER_RUNNER_ID": "survivor"}, name="runner-survivor")
    spawn(["api"], env)
    for runner_id in ("doomed", "survivor"):
        runners.wait_for(
            lambda m, r=runner_id: m.topic == f"hacer/runners/{r}/state" and b'"online"' in m.payload, timeout=30
        )
    wait_until(lambda: port_answers("127.0.0.1", int(env["HACER_HTTP_PORT"])), 30, "the api")

    requested: list[str] = []
    lock = threading.Lock()
    bus = Bus(broker.url, topics, f"chaos-{uuid.uuid4().hex[:6]}")
    bus.start()
    bus.wait_connected(10)

    def over_rest(index: int) -> None:
        # The api answers while the broker is away. A client tries again after a refused
        # connection, and after a 503 ("try again shortly": the run was not recorded, so asking
        # again cannot run it twice), as a patient client does.
        for _ in range(100):
            try:
                answer = requests.post(
                    f"{url}/api/scripts/exec/name/chaos", json={"params": [f"rest{index}", str(starts)]}, timeout=30
                )
            except requests.ConnectionError:
                time.sleep(0.1)
                continue
            if answer.status_code != 503:
                break
            time.sleep(0.5)
        assert answer.status_code == 200, answer.text
        with lock:
            requested.append(answer.json()["run_id"])

    def over_mqtt(index: int) -> None:
        run_id = f"mqtt-{index}-{uuid.uuid4().hex[:6]}"
        with lock:
            requested.append(run_id)
        request = RunRequest("chaos", (f"mqtt{index}", str(starts)), run_id, "chaos")
        while request_until_claimed(bus, request, timeout=30) is None:
            pass  # the broker may be away for a while: keep at it, as a patient requester does

    def kill_the_broker() -> None:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            broker.stop(kill=True)
            time.sleep(rng.uniform(0.3, 2.0))
            broker.start()

    killer = threading.Thread(target=kill_the_broker)
    killer.start()
    with ThreadPoolExecutor(6) as pool:
        jobs = []
        for index in range(120):  # spread over the broker's kills
            jobs.append(pool.submit(over_rest if index % 2 else over_mqtt, index))
            time.sleep(0.08)
            # A runner and the recorder die mid-stream too. (From this thread: a child dies with the
            # thread that started it, PR_SET_PDEATHSIG.)
            if index == 40:
                doomed.stop(kill=True)
            elif index == 80:
                recorders[0].stop(kill=True)
                recorders.append(spawn(["recorder"], {**env, "HACER_RECORDER_ID": "chaos"}, name="recorder"))
        killer.join()
        for job in jobs:
            job.result(timeout=120)
    assert len(requested) == 120

    def unfinished(rows):
        return [
            (r, rows[r][0].state if r in rows else None, len(rows[r][1]) if r in rows else 0)
            for r in requested
            if r not in rows
            or rows[r][0].state not in runstates.FINISHED_STATES
            or (rows[r][0].state != runstates.LOST and (not rows[r][1] or rows[r][1][-1][1] != "exit_status"))
        ]

    try:
        rows = wait_until(
            lambda: not unfinished(rows := database_runs(database_url)) and rows,
            150,
            "every run finished, with its whole log, in the database",
        )
    except AssertionError:
        raise AssertionError(
            f"unfinished runs: {unfinished(database_runs(database_url))[:10]}; recorder exit: "
            f"{recorders[-1].process.poll()}"
        ) from None
    bus.stop()

    started = starts.read_text().split()
    twice = [run_id for run_id in set(started) if started.count(run_id) > 1]
    assert twice == [], "runs started twice"
    for run_id in requested:
        run, entries = rows[run_id]
        assert [seq for seq, _, _ in entries] == list(range(1, len(entries) + 1)), f"gaps in {run_id}'s log"
        if run.state == runstates.LOST:
            assert run.runner == "survivor" and "doomed" in (run.error or "")
            assert [kind for _, kind, _ in entries][:1] in ([], ["launch"])
            continue
        assert run.state == runstates.SUCCEEDED, (run_id, run.state, run.error)
        kinds = [kind for _, kind, _ in entries]
        assert kinds[0] == "launch" and kinds[-1] == "exit_status" and set(kinds[1:-1]) == {"output"}
        # While the broker lags, consecutive lines travel together in one entry.
        lines = "\n".join(data for _, kind, data in entries if kind == "output").split("\n")
        assert lines == [f"{lines[0].split()[0]} line {i}" for i in range(LINES)], f"{run_id}'s lines"
        assert started.count(run_id) == 1
    print(
        f"runs: {len(requested)}, lost with the killed runner: "
        f"{sum(rows[r][0].state == runstates.LOST for r in requested)}, started twice: {len(twice)}"
    )
