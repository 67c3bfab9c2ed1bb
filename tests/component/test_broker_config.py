"""The production broker config: authentication, the per-role ACL, and the bridge running under it."""

import os
import signal
import subprocess
import sys

import pytest

from emulator.nodes import EmulatedNode, Emulator
from hacer.bus import Bus, BusError
from hacer.messages import Presence
from hacer.settings import PROJECT_DIR
from hacer.topics import Topics
from ops.brokerusers import USERS

from support import Watcher, free_port, start_production_broker, url, wait_until


def test_anonymous_and_wrong_password_refused(connect, production_broker):
    with pytest.raises(BusError):
        connect(None, wait=False).wait_connected(1.5)
    bad = Bus(f"mqtt://viewer:wrong@127.0.0.1:{production_broker.port}", Topics(), "bad")
    bad.start()
    try:
        with pytest.raises(BusError):
            bad.wait_connected(1.5)
    finally:
        bad.stop()


def test_viewer_reads_everything_and_writes_nothing(connect):
    topics = Topics()
    api = connect("hacer-api")
    seen = Watcher(api, "hacer/#")
    api.sync()
    viewer = connect("viewer")
    watched = Watcher(viewer, "hacer/#")
    viewer.sync()
    viewer.publish(topics.build("node_set", 5), '{"on": 1}')
    viewer.publish(topics.build("run_request"), '{"script": "toggle"}')
    # The viewer's own sync marker is allowed; had the set gone through, it would arrive first.
    marker = viewer.topics.build("client_sync", viewer.client_id)
    viewer.publish(marker, "after")
    seen.wait_for(lambda m: m.topic == marker and m.payload == b"after")
    assert [m.topic for m in seen.messages if "sync" not in m.topic] == []
    api.publish(topics.build("node_meta", 5), '{"id": 5, "name": "lamp", "type": "toggle"}', retain=True)
    watched.wait_for(lambda m: m.topic == topics.build("node_meta", 5))


def test_only_the_recorder_says_what_is_recorded(connect):
    topics = Topics()
    viewer = connect("viewer")
    seen = Watcher(viewer, topics.build("runs_recorded"))
    viewer.sync()
    forged = b'{"recorder":"x","runs":{"r1":{"seq":9,"state":"succeeded"}}}'
    for role in ("hacer-runner", "hacer-api", "hacer-bridge"):
        forger = connect(role)
        forger.publish(topics.build("runs_recorded"), forged, qos=1)
        forger.sync()  # the broker has handled that publish: had it been allowed, it is on its way
    real = b'{"recorder":"x","runs":{"r1":{"seq":1,"state":"running"}}}'
    connect("hacer-recorder").publish(topics.build("runs_recorded"), real, qos=1)
    assert seen.wait_for(lambda m: True).payload == real and len(seen.messages) == 1


def test_bridge_works_under_its_role(production_broker, spawn, hacer_env, connect):
    env = {**hacer_env, "HACER_MQTT_URL": url(production_broker, "hacer-bridge")}
    viewer = connect("viewer")
    presence = Watcher(viewer, "hacer/nodes/+/presence")
    state = Watcher(viewer, "hacer/bridge/state")
    viewer.sync()
    spawn(["bridge"], env)
    state.wait_for(lambda m: m.payload == b"online", timeout=15)
    node = EmulatedNode(31337, "toggle", "127.0.0.20")
    Emulator([], ("127.0.0.1", int(env["HACER_DISCOVERY_PORT"])), serve_tcp=False).send_beacon(node)
    got = Presence.from_payload(presence.wait_for(lambda m: True).payload)
    assert (got.id, got.ip) == (31337, "127.0.0.20")


@pytest.mark.parametrize("kill", [False, True])
def test_dev_broker_keeps_retained_messages_across_a_restart_and_a_kill_after_its_save(broker, make_bus, watch, kill):
    # It saves every 5 minutes (a speed setting: hacer's parts resend what is not confirmed), and on a
    # clean stop; SIGUSR1 asks for the periodic save now.
    store = broker.work_dir / "data" / "mosquitto.db"
    bus = make_bus()
    for index in range(50):
        bus.publish(f"hacer/nodes/{index}/presence", f'{{"n": {index}}}', retain=True)
    bus.sync()  # every publish before the marker has been acknowledged
    if kill:
        # A save writes a new file and renames it over the old: a new inode. (Its mtime is the
        # kernel's coarse clock, which can be behind time.time_ns() taken just before it.)
        before = store.stat().st_ino if store.exists() else None
        os.kill(broker.process.pid, signal.SIGUSR1)
        wait_until(lambda: store.exists() and store.stat().st_ino != before, 30, "the save")
    broker.restart(kill=kill)
    kept = watch("hacer/nodes/+/presence")
    assert len(kept.messages) == 50 and all(m.retain for m in kept.messages)


