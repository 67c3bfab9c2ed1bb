"""Past one machine: two mosquitto brokers bridged to each other (mosquitto's own bridge), a runner
and a recorder on each, one PostgreSQL. Each broker's shared subscription is its own, so both
runners and both recorders receive every request and message: the claims in the database, not
the broker, make each run start once, and the recorders' idempotent writes make each row once."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from hacer import runstates
from hacer.bus import Bus
from hacer.messages import RunRequest
from hacer.models import Database, Run, ScriptLogEntry
from hacer.topics import Topics
from ops.broker import CONFIG_DIR
from scripting.runrequest import request_until_claimed

from support import start_broker, wait_until

RUNS = 1000
SCRIPT = (  # notes each start in a file (a run started twice shows there) and prints one line
    "import os, sys\n"
    "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
    "os.write(fd, (os.environ['HACER_RUN_ID'] + '\\n').encode())\n"
    "print('hello', sys.argv[1])\n"
)


@pytest.fixture
def bridged_brokers(tmp_path):
    """Broker `a`, and broker `b` bridging every hacer topic both ways to `a` over MQTT 5."""
    first = start_broker(tmp_path / "a")
    template = tmp_path / "bridged.conf"
    template.write_text(
        (CONFIG_DIR / "dev.conf").read_text()
        + f"\nconnection to-a\naddress 127.0.0.1:{first.port}\nbridge_protocol_version mqttv50\n"
        "topic hacer/# both 1\ncleansession false\nnotifications false\ntry_private true\n"
    )
    second = start_broker(tmp_path / "b", template)
    probe_a, probe_b = (Bus(broker.url, Topics(), f"probe-{uuid.uuid4().hex[:6]}") for broker in (first, second))
    seen = threading.Event()
    probe_a.subscribe("hacer/probe", lambda message: seen.set())
    for probe in (probe_a, probe_b):
        probe.start()
        probe.wait_connected(10)
    probe_a.sync()
    wait_until(lambda: probe_b.publish("hacer/probe", b"x") and seen.wait(0.2), 20, "the bridge to carry a message")
    for probe in (probe_a, probe_b):
        probe.stop()
    yield first, second
    second.stop()
    first.stop()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_thousand_runs_once_each_across_bridged_brokers(bridged_brokers, postgres_url, spawn, hacer_env, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "note.py").write_text(SCRIPT)
    starts = tmp_path / "starts.txt"
    env = {**hacer_env, "HACER_DATABASE_URL": postgres_url, "HACER_SCRIPTS_DIR": str(scripts)}
    Database(postgres_url).init()
    buses = []
    for name, broker in zip("ab", bridged_brokers, strict=True):
        here = {**env, "HACER_MQTT_URL": broker.url}
        spawn(["runner"], {**here, "HACER_RUNNER_ID": f"runner-{name}"}, name=f"runner-{name}")
        spawn(["recorder"], {**here, "HACER_RECORDER_ID": f"recorder-{name}"}, name=f"recorder-{name}")
        bus = Bus(broker.url, Topics(), f"requester-{name}-{uuid.uuid4().hex[:6]}")
        bus.start()
        bus.wait_connected(10)
        buses.append(bus)
    run_ids = [f"scale-{n}-{uuid.uuid4().hex[:8]}" for n in range(RUNS)]

    def request(index: int) -> None:  # half of the requesters on each broker
        run = RunRequest("note", (str(index), str(starts)), run_ids[index], "scale")
        assert request_until_claimed(buses[index % 2], run, timeout=120) is not None, run_ids[index]

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(request, range(RUNS)))
    for bus in buses:
        bus.stop()

    database = Database(postgres_url)

    def recorded() -> dict[str, tuple[str, str, int]]:
        with database.session() as session:
            counts = dict(
                session.execute(select(ScriptLogEntry.thread_id, func.count()).group_by(ScriptLogEntry.thread_id))
                .tuples()
                .all()
            )
            return {
                run.run_id: (run.state, run.runner, counts.get(run.id, 0))
                for run in session.scalars(select(Run).where(Run.requested_by == "scale"))
            }

    rows = wait_until(
        lambda: (
            len(found := recorded()) == RUNS
            and all(state == runstates.SUCCEEDED and entries == 3 for state, _, entries in found.values())
            and found
        ),
        120,
        "every run succeeded with its whole log (launch, output, exit_status)",
    )
    database.engine.dispose()
    started = starts.read_text().split()
    assert sorted(started) == sorted(run_ids), "a run started twice, or never"
    runners = [runner for _, runner, _ in rows.values()]
    split = {runner: runners.count(runner) for runner in sorted(set(runners))}
    assert split.keys() == {"runner-a", "runner-b"}
    print(f"{RUNS} runs across bridged brokers in {time.monotonic() - began:.1f} s, each once; by runner: {split}")
