"""The api against the whole system: real broker, bridge, runner, recorder, api and emulated nodes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from emulator.nodes import Emulator, make_nodes
from hacer import migrations, runstates
from hacer.automations import AutomationFired
from hacer.bus import Bus
from hacer.parentdeath import child_env
from hacer.settings import PROJECT_DIR
from hacer.topics import Topics
from ops.broker import port_answers

from support import Watcher, free_port, start_broker, wait_until


class System:
    """One whole hacer: every part a process, talking through one mosquitto."""

    def __init__(self, work: Path, database_url: str | None, threaded_api: bool = False) -> None:
        self.work = work
        # The api on eventlet (`manage.py api`), or on threads as in runserver's default layout.
        self.api_command = ["parts", "api"] if threaded_api else ["api"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}
        self.env.update(
            {
                "HACER_DISCOVERY_HOST": "127.0.0.1",
                "HACER_DISCOVERY_PORT": str(free_port(socket.SOCK_DGRAM)),
                "HACER_NODE_PORT": str(free_port()),
                "HACER_HTTP_PORT": str(free_port()),
                "HACER_STATE_DIR": str(work / "state"),
                "HADB_PATH": str(work / "hacer.db"),
                "HACER_SCRIPTS_DIR": str(work / "scripts"),
                "HACER_NODE_TIMEOUT": "1",
                "HACER_RUNNER_ID": f"r-{uuid.uuid4().hex[:6]}",
                "HACER_RECORDER_ID": f"rec-{uuid.uuid4().hex[:6]}",
                "HACER_RESCUE_AFTER": "1",
                "HACER_NODE_DATA_EVERY": "0",
                "HACER_RUN_DATA_EVERY": "0",  # as tests/conftest.py says
                "HACER_LASTSEEN_INTERVAL": "0.5",
                "HACER_POLL": "thermostat:temperature,target@1 sensor_temp:temperature@1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if database_url:
            self.env["HACER_DATABASE_URL"] = database_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # the latest of each part
        self.all_processes: list[subprocess.Popen[bytes]] = []
        self.url = f"http://127.0.0.1:{self.env['HACER_HTTP_PORT']}"

    def start(self) -> None:
        (self.work / "scripts").mkdir()
        for script in (PROJECT_DIR / "scripts").glob("*.py"):
            (self.work / "scripts" / script.name).write_text(script.read_text())
        (self.work / "scripts" / "block.py").write_text(
            "import sys\nprint('waiting', flush=True)\nopen(sys.argv[1]).read()\n"
        )
        self.broker = start_broker(self.work / "broker")
        self.env["HACER_MQTT_URL"] = self.broker.url
        for part in ("bridge", "runner", "recorder", "scheduler", "api"):
            self.start_part(part)
        wait_until(lambda: port_answers("127.0.0.1", int(self.env["HACER_HTTP_PORT"])), 20, "the api to listen")
        wait_until(lambda: requests.get(self.url + "/api/health").status_code == 200, 20, "a healthy system")

    def start_part(self, part: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{part}.log", "ab")
        command = self.api_command if part == "api" else [part]
        process = subprocess.Popen(
            [sys.executable, str(PROJECT_DIR / "manage.py"), *command, *args],
            env=child_env({**self.env, **(env or {})}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.setdefault(part + "".join(args), process)
        self.all_processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.all_processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.all_processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.broker.stop()

    def get(self, path: str, **kwargs):
        return requests.get(self.url + path, timeout=10, **kwargs)

    def post(self, path: str, **kwargs):
        return requests.post(self.url + path, timeout=10, **kwargs)


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "sqlite-threaded-api"])
def system(request, tmp_path_factory):
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("module_postgres_url")
    whole = System(tmp_path_factory.mktemp("system"), database_url, threaded_api=request.param.endswith("threaded-api"))
    whole.start()
    nodes = make_nodes(
        4,
        ["toggle", "light_rgb", "thermostat", "sensor_temp"],
        first_ip="127.0.0.80",
        port=int(whole.env["HACER_NODE_PORT"]),
        interval=2,
        base_id=uuid.uuid4().int % 10**9,
    )
    whole.nodes = nodes
    whole.emulator = Emulator(nodes, ("127.0.0.1", int(whole.env["HACER_DISCOVERY_PORT"])))
    whole.emulator.start()
    wait_until(lambda: len(whole.get("/api/nodes").json()["node_list"]) >= 4, 20, "the nodes recorded")
    yield whole
    whole.emulator.stop()
    whole.stop()


@pytest.fixture(scope="module")
def module_postgres_url():
    from sqlalchemy import text

    from hacer.models import Database

    from support import POSTGRES_URL

    schema = f"test_{uuid.uuid4().hex[:10]}"
    admin = Database(POSTGRES_URL)
    try:
        with admin.engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.engine.dispose()


@pytest.fixture
def bus(system):
    client = Bus(system.broker.url, Topics(), f"test-{uuid.uuid4().hex[:8]}")
    client.start()
    client.wait_connected(10)
    yield client
    client.stop()


def node_of(system, node_type):
    return next(n for n in system.nodes if n.type == node_type)


def wait_run(system, thread_id, states=runstates.FINISHED_STATES, timeout=20):
    return wait_until(
        lambda: (r := system.get(f"/api/runs/{thread_id}").json()).get("state") in states and r,
        timeout,
        f"run {thread_id} to reach {states}",
    )


def test_2015_node_endpoints_field_for_field(system):
    listed = system.get("/api/nodes").json()["node_list"]
    toggle = node_of(system, "toggle")
    node = next(n for n in listed if n["id"] == toggle.id)
    assert set(node) == {"id", "name", "type", "ip", "last_updated"}
    assert (node["type"], node["ip"], type(node["name"])) == ("toggle", toggle.ip, str)
    assert len(node["last_updated"]) == 19 and node["last_updated"][10] == "T"
    # fresh within a few seconds of the latest beacon (every 2 s), with no write per beacon
    from datetime import datetime

    age = datetime.now(UTC).replace(tzinfo=None) - datetime.fromisoformat(node["last_updated"])
    assert age.total_seconds() < 5
    assert system.get(f"/api/nodes/id/{toggle.id}").json() == node
    missing = system.get("/api/nodes/id/1")
    assert missing.status_code == 404 and missing.json()["message"] == "no node with id 1"
    assert system.get("/api/nodes/name/nobody").status_code == 404


def test_rename_accepts_2015_bodies_and_publishes_meta(system, bus):
    light = node_of(system, "light_rgb")
    meta = Watcher(bus, f"hacer/nodes/{light.id}/meta")
    bus.sync()
    assert meta.messages and meta.messages[0].retain  # published when the node was first recorded
    # the 2015 app sends JSON without a JSON content type
    answer = system.post(
        f"/api/nodes/id/{light.id}", data='{"name": "desk lamp", "other": 1}', headers={"Content-Type": "text/plain"}
    )
    assert answer.status_code == 200 and answer.json()["success"] is True
    assert system.get("/api/nodes/name/desk lamp").json()["id"] == light.id
    meta.wait_for(lambda m: json.loads(m.payload)["name"] == "desk lamp")
    thermostat = node_of(system, "thermostat")
    taken = system.post(f"/api/nodes/id/{thermostat.id}", json={"name": "desk lamp"})
    assert taken.status_code == 409 and "taken" in taken.json()["message"]
    for body in ("not json", "[1]", '{"name": 5}', "{}"):
        bad = system.post(f"/api/nodes/id/{light.id}", data=body)
        assert bad.status_code == 400 and bad.json()["message"]
    assert system.post("/api/nodes/id/1", json={"name": "x"}).status_code == 404
    assert system.post(f"/api/nodes/id/{light.id}", data="x" * 100_000).status_code == 413


def test_scripts_list_and_exec_then_logs(system):
    scripts = system.get("/api/scripts/list").json()["script_list"]
    toggle = next(s for s in scripts if s["name"] == "toggle")
    assert toggle["id"] == int(hashlib.md5(b"toggle").hexdigest()[:8], 16)
    outlet = node_of(system, "toggle")
    answer = system.post(f"/api/scripts/exec/id/{toggle['id']}", data=json.dumps({"params": [str(outlet.id), "1"]}))
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "ok" and isinstance(body["log_thread_id"], int)
    run = wait_run(system, body["log_thread_id"])
    assert run["state"] == runstates.SUCCEEDED and run["exit_code"] == 0
    assert outlet.values["on"] == 1
    entries = wait_until(
        lambda: (
            (e := system.get(f"/api/logs/script/thread_id/{body['log_thread_id']}").json()["entry_list"])
            and e[-1]["entry_type"] == "exit_status"
            and e
        ),
        10,
        "entries",
    )
    assert [e["entry_type"] for e in entries] == ["launch", "output", "sent_set", "result", "exit_status"]
    for entry in entries:
        assert {k: type(v) for k, v in entry.items()} == {
            "id": int,
            "timestamp": str,
            "thread_id": int,
            "script_name": str,
            "params": list,
            "entry_type": str,
            "data": str,
        }
        assert entry["params"] == ["1"] and entry["script_name"] == "toggle"  # without the node name
    by_name = system.post("/api/scripts/exec/name/test", json={"params": ["a", "b"]}).json()
    assert wait_run(system, by_name["log_thread_id"])["state"] == runstates.SUCCEEDED
    assert system.post("/api/scripts/exec/name/nothing", json={}).status_code == 404
    assert system.post("/api/scripts/exec/id/1", json={}).status_code == 404
    assert system.post("/api/scripts/exec/name/test", json={"params": "x"}).status_code == 400
    assert system.post("/api/scripts/exec/name/test", json={"params": [{}]}).status_code == 400
    everything = system.get("/api/logs/script").json()["entry_list"]
    assert {e["thread_id"] for e in everything} >= {body["log_thread_id"], by_name["log_thread_id"]}
    outputs = system.get("/api/logs/script", params={"entry_type": "output", "script": "test"}).json()["entry_list"]
    assert outputs and all(e["entry_type"] == "output" and e["script_name"] == "test" for e in outputs)
    assert system.get("/api/logs/script", params={"entry_type": "nope"}).status_code == 400
    page = system.get("/api/logs/script", params={"per_page": 2, "page": 1}).json()["entry_list"]
    assert len(page) == 2


def test_a_run_requested_on_the_bus_is_recorded(system, bus):
    run_id = uuid.uuid4().hex
    bus.publish("hacer/runs/request", json.dumps({"run_id": run_id, "script": "test", "params": ["bus"]}))
    run = wait_run(system, run_id)
    assert run["state"] == runstates.SUCCEEDED and isinstance(run["thread_id"], int)
    assert run["requested_by"] == "" and run["params"] == ["bus"]
    listed = system.get("/api/runs", params={"script": "test", "per_page": 1000}).json()
    assert run_id in [r["run_id"] for r in listed["runs"]] and listed["total"] >= 1


def test_node_set_and_get_over_rest(system):
    thermostat = node_of(system, "thermostat")
    answer = system.post(f"/api/nodes/id/{thermostat.id}/set", json={"target": 25})
    assert answer.status_code == 200 and answer.json()["results"][0]["ok"] is True
    assert thermostat.values["target"] == 25
    got = system.get(f"/api/nodes/id/{thermostat.id}/get/temperature").json()["results"][0]
    assert (got["value"], got["raw"]) == (21, "+i21e")
    refused = system.get(f"/api/nodes/id/{thermostat.id}/get/humidity")
    assert refused.status_code == 502 and refused.json()["results"][0]["reason"] == "node_error"
    sensor = node_of(system, "sensor_temp")
    sensor.mute = True
    try:
        slow = system.get(f"/api/nodes/id/{sensor.id}/get/temperature")
        assert slow.status_code == 504
    finally:
        sensor.mute = False
    assert system.post(f"/api/nodes/id/{thermostat.id}/set", json={}).status_code == 400


def test_cancel_a_run_over_rest(system, tmp_path):
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    started = system.post("/api/scripts/exec/name/block", json={"params": [str(fifo)]}).json()
    wait_run(system, started["log_thread_id"], {runstates.RUNNING})
    assert system.post(f"/api/runs/{started['run_id']}/cancel").json()["success"] is True
    assert wait_run(system, started["log_thread_id"])["state"] == runstates.CANCELLED
    assert system.post(f"/api/runs/{started['run_id']}/cancel").status_code == 409


def test_health_and_types(system):
    health = system.get("/api/health").json()
    assert health["status"] == "ok" and health["bridge"] == "online" and health["runners"]
    assert system.get("/api/node_types").json()["node_types"] == [
        "toggle",
        "light_rgb",
        "sensor_temp",
        "thermostat",
        "other",
    ]
    assert system.get("/api/nowhere").json()["error"] == "not found"


def test_node_history_over_rest_from_the_bridges_reads(system):
    thermostat, sensor = node_of(system, "thermostat"), node_of(system, "sensor_temp")
    url = f"/api/nodes/id/{thermostat.id}/history?key=temperature&since={time.time() - 60}"
    before = system.get(url).json()
    for temperature in (24, 26):
        thermostat.values["temperature"] = temperature  # the room warms; nobody asks
        wait_until(
            lambda t=temperature: [v for _, v in system.get(url).json()["points"]][-1:] == [t],
            20,
            f"{temperature} °C in the history",
        )
    points = system.get(url).json()["points"]
    assert [v for _, v in points][-2:] == [24, 26] and points[-2][0] < points[-1][0]
    assert len(points) == len(before["points"]) + 2
    bucketed = system.get(url + "&step=60").json()
    assert bucketed["step"] == 60 and bucketed["points"][-1][3] == 26

    sensor.mute = True
    try:
        strip = f"/api/nodes/id/{sensor.id}/history?since={time.time() - 3600}"
        wait_until(
            lambda: any(a["state"] == "not_answering" for a in system.get(strip).json()["availability"]),
            20,
            "the silent sensor in the availability strip",
        )
    finally:
        sensor.mute = False
    availability = system.get(strip).json()["availability"]
    states = [a["state"] for a in availability]
    assert states.index("online") < states.index("not_answering")  # online since before the range
    assert [a["t"] for a in availability] == sorted(a["t"] for a in availability)
    assert next(a for a in availability if a["state"] == "not_answering")["reason"] == "no reply within 1 s"
    for bad in ("since=yesterday", "step=-1", "step=1&since=0", f"since={time.time() + 10}", "since=-inf", "key=%00"):
        response = system.get(f"/api/nodes/id/{thermostat.id}/history?{bad}")
        assert response.status_code == 400 and response.json()["message"], bad
    assert system.get("/api/nodes/id/1/history").status_code == 404


def test_delete_node_clears_its_retained_topics(system, bus):
    from emulator.nodes import EmulatedNode

    gone = EmulatedNode(777000 + uuid.uuid4().int % 1000, "toggle", "127.0.0.99")
    system.emulator.send_beacon(gone)
    wait_until(lambda: system.get(f"/api/nodes/id/{gone.id}").status_code == 200, 10, "the node recorded")
    answer = requests.delete(f"{system.url}/api/nodes/id/{gone.id}", timeout=10)
    assert answer.status_code == 200 and answer.json()["success"] is True
    assert system.get(f"/api/nodes/id/{gone.id}").status_code == 404
    retained = Watcher(bus, f"hacer/nodes/{gone.id}/#")
    bus.sync()
    assert [m for m in retained.messages if m.payload] == []
    assert requests.delete(f"{system.url}/api/nodes/id/{gone.id}", timeout=10).status_code == 404


def socket_client(system, **auth):
    import socketio

    client = socketio.Client(reconnection=False)
    received = {"snapshot": [], "event": []}
    client.on("snapshot", lambda data: received["snapshot"].append(data))
    client.on("event", lambda data: received["event"].append(data))
    client.connect(system.url, transports=["websocket"], auth=auth or None, wait_timeout=10)
    client.received = received
    return client


def test_websocket_snapshot_live_events_run_log_and_resume(system, bus):
    client = socket_client(system)
    try:
        wait_until(lambda: client.received["snapshot"], 10, "a snapshot")
        snapshot = client.received["snapshot"][0]
        ids = {n["id"] for n in snapshot["nodes"]}
        assert {n.id for n in system.nodes} <= ids and isinstance(snapshot["seq"], int)
        light = node_of(system, "light_rgb")
        system.post(f"/api/nodes/id/{light.id}/set", json={"color": 0x123456})
        wait_until(
            lambda: any(
                e["kind"] == "node" and e["data"]["id"] == light.id and e["data"]["values"].get("color") == 0x123456
                for e in client.received["event"]
            ),
            10,
            "the node's new value",
        )
        fifo = system.work / f"ws-{uuid.uuid4().hex[:6]}.fifo"
        os.mkfifo(fifo)
        run = system.post("/api/scripts/exec/name/block", json={"params": [str(fifo)]}).json()
        client.emit("watch_run", {"run_id": run["run_id"]})
        wait_until(
            lambda: any(
                e["kind"] == "run" and e["data"]["run_id"] == run["run_id"] and e["data"]["state"] == "running"
                for e in client.received["event"]
            ),
            10,
            "running",
        )
        with open(fifo, "w") as pipe:
            pipe.write("go")
        wait_until(
            lambda: any(
                e["kind"] == "run" and e["data"]["run_id"] == run["run_id"] and e["data"]["state"] == "succeeded"
                for e in client.received["event"]
            ),
            10,
            "run events",
        )
        wait_until(
            lambda: "exit_status" in [e["data"]["entry_type"] for e in client.received["event"] if e["kind"] == "log"],
            10,
            "the watched run's log",
        )
        logged = [
            e["data"]["entry_type"]
            for e in client.received["event"]
            if e["kind"] == "log" and e["data"]["run_id"] == run["run_id"]
        ]
        assert logged[-2:] == ["output", "exit_status"]
        broadcast = [e["seq"] for e in client.received["event"] if e["kind"] not in ("log", "lastseen")]
        assert broadcast == sorted(broadcast)
        last = max(e["seq"] for e in client.received["event"] if e["seq"] is not None)
        # A late watcher first gets the run's kept entries: older events (the launch entry comes
        # before the `running` status), perhaps twice; the run's own numbering has no gap.
        entries = [e["data"]["seq"] for e in client.received["event"] if e["kind"] == "log"]
        assert list(dict.fromkeys(entries)) == list(range(1, len(set(entries)) + 1))
    finally:
        client.disconnect()
    # a client that comes back with the highest seq it saw gets what it missed
    system.post(f"/api/nodes/id/{light.id}/set", json={"color": 0x654321})
    again = socket_client(system)
    try:
        wait_until(lambda: again.received["snapshot"], 10, "a snapshot")
        again.received["event"].clear()
        again.emit("resume", {"seq": last})
        wait_until(
            lambda: any(
                e["kind"] == "node" and e["data"].get("values", {}).get("color") == 0x654321
                for e in again.received["event"]
            ),
            10,
            "the missed event",
        )
        # lastseen events carry no seq (not kept for resuming): one may come meanwhile
        assert all(e["seq"] > last for e in again.received["event"] if e["kind"] != "lastseen")
        again.received["snapshot"].clear()
        again.emit("resume", {"seq": -5})  # too old: a fresh snapshot instead
        wait_until(lambda: again.received["snapshot"], 10, "a fresh snapshot")
    finally:
        again.disconnect()


def test_a_client_that_starts_on_long_polling_upgrades_and_gets_every_event_in_order(system):
    # Socket.IO's default: polling first, then the websocket; what is sent meanwhile is held for it.
    import socketio

    client = socketio.Client(reconnection=False)
    events: list[dict] = []
    client.on("snapshot", lambda data: None)
    client.on("event", events.append)
    client.connect(system.url, transports=["polling", "websocket"], wait_timeout=10)
    light = node_of(system, "light_rgb")
    try:
        colours = list(range(0x100001, 0x100001 + 20))
        for colour in colours:  # some before the upgrade, some during, some after
            system.post(f"/api/nodes/id/{light.id}/set", json={"color": colour})
        wait_until(lambda: client.transport() == "websocket", 10, "the upgrade to a websocket")
        seen = lambda: [  # noqa: E731
            e["data"]["values"]["color"]
            for e in events
            if e["kind"] == "node" and e["data"]["id"] == light.id and "color" in e["data"].get("values", {})
        ]
        wait_until(lambda: seen() and seen()[-1] == colours[-1], 20, "the last colour")
        numbered = [e["seq"] for e in events if e["seq"] is not None]
        assert numbered == sorted(numbered) and len(set(numbered)) == len(numbered)
    finally:
        client.disconnect()


def test_a_new_node_reaches_a_browser_online_in_its_first_event(system):
    # The bridge announces a new node in several messages (presence, readings, values read): a
    # client gets what one burst of them changed as one event, and the presence first.
    client = socket_client(system)
    node_id = 880000 + uuid.uuid4().int % 10000
    try:
        wait_until(lambda: client.received["snapshot"], 10, "a snapshot")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.9", 0))
            sock.sendto(
                json.dumps({"id": node_id, "type": "toggle"}).encode(),
                ("127.0.0.1", int(system.env["HACER_DISCOVERY_PORT"])),
            )
        first = wait_until(
            lambda: next((e for e in client.received["event"] if e["data"].get("id") == node_id), None),
            10,
            "an event naming the new node",
        )
        assert (first["kind"], first["data"]["state"]) == ("node", "online")
    finally:
        client.disconnect()
        wait_until(lambda: system.get(f"/api/nodes/id/{node_id}").status_code == 200, 10, "the recorder's row")
        requests.delete(f"{system.url}/api/nodes/id/{node_id}", timeout=10)


def test_token_protects_rest_and_websockets(system, bus):
    port = free_port()
    api = system.start_part("api", env={"HACER_HTTP_PORT": str(port), "HACER_API_TOKEN": "s3cret"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: port_answers("127.0.0.1", port), 20, "the second api")
        assert requests.get(url + "/api/nodes", timeout=5).status_code == 401
        ok = requests.get(url + "/api/nodes", headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["node_list"]
        assert requests.get(url + "/metrics", timeout=5).status_code == 401
        assert requests.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=5).ok
        import socketio

        with pytest.raises(socketio.exceptions.ConnectionError):
            socketio.Client(reconnection=False).connect(
                url, transports=["websocket"], auth={"token": "wrong"}, wait_timeout=5
            )
        good = socketio.Client(reconnection=False)
        snapshots = []
        good.on("snapshot", snapshots.append)
        good.connect(url, transports=["websocket"], auth={"token": "s3cret"}, wait_timeout=5)
        wait_until(lambda: snapshots, 10, "a snapshot with the token")
        good.disconnect()
    finally:
        api.terminate()
        api.wait(10)
    # Its last word was `offline`; the api still running says it is online again.
    state = Watcher(bus, "hacer/api/state")
    state.wait_for(lambda m: m.payload == b"online", timeout=10)


def test_recorder_down_mid_run_history_is_whole(system, tmp_path):
    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    started = system.post("/api/scripts/exec/name/block", json={"params": [str(fifo)]}).json()
    wait_run(system, started["log_thread_id"], {runstates.RUNNING})
    # stop the recorder, let the run end unrecorded, start it again
    recorder = system.processes.pop("recorder")
    recorder.send_signal(signal.SIGTERM)
    assert recorder.wait(15) == 0
    with open(fifo, "w") as pipe:
        pipe.write("go")
    system.start_part("recorder")
    run = wait_run(system, started["log_thread_id"])
    assert run["state"] == runstates.SUCCEEDED
    entries = system.get(f"/api/logs/script/thread_id/{started['log_thread_id']}").json()["entry_list"]
    assert [e["entry_type"] for e in entries] == ["launch", "output", "exit_status"]


def test_request_parked_for_a_dead_runner_is_rescued(system, bus, tmp_path):
    # A runner that subscribed once and never returns: the broker parks its share for it.
    ghost_id = f"ghost-{uuid.uuid4().hex[:6]}"
    ghost = system.start_part("runner", env={"HACER_RUNNER_ID": ghost_id})
    states = Watcher(bus, f"hacer/runners/{ghost_id}/state")
    states.wait_for(lambda m: b'"online"' in m.payload, timeout=20)
    ghost.send_signal(signal.SIGKILL)
    ghost.wait()
    states.wait_for(lambda m: b'"offline"' in m.payload, timeout=20)
    thread_ids = [
        system.post("/api/scripts/exec/name/test", json={"params": [str(i)]}).json()["log_thread_id"] for i in range(6)
    ]
    runs = [wait_run(system, t, timeout=30) for t in thread_ids]
    assert all(r["state"] == runstates.SUCCEEDED for r in runs)
    assert {r["runner"] for r in runs} == {system.env["HACER_RUNNER_ID"]}
    for thread_id in thread_ids:
        entries = system.get(f"/api/logs/script/thread_id/{thread_id}").json()["entry_list"]
        assert [e["entry_type"] for e in entries].count("launch") == 1


def test_two_api_processes_both_relay_and_write_once(system):
    port = free_port()
    second = system.start_part("api", env={"HACER_HTTP_PORT": str(port)})
    second_recorder = system.start_part("recorder", env={"HACER_RECORDER_ID": "second"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: port_answers("127.0.0.1", port), 20, "the second api")
        first_client = socket_client(system)
        second_system = type("Second", (), {"url": url})()
        second_client = socket_client(second_system)
        thread_ids = []
        for index in range(20):
            target = system if index % 2 else second_system
            answer = requests.post(
                f"{target.url}/api/scripts/exec/name/test", json={"params": [str(index)]}, timeout=10
            ).json()
            thread_ids.append(answer["log_thread_id"])
        for thread_id in thread_ids:
            wait_run(system, thread_id)
        for client in (first_client, second_client):
            wait_until(
                lambda c=client: (
                    len(
                        {
                            e["data"]["run_id"]
                            for e in c.received["event"]
                            if e["kind"] == "run" and e["data"]["state"] == "succeeded"
                        }
                    )
                    >= 20
                ),
                10,
                "every run's end relayed by this api",
            )
            client.disconnect()
        for thread_id in thread_ids:
            entries = wait_until(
                lambda t=thread_id: (
                    (e := system.get(f"/api/logs/script/thread_id/{t}").json()["entry_list"]) and len(e) >= 3 and e
                ),
                10,
                "entries",
            )
            assert [e["entry_type"] for e in entries] == ["launch", "output", "exit_status"]
        assert len(set(thread_ids)) == 20
    finally:
        for process in (second, second_recorder):
            process.terminate()
            process.wait(15)


def test_gunicorn_with_the_eventlet_worker_serves_the_api(system, bus):
    port = free_port()
    # Asked for every interface but given no token: loopback only, as `manage.py api` does.
    env = {**system.env, "HACER_HTTP_PORT": str(port), "HACER_HTTP_HOST": "0.0.0.0", "HACER_API_TOKEN": ""}
    log = open(system.work / "gunicorn.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "api/gunicorn.conf.py", "api.wsgi:app"],
        env=env,
        cwd=PROJECT_DIR,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: port_answers("127.0.0.1", port), 20, "gunicorn to listen")
        listening = wait_until(
            lambda: re.search(r"Listening at: (\S+)", (system.work / "gunicorn.log").read_text()),
            10,
            "gunicorn's listening line",
        )
        assert listening.group(1) == f"http://127.0.0.1:{port}"
        nodes = requests.get(f"http://127.0.0.1:{port}/api/nodes", timeout=10).json()["node_list"]
        assert {n.id for n in system.nodes} <= {n["id"] for n in nodes}
        health = wait_until(
            lambda: (
                (h := requests.get(f"http://127.0.0.1:{port}/api/health", timeout=10)).status_code == 200 and h.json()
            ),
            20,
            "gunicorn's api to see the bus",
        )
        assert health["broker"] == "connected"
        client = socket_client(type("Gunicorn", (), {"url": f"http://127.0.0.1:{port}"})())
        wait_until(lambda: client.received["snapshot"], 10, "a snapshot through gunicorn")
        client.disconnect()
    finally:
        server.terminate()
        server.wait(15)


def test_a_slow_websocket_client_is_cut_loose_and_others_keep_up(system, bus):
    if "HACER_DATABASE_URL" in system.env:
        pytest.skip("no database in this path: run once, on the SQLite system (it takes 40 s)")
    import websocket  # the websocket-client package: a raw client that can stop reading

    slow = websocket.create_connection(
        f"ws://127.0.0.1:{system.env['HACER_HTTP_PORT']}/socket.io/?EIO=4&transport=websocket",
        sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),),
        timeout=10,
    )
    assert slow.recv().startswith("0")  # engine.io open
    slow.send("40")  # socket.io connect; from here on it never reads
    fast = socket_client(system)
    try:
        # Fires: each is an event of its own (a node's changes in one burst would be one event),
        # a step at a time until the api cuts the slow client loose (within 40 000).
        flood, step = 40_000, 1000
        automation_id = 990000 + uuid.uuid4().int % 10000
        due = datetime.now(UTC)
        api_log = system.work / "api.log"
        for start in range(0, flood, step):
            if "behind: disconnecting it" in api_log.read_text():
                break
            for index in range(start, start + step):  # QoS 1: the broker may drop QoS 0 to a busy subscriber
                fired = AutomationFired(automation_id, "flood", due, f"flood-{index}", "test")
                bus.publish(f"hacer/automations/{automation_id}/fired", fired.to_payload())
            # At the pace a reading client keeps (the broker alone delivers faster than a client reads).
            wait_until(
                lambda last=f"flood-{start + step - 1}": any(
                    e["kind"] == "automation_fired" and e["data"]["run_id"] == last
                    for e in fast.received["event"][-50:]
                ),
                60,
                "the fast client to get the step's last event",
            )
        assert fast.connected

        def slow_is_closed():
            try:
                while slow.recv():
                    pass
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                return True
            return True  # an empty frame: closed

        assert slow_is_closed()
        assert "behind: disconnecting it" in api_log.read_text()
    finally:
        fast.disconnect()
        slow.close()


def test_a_long_log_read_without_paging_is_bounded_and_paging_reads_it_all(system):
    (system.work / "scripts" / "chatty.py").write_text(
        "import sys\nfor i in range(700):\n    print(f'{i:05d}' + 'x' * 8000)\n"
    )
    started = system.post("/api/scripts/exec/name/chatty").json()
    assert wait_run(system, started["log_thread_id"], timeout=60)["state"] == runstates.SUCCEEDED
    path = f"/api/logs/script/thread_id/{started['log_thread_id']}"

    def whole_log():
        entries = [e for page in (1, 2) for e in system.get(f"{path}?page={page}&per_page=1000").json()["entry_list"]]
        # Under a backlog the runner batches lines into one entry: compare the text.
        text = "\n".join(e["data"] for e in entries if e["entry_type"] == "output").split("\n")
        return entries and entries[-1]["entry_type"] == "exit_status" and len(text) == 700 and (entries, text)

    paged, lines = wait_until(whole_log, 30, "the whole log recorded")
    assert [line[:5] for line in lines] == [f"{i:05d}" for i in range(700)]
    unpaged = system.get(path).json()
    assert unpaged["truncated"] is True
    assert sum(len(e["data"]) for e in unpaged["entry_list"]) <= 4 * 1024 * 1024
    assert [e["id"] for e in unpaged["entry_list"]] == [e["id"] for e in paged[: len(unpaged["entry_list"])]]
    every_run = system.get("/api/logs/script").json()  # all runs' latest entries: bounded alike, the newest kept
    assert every_run["truncated"] is True
    assert sum(len(e["data"]) for e in every_run["entry_list"]) <= 4 * 1024 * 1024
    ids = [e["id"] for e in every_run["entry_list"]]
    assert ids == sorted(ids)


def test_status_says_every_part_is_up(system):
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "status", "--json"],
        env=child_env(system.env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["problems"] == []
    # Online, every part (other tests here leave stopped runners and recorders of their own: offline)
    assert {part for part, entries in report["parts"].items() if "online" in [e["state"] for e in entries]} == {
        "bridge",
        "runner",
        "recorder",
        "scheduler",
        "api",
    }
    assert "datagrams" in report["parts"]["bridge"][0]["stats"]
    assert report["nodes"]["online"] >= 4
    assert report["database"]["schema"] == migrations.HEAD


def scrape(system) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    answer = system.get("/metrics")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_in_prometheus_text_format(system):
    node = node_of(system, "toggle")
    assert system.post(f"/api/nodes/id/{node.id}/set", json={"on": 1}).status_code == 200
    run = system.post("/api/scripts/exec/name/toggle", json={"params": [str(node.id), "0"]}).json()
    assert wait_run(system, run["log_thread_id"])["state"] == runstates.SUCCEEDED
    samples = wait_until(
        lambda: (
            (found := scrape(system)).get(("hacer_bridge_commands_total", (("result", "ok"),)), 0) >= 1
            and found.get(("hacer_bridge_polls_total", (("result", "ok"),)), 0) >= 1
            and found.get(("hacer_bridge_datagrams_total", ()), 0) > 0
            and found
        ),
        20,
        "the bridge's counters with a command and a read in them",
    )
    assert samples[("hacer_bridge_up", ())] == 1
    assert samples[("hacer_nodes", (("state", "online"),))] >= 4
    for part in ("runner", "recorder", "scheduler"):  # other tests here stopped parts of their own: 0
        assert max(value for (name, _), value in samples.items() if name == f"hacer_{part}_up") == 1, part
    assert samples[("hacer_runs", (("state", "succeeded"),))] >= 1
    for gauge in (
        "hacer_unconfirmed_messages",
        "hacer_unconfirmed_bytes",
        "hacer_dead_letters",
        "hacer_automations_failed",
        "hacer_api_websocket_clients",
    ):
        assert (gauge, ()) in samples, gauge


def test_real_bus_messages_match_the_asyncapi_document(system, bus):
    import jsonschema

    document = json.loads((PROJECT_DIR / "docs" / "asyncapi.json").read_text())
    channels = [
        (re.compile("^" + re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(channel["address"])) + "$"), channel)
        for channel in document["channels"].values()
    ]
    everything = Watcher(bus, "hacer/#")
    bus.sync()
    node = node_of(system, "thermostat")
    system.post(f"/api/nodes/id/{node.id}", json={"name": f"asyncapi-{uuid.uuid4().hex[:6]}"})
    system.get(f"/api/nodes/id/{node.id}/get/temperature")
    run = system.post("/api/scripts/exec/name/gettemp", json={"params": [str(node.id)]}).json()
    wait_run(system, run["log_thread_id"])
    bus.sync()
    seen = set()
    for message in list(everything.messages):
        matching = [channel for pattern, channel in channels if pattern.match(message.topic)]
        assert len(matching) == 1, f"{message.topic} is in {len(matching)} channels of docs/asyncapi.json"
        (reference,) = matching[0]["messages"].values()
        declared = document["components"]["messages"][reference["$ref"].rsplit("/", 1)[1]]
        seen.add(message.topic.split("/")[1] if "/" in message.topic else message.topic)
        if not message.payload:
            continue  # a retained topic being cleared
        if declared["contentType"] == "text/plain":
            message.payload.decode()
            continue
        schema = {**declared["payload"], "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(json.loads(message.payload))
    assert len(everything.messages) > 20 and {"nodes", "runs", "bridge", "runners", "recorders"} <= seen
