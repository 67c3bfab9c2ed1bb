"""The recorder: what it writes, what it sets aside, what it confirms; alone and against the real system."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from sqlalchemy import func, select
from test_api_components import RecordingBus

from hacer import runstates
from hacer.bus import Bus, BusError, Message
from hacer.messages import (
    Launch,
    LogEntry,
    NodeReadings,
    Presence,
    Reading,
    RunRecorded,
    RunsRecorded,
    RunStatus,
    bus_time,
)
from hacer.models import Database, DeadLetter, Node, NodeSample, Run, ScriptLogEntry, utc_datetime
from recorder.rescue import Rescuer
from recorder.rows import RowWriter
from recorder.service import Recorder

from support import wait_until
from test_runner import fifo, release, requester, runner_env, runs, scripts_dir, start_runner  # noqa: F401

T1 = bus_time(1.0)

POISON_STATUS = b'{"run_id":"p","script":"x","state":"running","runner":"r","exit_code":{"a":1}}'


class AckingBus(RecordingBus):
    """A recording bus a Recorder can run on, like the real one: refuses confirmed publishes while away."""

    def __init__(self) -> None:
        super().__init__()
        self.acked: list[Message] = []

    def start(self) -> None:
        pass

    def stop(self, end_session: bool = False) -> None:
        pass

    def ack(self, message) -> None:
        self.acked.append(message)

    def publish_confirmed(self, messages, *, retain=False, timeout=10.0) -> None:
        if messages and not self.connected:
            raise BusError("publish not confirmed: not connected")
        for topic, payload in messages:
            self.publish(topic, payload, retain=retain)

    def recorded_messages(self) -> list[RunsRecorded]:
        return [RunsRecorded.from_payload(p) for t, p, _ in self.published if t == "hacer/runs/recorded"]

    def recorded(self) -> list[RunRecorded]:
        return [run for message in self.recorded_messages() for run in message.recorded()]


@pytest.fixture
def recorder(database):
    bus = AckingBus()
    # Each batch written at once (HACER_NODE_DATA_EVERY=0, HACER_RUN_DATA_EVERY=0), but where the test says otherwise.
    recorder = Recorder(bus, bus.topics, database.session, recorder_id="test", node_data_every=0.0, run_data_every=0.0)
    recorder.start()
    recorder.test_bus = bus
    yield recorder
    recorder.stop()


def deliver_all(recorder, messages):
    """Deliver (topic, payload) pairs and wait until the recorder has acknowledged them all."""
    bus = recorder.test_bus
    before, said = len(bus.acked), len(bus.recorded_messages())
    for topic, payload in messages:
        bus.deliver(topic, payload)
    wait_until(lambda: len(bus.acked) >= before + len(messages), 15, "every message acknowledged")
    if any(topic.startswith("hacer/runs/") for topic, _ in messages):  # said after the acknowledgements
        wait_until(lambda: len(bus.recorded_messages()) > said, 15, "what was recorded said")


def status(run_id, state, **fields):
    return (
        f"hacer/runs/{run_id}/status",
        RunStatus(run_id, "lamp", ("hall",), state, "runner-a", **fields).to_payload(),
    )


def entry(run_id, seq, data="x"):
    return f"hacer/runs/{run_id}/log", LogEntry(run_id, seq, T1, "output", data).to_payload()


def test_node_data_alone_waits_unacknowledged_and_is_written_with_a_runs_message_or_on_stop(database):
    from hacer.messages import LastSeenBatch

    bus = AckingBus()
    recorder = Recorder(bus, bus.topics, database.session, recorder_id="test")  # the default wait: a minute
    recorder.test_bus = bus
    recorder.start()

    def node_77():
        with database.session() as session:
            node = session.get(Node, 77)
            samples = session.scalars(select(NodeSample.value).where(NodeSample.node_id == 77)).all()
            return node.last_update, samples

    deliver_all(
        recorder, [("hacer/nodes/77/presence", Presence(77, "toggle", "10.0.0.77", "online", T1, T1).to_payload())]
    )
    acked = len(bus.acked)
    bus.deliver("hacer/bridge/lastseen", LastSeenBatch({77: bus_time(100.0)}).to_payload())
    bus.deliver("hacer/nodes/77/readings", NodeReadings(77, {"on": Reading(1, bus_time(90.0))}, True, T1).to_payload())
    # Nothing to await: held data shows as nothing happening; the recorder's loop turns 5 times a second.
    threading.Event().wait(1.0)
    assert len(bus.acked) == acked and node_77() == (utc_datetime(1.0), [])  # held, not acknowledged
    deliver_all(recorder, [status("r77", runstates.QUEUED)])  # a run's message: everything within its wait
    assert node_77() == (utc_datetime(100.0), [1.0])
    bus.deliver("hacer/bridge/lastseen", LastSeenBatch({77: bus_time(106.0)}).to_payload())
    recorder.stop()  # and on the way out
    assert node_77()[0] == utc_datetime(106.0)


def test_node_data_alone_is_written_within_its_wait(database):
    bus = AckingBus()
    recorder = Recorder(bus, bus.topics, database.session, recorder_id="test", node_data_every=0.5)
    recorder.start()
    try:
        recorder.test_bus = bus
        deliver_all(
            recorder, [("hacer/nodes/78/readings", NodeReadings(78, {"on": Reading(0, T1)}, True, T1).to_payload())]
        )
    finally:
        recorder.stop()
    with database.session() as session:
        assert session.scalars(select(NodeSample.value).where(NodeSample.node_id == 78)).all() == [0.0]


def test_a_runs_messages_wait_to_be_written_in_one_transaction(database):
    bus = AckingBus()
    recorder = Recorder(bus, bus.topics, database.session, recorder_id="test", node_data_every=0.0, run_data_every=3.0)
    recorder.test_bus = bus
    recorder.start()
    try:
        # A run's messages come over a moment, as a script runs: a tenth of a second apart here.
        for message in (status("one", runstates.RUNNING), *(entry("one", seq) for seq in range(1, 6))):
            bus.deliver(*message)
            threading.Event().wait(0.1)
        deliver_all(recorder, [status("one", runstates.SUCCEEDED, exit_code=0)])
    finally:
        recorder.stop()
    # A new run's first status at once (the control app reads its thread id then), then the rest
    # of the run in one commit, one confirmation (it came well within the 3 s wait).
    assert bus.recorded() == [RunRecorded("one", 0, runstates.RUNNING), RunRecorded("one", 5, runstates.SUCCEEDED)]
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(ScriptLogEntry)) == 5


def test_a_poison_status_is_set_aside_and_the_batch_around_it_written(recorder, database):
    deliver_all(
        recorder,
        [
            status("good", runstates.QUEUED),
            ("hacer/runs/p/status", POISON_STATUS),
            entry("good", 1),
            status("good", runstates.SUCCEEDED, exit_code=0),
        ],
    )
    with database.session() as session:
        assert session.scalar(select(Run.state).where(Run.run_id == "good")) == runstates.SUCCEEDED
        letters = session.scalars(select(DeadLetter)).all()
    assert [(d.topic, "exit_code" in d.error) for d in letters] == [("hacer/runs/p/status", True)]
    assert recorder.set_aside == 1
    assert RunRecorded("good", 1, runstates.SUCCEEDED) in recorder.test_bus.recorded()


def test_a_name_with_a_nul_is_set_aside_not_retried_forever(recorder, database):
    bad = json.loads(Presence(77, "toggle", "10.0.0.77", "online", T1, T1).to_payload())
    bad["name"] = "a\u0000b"
    deliver_all(
        recorder,
        [
            ("hacer/nodes/77/presence", json.dumps(bad).encode()),
            ("hacer/nodes/78/presence", Presence(78, "toggle", "10.0.0.78", "online", T1, T1).to_payload()),
        ],
    )
    with database.session() as session:
        assert session.get(Node, 77) is None and session.get(Node, 78) is not None
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


def test_a_reading_no_column_can_hold_is_set_aside_not_retried_forever(recorder, database):
    good = NodeReadings(79, {"temperature": Reading(21, T1)}, True, T1)
    huge = json.loads(good.to_payload())
    huge["values"]["temperature"]["value"] = int("9" * 400)  # valid JSON, and no double holds it
    deliver_all(
        recorder,
        [("hacer/nodes/79/readings", json.dumps(huge).encode()), ("hacer/nodes/79/readings", good.to_payload())],
    )
    with database.session() as session:
        assert session.scalars(select(NodeSample.value)).all() == [21.0]
        assert session.scalar(select(func.count()).select_from(DeadLetter)) == 1


def test_the_database_refusing_one_message_sets_aside_that_one_only(recorder, database, monkeypatch):
    # What the checks let through and the database still refuses is unforeseen by nature: stand
    # one in, a status the database refuses, among good ones in one batch.
    from sqlalchemy.exc import DataError

    apply = RowWriter._status

    def refusing(self, session, runs, run_status):
        if run_status.run_id == "refused":
            raise DataError("UPDATE run ...", {}, Exception("value out of range"))
        return apply(self, session, runs, run_status)

    monkeypatch.setattr(RowWriter, "_status", refusing)
    deliver_all(recorder, [status("ok", runstates.QUEUED), status("refused", runstates.QUEUED), entry("ok", 1)])
    with database.session() as session:
        assert session.scalar(select(Run.state).where(Run.run_id == "ok")) == runstates.QUEUED
        assert session.scalar(select(func.count()).select_from(ScriptLogEntry)) == 1
        assert [d.topic for d in session.scalars(select(DeadLetter))] == ["hacer/runs/refused/status"]
    assert recorder.set_aside == 1


def test_a_bad_log_entry_leaves_a_placeholder_so_the_log_has_no_gap(recorder, database):
    bad = json.loads(LogEntry("g", 2, T1, "output", "x").to_payload())
    bad["data"] = {"not": "text"}
    deliver_all(
        recorder,
        [status("g", runstates.RUNNING), entry("g", 1), ("hacer/runs/g/log", json.dumps(bad).encode()), entry("g", 3)],
    )
    with database.session() as session:
        rows = session.scalars(select(ScriptLogEntry).order_by(ScriptLogEntry.seq)).all()
        assert [(r.seq, r.entry_type.name) for r in rows] == [(1, "output"), (2, "exception"), (3, "output")]
        assert "set aside" in rows[1].data
    assert recorder.test_bus.recorded()[-1] == RunRecorded("g", 3, runstates.RUNNING)


def test_a_run_first_heard_of_by_its_launch_entry_has_its_script_and_params_in_every_entry(recorder, database):
    """The runner sends the launch entry before the `running` status; a request without a run id is not recorded."""
    launch = LogEntry("l", 1, T1, "launch", Launch("lamp", ("hall", "on")).to_data()).to_payload()
    deliver_all(recorder, [("hacer/runs/l/log", launch)])
    running = RunStatus("l", "lamp", ("hall", "on"), runstates.RUNNING, "runner-a").to_payload()
    deliver_all(recorder, [entry("l", 2), ("hacer/runs/l/status", running)])
    with database.session() as session:
        rows = session.scalars(select(ScriptLogEntry).order_by(ScriptLogEntry.seq)).all()
        assert [(r.seq, r.script_name, r.params) for r in rows] == [(1, "lamp", '["on"]'), (2, "lamp", '["on"]')]
        assert session.scalar(select(Run.state).where(Run.run_id == "l")) == runstates.RUNNING
    bad = LogEntry("b", 1, T1, "launch", "not json").to_payload()  # kept as it came, the run as it was
    deliver_all(recorder, [("hacer/runs/b/log", bad)])
    with database.session() as session:
        assert session.scalar(select(ScriptLogEntry.data).where(ScriptLogEntry.script_name == "")) == "not json"


def test_topic_and_payload_must_name_the_same_run(recorder, database):
    topic, payload = status("a", runstates.SUCCEEDED)
    deliver_all(recorder, [("hacer/runs/b/status", payload), ("hacer/runs/b/log", entry("a", 1)[1])])
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Run).where(Run.run_id == "a")) == 0
    assert recorder.set_aside == 2


def test_recorded_says_the_log_up_to_its_first_gap(recorder, database):
    deliver_all(recorder, [status("w", runstates.RUNNING), entry("w", 1), entry("w", 2), entry("w", 4)])
    assert recorder.test_bus.recorded()[-1] == RunRecorded("w", 2, runstates.RUNNING)
    deliver_all(recorder, [entry("w", 3)])
    assert recorder.test_bus.recorded()[-1] == RunRecorded("w", 4, runstates.RUNNING)


def test_a_finished_run_keeps_its_first_end(recorder, database):
    deliver_all(recorder, [status("e", runstates.LOST, error="runner went away")])
    deliver_all(recorder, [status("e", runstates.SUCCEEDED, exit_code=0)])
    with database.session() as session:
        assert session.scalar(select(Run.state).where(Run.run_id == "e")) == runstates.LOST


def test_batches_without_a_new_node_are_written_while_the_broker_is_away(recorder, database):
    recorder.test_bus.connected = False
    deliver_all(recorder, [status("away", runstates.QUEUED), entry("away", 1)])
    with database.session() as session:
        assert session.scalar(select(Run.state).where(Run.run_id == "away")) == runstates.QUEUED


# --- against the real broker, runner and recorder processes -----------------------------------


@pytest.fixture
def start_recorder(spawn, watch):
    """Start a recorder process and wait until it is online (subscribed)."""
    states = watch("hacer/recorders/+/state")

    def start(env):
        seen = len(states.messages)
        child = spawn(["recorder"], env)
        states.wait_for(lambda m: b'"online"' in m.payload, timeout=20, start=seen)
        return child

    return start


def run_row(env, run_id):
    database = Database(env.get("HACER_DATABASE_URL") or f"sqlite:///{env['HADB_PATH']}")
    try:
        with database.session() as session:
            run = session.scalar(select(Run).where(Run.run_id == run_id))
            if run is None:
                return None, []
            entries = session.scalars(
                select(ScriptLogEntry).where(ScriptLogEntry.thread_id == run.id).order_by(ScriptLogEntry.seq)
            ).all()
            return run.state, [(e.seq, e.entry_type.name, e.data) for e in entries]
    finally:
        database.engine.dispose()


def test_what_the_broker_lost_is_sent_again_until_recorded(
    start_recorder, runner_env, start_runner, requester, runs, broker, topics
):
    # The recorder's queued messages vanish with its broker session (as in a broker crash before
    # its save): the runner still holds them, unconfirmed, and sends them again.
    env = {**runner_env, "HACER_RECORDER_ID": "lossy", "HACER_RESEND_AFTER": "0.5"}
    recorder = start_recorder(env)
    start_runner(HACER_RESEND_AFTER="0.5")
    warm = requester("test", ["warm"])
    wait_until(lambda: run_row(env, warm)[0] == runstates.SUCCEEDED, 30, "the first run recorded")
    assert recorder.stop() == 0, recorder.output()
    run_id = requester("spam", ["20"])
    runs.wait_finished(run_id)
    wipe = Bus(broker.url, topics, "hacer-recorder-lossy", clean_start=True, session_expiry=0)
    wipe.start()
    wipe.wait_connected(10)
    wipe.stop()
    start_recorder(env)
    wait_until(lambda: run_row(env, run_id)[0] == runstates.SUCCEEDED, 30, "the run recorded after all")
    state, entries = wait_until(
        lambda: (row := run_row(env, run_id))[1] and len(row[1]) == 22 and row, 30, "the whole log"
    )
    assert [seq for seq, _, _ in entries] == list(range(1, 23))
    assert [data for _, kind, data in entries if kind == "output"] == [f"line {i}" for i in range(20)]


def test_a_poison_message_on_the_bus_stops_nothing_across_restarts(start_recorder, runner_env, start_runner, requester):
    recorder = start_recorder(runner_env)
    start_runner()
    requester.bus.publish("hacer/runs/p/status", POISON_STATUS)
    first = requester("test", ["1"])
    wait_until(lambda: run_row(runner_env, first)[0] == runstates.SUCCEEDED, 30, "a run after the poison")
    recorder.process.send_signal(signal.SIGKILL)
    recorder.process.wait()
    start_recorder(runner_env)
    second = requester("test", ["2"])
    wait_until(lambda: run_row(runner_env, second)[0] == runstates.SUCCEEDED, 30, "a run after a restart")
    database = Database(f"sqlite:///{runner_env['HADB_PATH']}")
    with database.session() as session:  # 2 if the kill beat the first acknowledgement: set aside again
        assert session.scalar(select(func.count()).select_from(DeadLetter)) >= 1


def test_the_recorder_purges_finished_runs_never_a_running_one(
    start_recorder, runner_env, start_runner, requester, runs, tmp_path
):
    env = {**runner_env, "HACER_KEEP_RUNS": "1", "HACER_PURGE_EVERY": "1"}  # one finished run kept
    start_recorder(env)
    start_runner(HACER_RUNNER_LET_GO_AFTER="1")  # a run still in the outbox, even confirmed, is not purged
    pipe = fifo(tmp_path, "held")
    running = requester("block", [str(pipe)])
    runs.wait_state(running, runstates.RUNNING)
    first = requester("test", ["1"])
    wait_until(lambda: run_row(env, first)[0] == runstates.SUCCEEDED, 30, "the first run recorded")
    second = requester("test", ["2"])
    wait_until(lambda: run_row(env, first) == (None, []), 30, "the older finished run and its log purged")
    assert run_row(env, running)[0] == runstates.RUNNING  # older than both, and kept
    assert run_row(env, second)[0] == runstates.SUCCEEDED
    release(pipe)
    runs.wait_finished(running)


def test_a_requester_that_missed_every_status_learns_how_its_run_ended(
    start_recorder, runner_env, start_runner, requester, make_bus
):
    from hacer.messages import RunRequest
    from scripting.runrequest import request_until_claimed

    start_recorder(runner_env)
    runner = start_runner()
    run_id = requester("exit3")
    wait_until(lambda: run_row(runner_env, run_id)[0] == runstates.FAILED, 30, "the run recorded")
    # A requester that was away while the run started and ended asks again: its request is a
    # duplicate, so the answer is how the run ended, as recorded.
    late = request_until_claimed(make_bus(), RunRequest("exit3", (), run_id, "test"), timeout=10)
    assert late is not None, "no answer: the requester would send forever"
    assert (late.state, late.exit_code, late.runner) == (runstates.FAILED, 3, runner.runner_id)


def test_a_request_no_runner_takes_is_sent_again_ever_less_often_and_keeps_its_time(database):
    clock = [1000.0]
    bus = AckingBus()
    rescuer = Rescuer(bus, bus.topics, database.session, rescue_after=5.0, clock=lambda: clock[0])
    asked_at = utc_datetime(990.0)
    with database.session() as session:
        session.add(Run(run_id="waits", script="test", state="queued", runner="", request='{"script":"test"}',
                        requested_at=asked_at))  # fmt: skip
        session.commit()
    sent_at = []
    for _ in range(200):  # 200 s in steps of 1 s
        before = len(bus.published)
        rescuer.rescue()
        if len(bus.published) > before:
            sent_at.append(clock[0] - 1000.0)
        clock[0] += 1.0
    assert sent_at == [0.0, 5.0, 15.0, 35.0, 75.0, 135.0, 195.0]  # 5, 10, 20, 40, 60, 60 s apart
    with database.session() as session:
        assert session.get(Run, 1).requested_at == asked_at  # the request's own time stays


def test_no_request_is_sent_again_while_the_broker_is_away(database):
    bus = AckingBus()
    rescuer = Rescuer(bus, bus.topics, database.session, rescue_after=0.1, clock=time.time)
    with database.session() as session:
        session.add(Run(run_id="waits", script="test", state="queued", runner="", request='{"script":"test"}',
                        requested_at=utc_datetime(0.0)))  # fmt: skip
        session.commit()
    rescuer.online_runners.add("r1")
    bus.connected = False
    rescuer.round()
    assert [t for t, _, _ in bus.published if t == "hacer/runs/request"] == []
    bus.connected = True
    rescuer.round()
    assert [t for t, _, _ in bus.published if t == "hacer/runs/request"] == ["hacer/runs/request"]
