"""The command line: runserver (with its own mosquitto), the emulator as a process, settings."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
import requests
import socketio

from hacer.bus import Bus
from hacer.messages import CommandResult, Presence, RunnerState
from hacer.models import Database
from hacer.settings import PROJECT_DIR, Settings, SettingsError
from hacer.topics import Topics
from ops.broker import port_answers

from support import Watcher, free_port, wait_until


def test_runserver_starts_mosquitto_when_none_answers(spawn, hacer_env, tmp_path):
    port = free_port()
    env = {**hacer_env, "HACER_MQTT_URL": f"mqtt://127.0.0.1:{port}", "HACER_HTTP_PORT": str(free_port())}
    server = spawn(["runserver", "--emulate", "2"], env)
    wait_until(lambda: port_answers("127.0.0.1", port), timeout=15, what="runserver's mosquitto")
    bus = Bus(env["HACER_MQTT_URL"], Topics(), "probe")
    bus.start()
    try:
        bus.wait_connected(10)
        state = Watcher(bus, "hacer/bridge/state")
        state.wait_for(lambda m: m.payload == b"online", timeout=15)
        runner = Watcher(bus, "hacer/runners/+/state")
        runner.wait_for(lambda m: RunnerState.from_payload(m.payload).state == "online", timeout=15)
        api = Watcher(bus, "hacer/api/state")
        api.wait_for(lambda m: m.payload == b"online", timeout=15)
        url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}/api/nodes"  # online on the bus: its port takes connections
        wait_until(lambda: len(requests.get(url, timeout=5).json()["node_list"]) == 2, 15, "the emulated nodes")
    finally:
        bus.stop()
    assert server.stop() == 0, server.output()
    assert not port_answers("127.0.0.1", port), "mosquitto outlived runserver"
    log = server.output()
    for part in ("parts", "emulate", "broker"):  # the five parts share one process, and its prefix
        assert f"{part:>8} | " in log, f"no {part} lines in the log"
    assert "starting bridge, runner, recorder, scheduler, api" in log
    orphans = subprocess.run(["pgrep", "-f", env["HACER_STATE_DIR"]], capture_output=True, text=True).stdout
    assert orphans == "", "processes outlived runserver"


def test_the_eventlet_api_takes_connections_once_it_says_it_is_online(spawn, hacer_env, watch):
    """`manage.py api` (the split layout's): its port is bound before the bus announces it."""
    port = free_port()
    online = watch("hacer/api/state")
    spawn(["api"], {**hacer_env, "HACER_HTTP_PORT": str(port)})
    online.wait_for(lambda m: m.payload == b"online", timeout=30)
    assert requests.get(f"http://127.0.0.1:{port}/api/health", timeout=10).status_code in (200, 503)


# Run in a network namespace of the test's own, where 127.0.0.1:1883 (the default) is free for a
# stand-in of the system's mosquitto, whatever this machine runs on its own 1883.
IN_A_NAMESPACE = """
import os, signal, subprocess, sys, time, urllib.request
sys.path.insert(0, os.getcwd())
from ops.broker import port_answers
work = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
system_broker = subprocess.Popen(["mosquitto", "-p", "1883"], stderr=subprocess.DEVNULL)
env = {k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}
env.update(HADB_PATH=work + "/hacer.db", HACER_STATE_DIR=work + "/state", HACER_HTTP_PORT="5000")
log = open(work + "/runserver.log", "w+")
server = subprocess.Popen([sys.executable, "manage.py", "runserver"], env=env, stderr=log, stdout=log)
try:
    deadline = time.monotonic() + 90
    while True:
        try:
            health = urllib.request.urlopen("http://127.0.0.1:5000/api/health", timeout=2).read().decode()
            if '"connected"' in health:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "runserver did not come up: " + open(work + "/runserver.log").read()
        time.sleep(0.1)  # in another namespace: no event the test could wait on
    retained = subprocess.run(
        ["mosquitto_sub", "-p", "1883", "-t", "hacer/#", "--retained-only", "-W", "1", "-v"],
        capture_output=True, text=True,
    ).stdout
    print("own broker:", port_answers("127.0.0.1", 1884), "on the system's:", repr(retained))
finally:
    server.send_signal(signal.SIGINT)
    server.wait(60)
    system_broker.terminate()
print(open(work + "/runserver.log").read())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_runserver_unconfigured_starts_its_own_broker_when_another_holds_the_default_port(tmp_path):
    outcome = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", IN_A_NAMESPACE, str(tmp_path)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    assert "own broker: True on the system's: ''" in outcome.stdout  # nothing of hacer's went there
    assert "a broker that is not hacer's answers on 127.0.0.1:1883" in outcome.stdout
    assert "mosquitto_sub -p 1884" in outcome.stdout


def test_runserver_uses_a_broker_that_answers(spawn, hacer_env, broker, watch):
    states = watch("hacer/+/state")
    runner = watch("hacer/runners/+/state")
    server = spawn(["runserver"], {**hacer_env, "HACER_HTTP_PORT": str(free_port())})
    for topic in ("hacer/bridge/state", "hacer/api/state"):
        states.wait_for(lambda m, t=topic: m.topic == t and m.payload == b"online", timeout=15)
    runner.wait_for(lambda m: RunnerState.from_payload(m.payload).state == "online", timeout=15)
    assert "using the broker at" in server.output()
    server.stop()
    # one stop, and every retained state ends offline
    for topic in ("hacer/bridge/state", "hacer/api/state"):
        states.wait_for(lambda m, t=topic: m.topic == t and m.payload == b"offline", timeout=15)
    runner.wait_for(lambda m: RunnerState.from_payload(m.payload).state == "offline", timeout=15)
    assert broker.process.poll() is None


def test_emulate_command_serves_nodes_the_bridge_commands(spawn, hacer_env, watch, make_bus):
    hacer_env["HACER_OFFLINE_AFTER"] = "3"
    presence = watch("hacer/nodes/+/presence")
    results = watch("hacer/nodes/+/result")
    spawn(["bridge"], hacer_env)
    spawn(
        [
            "emulate",
            "--count",
            "2",
            "--types",
            "toggle,thermostat",
            "--interval",
            "1",
            "--first-ip",
            "127.0.0.30",
            "--base-id",
            "5000",
        ],
        hacer_env,
        name="emulate",
    )
    for node_id in (5000, 5001):
        presence.wait_for(lambda m, n=node_id: Presence.from_payload(m.payload).id == n, timeout=15)
    bus = make_bus()
    bus.publish("hacer/nodes/5001/get", "temperature", correlation=b"t")
    result = CommandResult.from_payload(results.wait_for(lambda m: m.correlation == b"t").payload)
    assert result.ok and result.value == 21


def test_settings_defaults_and_errors(tmp_path):
    settings = Settings.from_env({})
    assert (settings.mqtt_url, settings.topic_prefix, settings.discovery_port, settings.node_port) == (
        "mqtt://127.0.0.1:1883",
        "hacer",
        7775,
        7777,
    )
    assert settings.offline_after is None and settings.database_url.startswith("sqlite:///")
    db = tmp_path / "x.db"
    assert Settings.from_env({"HADB_PATH": str(db)}).database_url == f"sqlite:///{db}"
    assert (
        Settings.from_env({"HADB_PATH": str(db), "HACER_DATABASE_URL": "postgresql://h/db"}).database_url
        == "postgresql://h/db"
    )
    assert Settings.from_env({"HACER_OFFLINE_AFTER": "90"}).offline_after == 90.0
    for bad in (
        {"HACER_DISCOVERY_PORT": "x"},
        {"HACER_NODE_PORT": "70000"},
        {"HACER_TOPIC_PREFIX": "a/#"},
        {"HACER_OFFLINE_AFTER": "-1"},
    ):
        with pytest.raises(SettingsError):
            Settings.from_env(bad)


def children_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def process_name(pid):
    """The name runserver gives a part it forks (`hacer-<part>`), or the program's."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_the_api_stops_cleanly_on_a_signal(spawn, hacer_env, how):
    port = free_port()
    api = spawn(["api"], {**hacer_env, "HACER_HTTP_PORT": str(port)})
    wait_until(lambda: port_answers("127.0.0.1", port), 20, "the api")
    assert children_of(api.process.pid) == [], "the api starts no recorder of its own any more"
    api.process.send_signal(how)
    assert api.process.wait(15) == 0, api.output()
    assert "api stopped" in api.output()


def test_runserver_restarts_a_recorder_that_dies(spawn, hacer_env, broker, watch):
    states = watch("hacer/recorders/+/state")
    server = spawn(["runserver", "--split"], {**hacer_env, "HACER_HTTP_PORT": str(free_port())})
    states.wait_for(lambda m: b'"online"' in m.payload, timeout=20)
    recorder = wait_until(
        lambda: [p for p in children_of(server.process.pid) if process_name(p) == "hacer-recorder"],
        10,
        "runserver's recorder",
    )[0]
    seen = len(states.messages)
    os.kill(recorder, signal.SIGKILL)
    states.wait_for(lambda m: b'"offline"' in m.payload, timeout=30, start=seen)  # its last will
    states.wait_for(lambda m: b'"online"' in m.payload, timeout=30, start=seen)
    assert "recorder exited with -9; restarting it" in server.output()
    assert server.stop() == 0, server.output()


def status(env, *args):
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_exit_code_says_what_is_down(spawn, hacer_env, watch):
    done = status(hacer_env, "--expect", "bridge")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "problems   no bridge online; the database has no schema: run `manage.py initdb`" in done.stdout
    Database(f"sqlite:///{hacer_env['HADB_PATH']}").init()
    state = watch("hacer/bridge/state")
    bridge = spawn(["bridge"], hacer_env)
    state.wait_for(lambda m: m.payload == b"online", timeout=20)
    done = status(hacer_env, "--expect", "bridge")
    assert done.returncode == 0, done.stdout
    assert re.search(r"^bridge +online +\d+ datagrams", done.stdout, re.MULTILINE), done.stdout
    done = status(hacer_env)  # every part expected: the others are not running
    assert done.returncode == 1 and "no runner online; no recorder online" in done.stdout
    bridge.stop()
    state.wait_for(lambda m: m.payload == b"offline", timeout=20)
    done = status(hacer_env, "--expect", "bridge")
    assert done.returncode == 1 and re.search(r"^bridge +offline", done.stdout, re.MULTILINE), done.stdout


def test_status_exit_code_when_the_broker_is_away(hacer_env):
    done = status({**hacer_env, "HACER_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}, "--timeout", "1")
    assert done.returncode == 2 and "unreachable" in done.stdout, done.stdout + done.stderr


def test_log_settings_level_format_and_files(hacer_env, tmp_path):
    with pytest.raises(SettingsError, match="HACER_LOG_FORMAT='xml' is not one of text, json"):
        Settings.from_env({"HACER_LOG_FORMAT": "xml"})
    env = {**hacer_env, "HACER_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "initdb"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert {(line["part"], line["level"]) for line in lines} >= {("initdb", "INFO")}
    assert any(line["message"].startswith("database ready") for line in lines)
    for level, shown in (("warning", False), ("info", True)):
        logs = tmp_path / f"logs-{level}"
        env = {**hacer_env, "HACER_LOG_DIR": str(logs), "HACER_LOG_LEVEL": level}
        done = subprocess.run(
            [sys.executable, str(PROJECT_DIR / "manage.py"), "initdb"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr  # all of it in the file
        assert ("database ready" in (logs / "initdb.log").read_text()) is shown


def test_log_files_rotate(tmp_path):
    import logging

    from hacer.logs import setup_logging

    root = logging.getLogger()
    kept_handlers, kept_level = root.handlers[:], root.level  # pytest's own capture among them
    settings = Settings.from_env(
        {"HACER_LOG_DIR": str(tmp_path), "HACER_LOG_MAX_BYTES": "1024", "HACER_LOG_BACKUPS": "1"}
    )
    try:
        setup_logging(settings, "part")
        for n in range(200):
            logging.getLogger("t").info("line %d", n)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in kept_handlers:
            root.addHandler(handler)
        root.setLevel(kept_level)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["part.log", "part.log.1"]
    assert all(path.stat().st_size <= 1024 for path in tmp_path.iterdir())
    assert "line 199" in (tmp_path / "part.log").read_text()


def test_runserver_runs_every_part_in_one_process(spawn, hacer_env):
    env = {**hacer_env, "HACER_HTTP_PORT": str(free_port())}
    server = spawn(["runserver"], env)
    wait_until(lambda: status(env).returncode == 0, 60, "every part online (manage.py status)")
    names = [process_name(pid) for pid in children_of(server.process.pid)]
    assert names == ["hacer-parts"], names
    # The api on gunicorn's threaded worker: REST and a websocket client, both answered by that one process.
    url = f"http://127.0.0.1:{env['HACER_HTTP_PORT']}"
    assert requests.get(f"{url}/api/node_types", timeout=10).status_code == 200
    client = socketio.Client()
    snapshots = []
    client.on("snapshot", snapshots.append)
    client.connect(url, transports=["websocket"], wait_timeout=10)
    try:
        wait_until(lambda: snapshots, 10, "the live snapshot over the websocket")
    finally:
        client.disconnect()
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "run", "test", "together"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "test script running with ['together']" in done.stdout, done.stderr
    wait_until(
        lambda: json.loads(status(env, "--json").stdout)["database"]["runs"]["ended_last_day"].get("succeeded"),
        30,
        "the run recorded",
    )
    assert server.stop() == 0, server.output()


def test_runserver_restarts_its_broker_when_it_dies_and_says_so(spawn, hacer_env):
    port = free_port()
    env = {**hacer_env, "HACER_MQTT_URL": f"mqtt://127.0.0.1:{port}", "HACER_HTTP_PORT": str(free_port())}
    server = spawn(["runserver", "--split"], env)
    wait_until(lambda: status(env).returncode == 0, 60, "every part online")
    names = {process_name(pid): pid for pid in children_of(server.process.pid)}
    assert sorted(names) == [
        "hacer-api",
        "hacer-bridge",
        "hacer-recorder",
        "hacer-runner",
        "hacer-scheduler",
        "mosquitto",
    ]
    broker = [names["mosquitto"]]
    os.kill(broker[0], signal.SIGKILL)
    wait_until(lambda: "broker exited with -9; restarting it" in server.output(), 15, "the supervisor to say so")
    wait_until(lambda: status(env).returncode == 0, 60, "every part online again, through the new broker")
    assert server.stop() == 0, server.output()
    assert not port_answers("127.0.0.1", port), "mosquitto outlived runserver"


@pytest.mark.parametrize("layout,runner_process", [([], "hacer-parts"), (["--split"], "hacer-runner")])
def test_what_a_killed_runners_scripts_left_running_ends_under_runserver(
    layout, runner_process, spawn, hacer_env, tmp_path
):
    """A SIGKILLed runner takes its fork server and runs with it; what they started (in a session and
    an environment of its own) is given to runserver, which ends it."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    pid_file = tmp_path / "hidden.pid"
    (scripts / "hide.py").write_text(
        "import subprocess, time\n"
        f"subprocess.run(['sh', '-c', 'env -i setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {pid_file}'])\n"
        "print('hidden', flush=True)\n"
        "time.sleep(300)\n"
    )
    port = free_port()
    env = {
        **hacer_env,
        "HACER_MQTT_URL": f"mqtt://127.0.0.1:{port}",
        "HACER_HTTP_PORT": str(free_port()),
        "HACER_SCRIPTS_DIR": str(scripts),
    }
    server = spawn(["runserver", *layout], env)
    wait_until(lambda: status(env).returncode == 0, 60, "every part online")
    requests.post(f"http://127.0.0.1:{env['HACER_HTTP_PORT']}/api/scripts/exec/name/hide", json={}, timeout=10)
    hidden = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 20, "the hidden sleep"))
    runner = next(pid for pid in children_of(server.process.pid) if process_name(pid) == runner_process)
    os.kill(runner, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{hidden}"), 20, "the sleep the killed runner's script left")
    assert "left behind by a part that died" in server.output()
    assert server.stop() == 0, server.output()


def test_automation_next_lists_the_fires_from_a_time_asked_for(hacer_env):
    def manage(*words):
        return subprocess.run(
            [sys.executable, "manage.py", "automation", *words], env=hacer_env, cwd=PROJECT_DIR, capture_output=True
        )

    night = {"name": "night", "script": "toggle", "params": ["1000", "0"],
             "trigger": {"kind": "cron", "cron": "30 2 * * *", "tz": "Europe/Madrid"}}  # fmt: skip
    assert manage("add", json.dumps(night)).returncode == 0
    # Madrid skips 02:00-03:00 on 28 March 2027: that night's fire comes at 03:00, as Debian's cron does.
    listed = manage("next", "night", "--from", "2027-03-27T02:30", "--count", "3")
    assert json.loads(listed.stdout)["next_fires"] == [
        "2027-03-27T01:30:00+00:00",
        "2027-03-28T01:00:00+00:00",
        "2027-03-29T00:30:00+00:00",
    ]
    refused = manage("next", "night", "--from", "27 March")
    assert refused.returncode == 1 and b"bad start time '27 March'" in refused.stderr


def test_a_for_wait_fires_once_across_a_whole_server_restart(spawn, hacer_env, watch, tmp_path):
    """A node silent for its `for`: runserver stopped and started again in the middle, one fire at its time."""
    from sqlalchemy import select

    from hacer.models import AutomationFire, AutomationWait

    env = {**hacer_env, "HACER_HTTP_PORT": str(free_port()), "HACER_OFFLINE_AFTER": "1.5"}
    presence = watch("hacer/nodes/5100/presence")
    fired = watch("hacer/automations/+/fired")
    node = spawn(["emulate", "--count", "1", "--types", "toggle", "--interval", "0.5", "--first-ip", "127.0.0.40",
                  "--base-id", "5100"], env, name="emulate")  # fmt: skip
    server = spawn(["runserver"], env, name="runserver")
    presence.wait_for(lambda m: Presence.from_payload(m.payload).state == "online", timeout=30)
    gone = {
        "name": "gone",
        "script": "test",
        "trigger": {"kind": "presence", "node": 5100, "becomes": "offline", "for": 8},
    }
    added = subprocess.run([sys.executable, "manage.py", "automation", "add", json.dumps(gone)], env=env,
                           cwd=PROJECT_DIR, capture_output=True)  # fmt: skip
    assert added.returncode == 0, added.stderr
    node.stop(kill=True)  # the node falls silent
    since = Presence.from_payload(
        presence.wait_for(lambda m: Presence.from_payload(m.payload).state == "offline", timeout=30).payload
    ).since
    database = Database(f"sqlite:///{env['HADB_PATH']}")
    with database.session() as session:
        wait_until(lambda: session.scalars(select(AutomationWait)).all(), 20, "the wait written")
    server.stop()  # the whole server, in the middle of the wait
    spawn(["runserver"], env, name="runserver-again")
    message = fired.wait_for(lambda m: True, timeout=60)
    assert datetime.fromisoformat(json.loads(message.payload)["due"]) == since + timedelta(seconds=8)
    wait_until(lambda: runs_ended(env), 30, "the fire's run to end")
    with database.session() as session:
        assert len(session.scalars(select(AutomationFire)).all()) == 1
    assert len(fired.messages) == 1


def runs_ended(env: dict[str, str]) -> bool:
    from sqlalchemy import select

    from hacer.models import Run

    with Database(f"sqlite:///{env['HADB_PATH']}").session() as session:
        states = session.scalars(select(Run.state)).all()
    return bool(states) and all(state == "succeeded" for state in states)
