"""The api app alone: Flask's and Flask-SocketIO's test clients, a recording bus, SQLite.

What crosses processes is proven in test_api.py against the real system; these pin down the
app's own behaviour quickly and run it in Flask-SocketIO's `threading` mode.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from api.app import create_app
from hacer.bus import Message, decoding
from hacer.messages import Presence, RunRequest, bus_time
from hacer.models import Database, Node
from hacer.settings import Settings
from hacer.topics import Topics

T1 = bus_time(1.0)


class RecordingBus:
    """Records publishes; lets the test deliver messages to the subscribed handlers."""

    def __init__(self) -> None:
        self.topics = Topics()
        self.published: list[tuple[str, bytes, bool]] = []
        self.handlers: list[tuple[str, object]] = []
        self.drained_hooks: list[object] = []
        self.connected = True
        self.client_id = "recording-bus"
        self.refused: dict[str, int] = {}

    def subscribe(self, topic_filter, handler, **options) -> None:
        self.handlers.append((topic_filter, handler))

    def subscribe_decoded(self, topic_filter, decode, handler, **options) -> None:
        self.subscribe(topic_filter, decoding(topic_filter, decode, handler, self.refused))

    def on_drained(self, hook) -> None:
        self.drained_hooks.append(hook)

    def private_group(self, group: str) -> str:
        return group

    def publish(self, topic, payload, *, qos=1, retain=False, correlation=None, **options) -> bool:
        self.published.append((topic, payload.encode() if isinstance(payload, str) else payload, retain))
        return True

    def deliver(self, topic: str, payload: bytes, retain: bool = False, burst_ends: bool = True) -> None:
        from paho.mqtt.client import topic_matches_sub

        for topic_filter, handler in self.handlers:
            if topic_filter.startswith("$share/"):  # $share/<group>/<filter>
                topic_filter = topic_filter.split("/", 2)[2]
            if topic_matches_sub(topic_filter, topic):
                handler(Message(topic, payload, retain, 1))
        for hook in self.drained_hooks if burst_ends else ():
            hook()


@pytest.fixture
def app(tmp_path):
    settings = Settings.from_env({"HADB_PATH": str(tmp_path / "api.db"), "HACER_SCRIPTS_DIR": str(tmp_path)})
    (tmp_path / "lamp.py").write_text("print('on')\n")
    Database(settings.database_url).init()
    bus = RecordingBus()
    app = create_app({"HACER_SETTINGS": settings, "HACER_BUS": bus, "ASYNC_MODE": "threading", "TESTING": True})
    with Database(settings.database_url).session() as session:
        session.add(Node(id=7, name=None, type_id=1, ip="10.0.0.7"))
        session.commit()
    app.bus = bus
    return app


def test_rename_without_content_type_publishes_retained_meta(app):
    client = app.test_client()
    answer = client.post("/api/nodes/id/7", data='{"name": "lamp"}', content_type="text/plain")
    assert answer.status_code == 200 and answer.get_json()["success"] is True
    assert app.bus.published == [("hacer/nodes/7/meta", b'{"id":7,"name":"lamp","type":"toggle"}', True)]
    assert client.get("/api/nodes/name/lamp").get_json()["ip"] == "10.0.0.7"


def test_exec_records_the_run_and_publishes_the_request(app):
    client = app.test_client()
    body = client.post("/api/scripts/exec/name/lamp", data=json.dumps({"params": ["7", 1]})).get_json()
    assert body["status"] == "ok" and body["log_thread_id"] == 1
    topic, payload, retain = app.bus.published[-1]
    request = RunRequest.from_payload(payload)
    assert (topic, retain, request.script, request.params, request.run_id) == (
        "hacer/runs/request",
        False,
        "lamp",
        ("7", "1"),
        body["run_id"],
    )
    assert client.get(f"/api/runs/{body['log_thread_id']}").get_json()["state"] == "queued"


def test_errors_are_json(app):
    client = app.test_client()
    assert client.get("/api/nodes/id/99").get_json() == {"error": "not found", "message": "no node with id 99"}
    assert client.post("/api/nodes/id/7", data="[").status_code == 400
    assert client.put("/api/nodes").get_json()["error"] == "method not allowed"
    assert client.post("/api/nodes/id/7", data="x" * 70_000).get_json()["error"] == "too large"


def test_websocket_snapshot_then_live_node_event(app):
    ws = app.extensions["socketio"].test_client(app)
    snapshot = next(r for r in ws.get_received() if r["name"] == "snapshot")["args"][0]
    assert snapshot["nodes"] == [] and snapshot["seq"] == 0
    presence = Presence(7, "toggle", "10.0.0.7", "online", T1, T1)
    app.bus.deliver("hacer/nodes/7/presence", presence.to_payload(), retain=True)
    event = next(r for r in ws.get_received() if r["name"] == "event")["args"][0]
    assert (event["seq"], event["kind"], event["data"]["state"]) == (1, "node", "online")
    ws.emit("resume", {"seq": 0})
    assert [r["args"][0]["seq"] for r in ws.get_received()] == [1]
    ws.disconnect()


def test_node_messages_that_change_nothing_send_no_event(app):
    from hacer.messages import NodeMeta

    ws = app.extensions["socketio"].test_client(app)
    ws.get_received()
    presence = Presence(7, "toggle", "10.0.0.7", "online", T1, T1).to_payload()
    app.bus.deliver("hacer/nodes/7/presence", presence, retain=True)
    app.bus.deliver("hacer/nodes/7/meta", NodeMeta(7, "", "toggle").to_payload(), retain=True)  # no name yet
    app.bus.deliver("hacer/nodes/7/presence", presence, retain=True)  # the retained copy, again
    app.bus.deliver("hacer/nodes/7/meta", NodeMeta(7, "lamp", "toggle").to_payload(), retain=True)
    events = [r["args"][0] for r in ws.get_received() if r["name"] == "event"]
    assert [(e["seq"], e["data"]["name"]) for e in events] == [(1, ""), (2, "lamp")]
    ws.disconnect()


def test_what_one_burst_changes_of_a_node_is_one_event(app):
    from hacer.messages import NodeReadings, NodeValues, Reading

    ws = app.extensions["socketio"].test_client(app)
    ws.get_received()
    # A new node, as the bridge announces it: presence, readings, then values read at once.
    burst = [
        ("hacer/nodes/7/presence", Presence(7, "toggle", "10.0.0.7", "online", T1, T1).to_payload()),
        ("hacer/nodes/7/readings", NodeReadings(7, {"on": Reading(1, T1)}, True, T1).to_payload()),
        ("hacer/nodes/7/state", NodeValues({"on": 1}).to_payload()),
        ("hacer/nodes/8/presence", Presence(8, "toggle", "10.0.0.8", "online", T1, T1).to_payload()),
    ]
    for index, (topic, payload) in enumerate(burst):
        app.bus.deliver(topic, payload, retain=True, burst_ends=index == len(burst) - 1)
    events = [r["args"][0] for r in ws.get_received() if r["name"] == "event"]
    assert [(e["seq"], e["data"]["id"]) for e in events] == [(1, 7), (2, 8)]
    assert (events[0]["data"]["state"], events[0]["data"]["values"], events[0]["data"]["answering"]) == (
        "online",
        {"on": 1},
        True,
    )
    # Removed in the burst that changed it: the removal alone.
    app.bus.deliver("hacer/nodes/8/state", NodeValues({"on": 0}).to_payload(), retain=True, burst_ends=False)
    app.bus.deliver("hacer/nodes/8/presence", b"", retain=True)
    events = [r["args"][0] for r in ws.get_received() if r["name"] == "event"]
    assert [(e["kind"], e["data"]) for e in events] == [("node_removed", {"id": 8})]
    ws.disconnect()


def test_a_late_watcher_gets_the_runs_kept_log(app):
    from hacer.messages import LogEntry

    for seq, entry_type in enumerate(["launch", "output", "exit_status"], start=1):
        app.bus.deliver("hacer/runs/r1/log", LogEntry("r1", seq, T1, entry_type, "x").to_payload())
    ws = app.extensions["socketio"].test_client(app)
    ws.get_received()
    ws.emit("watch_run", {"run_id": "r1"})
    replayed = [r["args"][0]["data"] for r in ws.get_received() if r["name"] == "event"]
    assert [(e["run_id"], e["seq"], e["entry_type"]) for e in replayed] == [
        ("r1", 1, "launch"),
        ("r1", 2, "output"),
        ("r1", 3, "exit_status"),
    ]
    ws.disconnect()


def test_a_log_entry_told_during_a_late_watchers_replay_comes_after_it():
    """The bus's thread tells a new entry while the api's thread replays the kept ones: in order."""
    import threading

    from api import live as live_module
    from hacer.messages import LogEntry

    bus = RecordingBus()
    view = live_module.LiveView(bus, bus.topics)  # type: ignore[arg-type]
    view.subscribe()
    sent: list[object] = []
    view.add_listener(lambda event: sent.append(event["seq"]))
    bus.deliver("hacer/runs/r1/log", LogEntry("r1", 1, T1, "launch", "").to_payload())
    sent.clear()
    live_entry = threading.Thread(
        target=bus.deliver, args=("hacer/runs/r1/log", LogEntry("r1", 2, T1, "output", "x").to_payload())
    )
    with view.held_back():
        live_entry.start()
        live_entry.join(timeout=0.5)  # without the hold it is told within this
        sent.extend(("replayed", event["seq"]) for event in view.room_events("run:r1"))
    live_entry.join()
    assert sent[0] == ("replayed", 1)
    assert sent[-1] == 2  # told after the replay, whether the replay included it or not


def test_the_kept_run_logs_are_bounded_in_bytes_the_latest_runs_first_kept():
    from api import live as live_module
    from hacer.messages import LogEntry

    bus = RecordingBus()
    view = live_module.LiveView(bus, bus.topics)  # type: ignore[arg-type]
    view.subscribe()
    line = "x" * 60_000
    for run in range(400):  # 400 runs of 10 long lines: 240 MB of text, were it all kept
        for seq in range(1, 11):
            bus.deliver(f"hacer/runs/run{run}/log", LogEntry(f"run{run}", seq, T1, "output", line).to_payload())
    kept = {room: len(view.room_events(room)) for room in (f"run:run{run}" for run in range(400))}
    held = sum(count for count in kept.values()) * (len(line) + live_module.ENTRY_OVERHEAD)
    assert held <= live_module.ROOM_BYTES
    assert kept["run:run399"] == 10 and kept["run:run0"] == 0  # the latest runs whole, the oldest gone
    assert view.room_logs.bytes == held


def test_the_recorder_has_a_new_nodes_meta_confirmed_before_the_api_can_see_the_node(tmp_path):
    # Otherwise a rename or delete the api publishes at once could reach the broker first,
    # and this blank meta would then overwrite it.
    from hacer.messages import NodeMeta
    from recorder.service import Recorder

    from support import wait_until

    database = Database(f"sqlite:///{tmp_path / 'recorder.db'}")
    database.init()
    visible_at_confirm = []

    class ConfirmingBus(RecordingBus):
        def start(self):
            pass

        def stop(self, end_session=False):
            pass

        def ack(self, message):
            pass

        def publish_confirmed(self, messages, *, retain=False, timeout=10.0):
            with database.session() as session:  # what the api would see now
                visible_at_confirm.extend(session.get(Node, 42) for _ in messages)
            for topic, payload in messages:
                self.publish(topic, payload, retain=retain)

    bus = ConfirmingBus()
    recorder = Recorder(bus, bus.topics, database.session)
    recorder.start()
    try:
        bus.deliver(
            bus.topics.build("node_presence", 42), Presence(42, "toggle", "10.0.0.42", "online", T1, T1).to_payload()
        )
        wait_until(lambda: recorder.written == 1, 10, "the presence recorded")
    finally:
        recorder.stop()
    assert visible_at_confirm == [None]
    assert bus.published == [(bus.topics.build("node_meta", 42), NodeMeta(42, "", "toggle").to_payload(), True)]
    with database.session() as session:
        assert session.get(Node, 42) is not None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_late_status_never_reopens_a_run_another_recorder_finished_meanwhile(tmp_path, database, request):
    # Two recorders share the work: one may read a run, then the other finish it, then the
    # first apply an older status. The batch's steps are driven by hand to put them in that order.
    from hacer import runstates
    from hacer.messages import RunStatus
    from hacer.models import Run
    from recorder.service import Recorder

    url = request.getfixturevalue("postgres_url") if database == "postgresql" else f"sqlite:///{tmp_path / 'r.db'}"
    database = Database(url)
    database.init()
    first, second = (Recorder(RecordingBus(), Topics(), database.session).rows for _ in range(2))
    running = RunStatus("r1", "lamp", ("hall",), runstates.RUNNING, "runner-a", queued_at=T1, started_at=bus_time(2.0))
    succeeded = RunStatus(
        "r1",
        "lamp",
        ("hall",),
        runstates.SUCCEEDED,
        "runner-a",
        exit_code=0,
        queued_at=T1,
        started_at=bus_time(2.0),
        finished_at=bus_time(3.0),
    )
    with database.session() as session:
        first._status(session, {}, RunStatus("r1", "lamp", ("hall",), runstates.QUEUED, "runner-a", queued_at=T1))
        session.commit()
    with database.session() as late:
        late_runs: dict = {}
        first._run(late, late_runs, "r1")  # the late recorder has read the run: queued
        with database.session() as meanwhile:
            second._status(meanwhile, {}, succeeded)
            meanwhile.commit()
        first._status(late, late_runs, running)
        assert late_runs["r1"].state == runstates.SUCCEEDED  # what the rest of the batch goes on with
        late.commit()
    with database.session() as session:
        run = session.scalar(select(Run).where(Run.run_id == "r1"))
        assert (run.state, run.exit_code, run.finished_at is not None) == (runstates.SUCCEEDED, 0, True)


def test_a_run_asked_for_again_with_its_key_or_run_id_runs_once(app):
    client = app.test_client()
    request = json.dumps({"params": ["7"]})
    first = client.post("/api/scripts/exec/name/lamp", data=request, headers={"Idempotency-Key": "k1"}).get_json()
    again = client.post("/api/scripts/exec/name/lamp", data=request, headers={"Idempotency-Key": "k1"}).get_json()
    assert again == first
    other = client.post(
        "/api/scripts/exec/name/lamp", data=json.dumps({"params": ["8"]}), headers={"Idempotency-Key": "k1"}
    )
    assert other.status_code == 409 and "another script or parameters" in other.get_json()["message"]
    own = json.dumps({"params": ["7"], "run_id": "mine-1"})
    assert client.post("/api/scripts/exec/name/lamp", data=own).get_json()["run_id"] == "mine-1"
    assert client.post("/api/scripts/exec/name/lamp", data=own).get_json()["run_id"] == "mine-1"
    requests = [RunRequest.from_payload(p).run_id for t, p, _ in app.bus.published if t == "hacer/runs/request"]
    assert requests == [first["run_id"], "mine-1"]  # each published once
    fire = client.post("/api/scripts/exec/name/lamp", data=json.dumps({"run_id": "auto-1-20261207T000000Z"}))
    assert fire.status_code == 400 and "scheduler" in fire.get_json()["message"]


def test_a_refused_bus_message_is_counted_by_subscription_in_the_metrics(app):
    client = app.test_client()
    app.bus.deliver("hacer/runs/r1/status", b'{"run_id": "r1", "state": "maybe"}')
    app.bus.deliver("hacer/runs/r1/log", b"not json")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'hacer_api_messages_refused_total{topic="hacer/runs/+/status"} 1.0' in metrics
    assert 'hacer_api_messages_refused_total{topic="hacer/runs/+/log"} 1.0' in metrics


@pytest.mark.parametrize("gone", ["reset", "closed by the client", "timed out", "closed already"])
def test_closing_a_websocket_whose_client_is_gone_raises_nothing_in_engineios_writer(gone):
    """engineio's writer thread closes a client's websocket when its queue ends; a client that went
    first (reset, its own close frame, a timeout) made that close raise, a traceback in the api's log."""
    import threading
    import types

    from simple_websocket import ConnectionClosed
    from wsproto.utilities import LocalProtocolError

    from api.fanout import DirectWebSocket

    failure = {
        "reset": ConnectionResetError(104, "Connection reset by peer"),
        "closed by the client": LocalProtocolError("Connection cannot be closed in state REMOTE_CLOSING"),
        "timed out": TimeoutError("timed out"),
        "closed already": ConnectionClosed(),
    }[gone]

    class GoneClient:
        connected = True

        def close(self) -> None:
            raise failure

    websocket = DirectWebSocket.__new__(DirectWebSocket)
    websocket.lock = threading.Lock()
    websocket.engine_socket = types.SimpleNamespace(sid="s1")
    websocket.ws = GoneClient()
    websocket.close()  # no exception
