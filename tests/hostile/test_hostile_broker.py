"""A curious user with a broker account: the production ACL holds against the viewer and scripts."""

from __future__ import annotations

import uuid

import pytest

from hacer.bus import Bus, BusError
from hacer.messages import RunRequest
from hacer.topics import Topics

from support import Watcher, url, wait_until


def test_a_viewer_cannot_join_the_runners_group_so_a_request_sent_once_still_runs(
    connect, production_broker, spawn, hacer_env, make_bus
):
    # Mosquitto 2.0's ACL file grants every subscription and filters at delivery: a viewer in the
    # runners' group would be dealt requests the broker then drops. The group's name is keyed
    # with the runners' password, so the viewer's `$share/hacer-runners/...` is a group of its own.
    topics = Topics()
    viewer = Bus(url(production_broker, "viewer"), topics, f"viewer-{uuid.uuid4().hex[:6]}")
    taken_by_viewer = Watcher(viewer, Topics.shared("hacer-runners", topics.build("run_request")))
    viewer.start()
    viewer.wait_connected(5)
    runner_env = {
        **hacer_env,
        "HACER_MQTT_URL": url(production_broker, "hacer-runner"),
        "HACER_RUNNER_ID": f"r-{uuid.uuid4().hex[:6]}",
    }
    observer = connect("hacer-api")
    runner_state = Watcher(observer, topics.build("runner_state", runner_env["HACER_RUNNER_ID"]))
    statuses = Watcher(observer, topics.filter("run_status"))
    spawn(["runner"], runner_env)
    runner_state.wait_for(lambda m: b'"online"' in m.payload, timeout=20)
    requester = connect("hacer-api")
    run_ids = [f"once-{index}-{uuid.uuid4().hex[:6]}" for index in range(6)]
    for run_id in run_ids:  # each published once, as a bare mosquitto_pub would
        requester.publish(topics.build("run_request"), RunRequest("test", ("x",), run_id=run_id).to_payload())
    for run_id in run_ids:
        statuses.wait_for(lambda m, run_id=run_id: m.topic == topics.build("run_status", run_id), timeout=20)
    viewer.sync()
    assert taken_by_viewer.messages == []
    viewer.stop()


def test_a_script_cannot_pose_as_a_runner_or_write_a_runs_log(connect):
    topics = Topics()
    api = connect("hacer-api")  # reads everything
    seen = Watcher(api, "hacer/#")
    api.sync()
    script = connect("hacer-script")
    script.publish(topics.build("run_status", "r1"), b'{"run_id":"r1","state":"succeeded"}')
    script.publish(topics.build("run_log", "r1"), b'{"run_id":"r1","seq":1}')
    script.publish(topics.build("runner_state", "r"), b'{"runner":"r","state":"offline"}')
    script.publish(topics.build("runs_recorded"), b'{"recorder":"x","runs":{}}')
    script.publish(topics.build("node_set", 5), b'{"on": 1}')  # what scripts are for
    script.publish(topics.build("run_request"), b'{"script": "toggle"}')
    seen.wait_for(lambda m: m.topic == topics.build("run_request"))
    assert [m.topic for m in seen.messages if "clients" not in m.topic] == [
        topics.build("node_set", 5),
        topics.build("run_request"),
    ]


def test_the_home_network_gets_tls_and_plain_mqtt_stays_on_loopback(production_broker):
    from ops.broker import render_config

    tls_port = production_broker.ports[1]
    certificate = production_broker.tls_files[0]
    secure = Bus(
        f"mqtts://viewer:viewer-secret@127.0.0.1:{tls_port}?ca={certificate}", Topics(), f"tls-{uuid.uuid4().hex[:6]}"
    )
    secure.start()
    try:
        secure.wait_connected(10)
        secure.sync()  # subscribed and read back over TLS
    finally:
        secure.stop()
    untrusted = Bus(f"mqtts://viewer:viewer-secret@127.0.0.1:{tls_port}", Topics(), "tls-untrusted")
    untrusted.start()
    try:  # a certificate the system does not trust is refused without the ca
        with pytest.raises(BusError):
            untrusted.wait_connected(2)
    finally:
        untrusted.stop()
    rendered = render_config(production_broker.template, [1883, 8883], production_broker.work_dir)
    listeners = [line.split()[1:] for line in rendered.splitlines() if line.startswith("listener")]
    assert listeners == [["1883", "127.0.0.1"], ["8883", "0.0.0.0"]]


def test_a_user_cannot_take_over_a_parts_session_by_its_guessable_client_id(connect, production_broker):
    import paho.mqtt.client as paho

    topics = Topics()
    runner = Bus(
        url(production_broker, "hacer-runner"), topics, "hacer-runner-r1", clean_start=False, session_expiry=600
    )
    connects = []
    runner.on_connect(connects.append)
    runner.start()
    try:
        runner.wait_connected(5)
        assert runner.client_id.startswith("hacer-runner-r1-")
        hostile = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="hacer-runner-r1", protocol=paho.MQTTv5)
        hostile.username_pw_set("viewer", "viewer-secret")
        hostile.connect("127.0.0.1", production_broker.port)
        hostile.loop_start()
        try:
            wait_until(hostile.is_connected, 5, "the hostile client to connect")
            runner.sync()  # had the session been taken over, this returns after a reconnect
            assert connects == [False] and runner.connected
        finally:
            hostile.loop_stop()
            hostile.disconnect()
        # Nor can a viewer learn the private id: it reads no other client's sync topic.
        viewer = connect("viewer")
        seen = Watcher(viewer, "hacer/#")
        viewer.sync()
        runner.sync()
        viewer.sync()
        assert [m.topic for m in seen.messages if "/clients/" in m.topic and viewer.client_id not in m.topic] == []
    finally:
        runner.stop()


def test_a_client_may_send_answered_commands_only_under_its_own_id(connect):
    topics = Topics()
    api = connect("hacer-api")  # reads everything
    seen = Watcher(api, topics.filter("client_command"))
    api.sync()
    script = connect("hacer-script")
    victim = connect("hacer-script")
    script.publish(
        topics.build("client_command", victim.client_id), b'{"node": 5, "get": "on"}', correlation=b"as another"
    )
    script.publish(
        topics.build("client_command", script.client_id), b'{"node": 5, "get": "on"}', correlation=b"as itself"
    )
    seen.wait_for(lambda m: m.correlation == b"as itself")
    api.sync()
    assert [m.correlation for m in seen.messages] == [b"as itself"]