def test_publish_confirmed_returns_only_once_the_broker_has_acknowledged(broker, make_bus, watch):
    bus = make_bus()
    metas = [(f"hacer/nodes/{index}/meta", f'{{"n": {index}}}') for index in range(50)]
    os.kill(broker.process.pid, signal.SIGSTOP)  # a broker that takes them but answers nothing yet
    try:
        with pytest.raises(BusError, match="not confirmed within"):
            bus.publish_confirmed(metas, retain=True, timeout=1)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    bus.publish_confirmed(metas, retain=True)
    assert len(watch("hacer/nodes/+/meta").messages) == 50
    broker.stop()
    wait_until(lambda: not bus.connected, 10, "the bus to see the broker gone")
    with pytest.raises(BusError, match="not confirmed"):
        bus.publish_confirmed(metas[:1], timeout=1)


def test_scheduler_works_under_its_role(production_broker, spawn, hacer_env, connect):
    topics = Topics()
    env = {**hacer_env, "HACER_MQTT_URL": url(production_broker, "hacer-scheduler"), "HACER_SCHEDULER_ID": "s1"}
    viewer = connect("viewer")
    state = Watcher(viewer, topics.build("scheduler_state", "s1"))
    viewer.sync()
    spawn(["scheduler"], env)
    state.wait_for(lambda m: m.payload == b"online", timeout=15)
    # What its bus triggers read (the topics it subscribes to), each published by the role that owns it.
    from scheduler.service import BUS_TOPICS

    scheduler = connect("hacer-scheduler")
    read = Watcher(scheduler, "hacer/#")
    scheduler.sync()
    owner = {"node_presence": "hacer-bridge", "node_readings": "hacer-bridge", "run_status": "hacer-runner"}
    sent = [(owner[name], topics.build(name, 7)) for name in BUS_TOPICS]
    for role, topic in sent:
        connect(role).publish(topic, b"{}", qos=1)
    for _, topic in sent:
        read.wait_for(lambda m, topic=topic: m.topic == topic)


def read_env(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_broker_users_makes_the_production_broker_and_each_parts_url(tmp_path, hacer_env, spawn):
    passwords, env_dir, port = tmp_path / "hacer.passwd", tmp_path / "etc", free_port()
    command = [sys.executable, str(PROJECT_DIR / "manage.py"), "broker-users", "--password-file", str(passwords),
               "--env-dir", str(env_dir), "--port", str(port)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert oct(passwords.stat().st_mode & 0o777) in ("0o600", "0o640")
    files = {path.name: read_env(path) for path in env_dir.iterdir()}
    assert sorted(files) == sorted(f"{user}.env" for user in USERS)
    assert files["hacer-runner.env"]["HACER_SCRIPT_MQTT_URL"] == files["hacer-script.env"]["HACER_MQTT_URL"]
    broker = start_production_broker(tmp_path, passwords, port)
    try:
        viewer = Bus(files["viewer.env"]["HACER_MQTT_URL"], Topics(), "viewer-test")
        state = Watcher(viewer, "hacer/bridge/state")
        viewer.start()
        viewer.wait_connected(5)
        viewer.sync()
        spawn(["bridge"], {**hacer_env, **files["hacer-bridge.env"]})  # as its systemd unit starts it
        state.wait_for(lambda m: m.payload == b"online", timeout=15)
        viewer.stop()
        again = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "new passwords for: none" in again.stdout, again.stdout + again.stderr
        assert {path.name: read_env(path) for path in env_dir.iterdir()} == files  # running parts stay connected
        renewed = subprocess.run([*command, "--new-passwords"], capture_output=True, text=True, timeout=60)
        assert renewed.returncode == 0
        assert read_env(env_dir / "viewer.env") != files["viewer.env"]
    finally:
        broker.stop()


def test_a_broker_whose_second_listener_cannot_be_had_does_not_pass_for_started(tmp_path):
    # mosquitto may answer on its first port, then exit on the second: start() must say so.
    import socket

    from ops.broker import CONFIG_DIR, BrokerError, BrokerProcess

    template = tmp_path / "two-listeners.conf"
    template.write_text((CONFIG_DIR / "dev.conf").read_text() + "\nlistener 1884 127.0.0.1\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: mosquitto cannot have it, and nothing answers on it
        broker = BrokerProcess(tmp_path / "broker", [free_port(), taken.getsockname()[1]], template=template)
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()
