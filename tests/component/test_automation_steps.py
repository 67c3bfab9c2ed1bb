"""An automation's steps (`set`, `run`, `wait`, `wait_for`): in order, each once, across schedulers."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from test_automations import START, Clock, add, deliver, schedulers, with_node

from api.automations import traces
from hacer.automations import AutomationSpec, Every, RunStep, Step, ValueIs, WaitFor, describe
from hacer.bus import Message
from hacer.messages import ClientCommand, CommandResult, MessageError, RunRequest, RunStatus, step_run_id
from hacer.models import Automation, AutomationStep, Run
from scheduler.steps import RESEND_AFTER

from test_runner import runner_env, runs, scripts_dir, start_runner  # noqa: F401

HOUR = 3600


def hall(*steps: Step) -> AutomationSpec:
    return AutomationSpec("hall", Every(HOUR), steps=steps)


def commands(pair) -> list[tuple[str, ClientCommand]]:
    return [
        (bus.client_id, ClientCommand.from_payload(payload))  # type: ignore[attr-defined]
        for _, bus in pair
        for topic, payload in bus.published
        if topic.endswith("/command")
    ]


def told_steps(pair) -> list[dict]:
    return [json.loads(payload) for _, bus in pair for topic, payload in bus.published if topic.endswith("/step")]


def step_rows(database) -> list[AutomationStep]:
    with database.session() as session:
        return list(session.scalars(select(AutomationStep).order_by(AutomationStep.position)))


def reply(pair, correlation: bytes, key: str, value, ok: bool = True, op: str = "set") -> None:
    """The bridge's result of a command, on the schedulers' reply topic."""
    result = CommandResult(5, op, key, ok, value if ok else None, error=None if ok else "Invalid Value")
    for scheduler, bus in pair:
        scheduler._on_bus(Message(f"hacer/replies/{bus.client_id}", result.to_payload(), False, 1, correlation))
        scheduler.tick()


def run_ended(pair, run_id: str, state: str) -> None:
    status = RunStatus(run_id, "fan", (), state, "r1", 0 if state == "succeeded" else 1)
    deliver(pair, f"hacer/runs/{run_id}/status", status.to_payload())


def last_run_state(database, automation_id: int) -> str:
    """The state `manage.py automation next` and the api show for the automation's last fire."""
    with database.session() as session:
        row = session.get(Automation, automation_id)
        return describe(session, row, None, START)["last_runs"][0]["state"]


def tick(pair, clock: Clock, seconds: float) -> None:
    clock.advance(seconds)
    for scheduler, _ in pair:
        scheduler.tick()


def test_steps_run_in_order_each_once_across_two_schedulers_and_are_traced(database):
    with_node(database, 5)
    automation_id = add(
        database,
        hall(
            Step(set={"node": 5, "on": 1}),
            Step(wait=60),
            Step(run=RunStep("fan", ("hall",))),
            Step(wait_for=WaitFor(ValueIs(5, "temperature", below=20), timeout=300)),
        ),
    )
    clock = Clock(START + timedelta(seconds=HOUR))
    pair = schedulers(database, clock, 2)
    tick(pair, clock, 0)
    rows = step_rows(database)
    assert [(row.position, row.kind, row.state) for row in rows] == [(0, "set", "waiting")]
    fire = rows[0].run_id
    assert [command.set for _, command in commands(pair)] == [{"on": 1}]  # one scheduler fired, and sent it
    assert not [p for _, bus in pair for t, p in bus.published if t == "hacer/runs/request"]  # no run of its own

    reply(pair, f"{fire}/0".encode(), "on", 1)
    assert [(row.kind, row.state) for row in step_rows(database)] == [("set", "done"), ("wait", "waiting")]
    tick(pair, clock, 59)
    assert step_rows(database)[1].state == "waiting"
    tick(pair, clock, 1)
    assert [row.state for row in step_rows(database)] == ["done", "done", "waiting"]
    requests = [RunRequest.from_payload(p) for _, bus in pair for t, p in bus.published if t == "hacer/runs/request"]
    assert [(r.script, r.params, r.run_id) for r in requests] == [("fan", ("hall",), step_run_id(fire, 2))]
    with database.session() as session:  # its run's row holds the request: the recorders send it again if lost
        assert session.scalar(select(Run.state).where(Run.run_id == step_run_id(fire, 2))) == "queued"

    assert last_run_state(database, automation_id) == "running"
    run_ended(pair, step_run_id(fire, 2), "succeeded")
    assert [row.state for row in step_rows(database)] == ["done", "done", "done", "waiting"]
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 22}')
    assert step_rows(database)[3].state == "waiting"
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 19}')
    assert [row.state for row in step_rows(database)] == ["done"] * 4
    tick(pair, clock, 600)  # nothing begins again, nothing is sent again
    assert len(step_rows(database)) == 4 and len(commands(pair)) == 1
    assert last_run_state(database, automation_id) == "succeeded"

    told = told_steps(pair)
    assert [(t["position"], t["kind"], t["state"]) for t in told] == [
        (0, "set", "done"),
        (1, "wait", "done"),
        (2, "run", "done"),
        (3, "wait_for", "done"),
    ]
    assert {t["fire"] for t in told} == {fire} and {t["id"] for t in told} == {automation_id}
    with database.session() as session:
        [trace] = traces(session, automation_id)
    steps = trace["steps"]
    assert [step["kind"] for step in steps] == ["set", "wait", "run", "wait_for"]
    assert steps[0]["results"] == [{"key": "on", "ok": True, "value": 1, "error": None}]
    assert steps[2]["run_id"] == step_run_id(fire, 2) and steps[2]["exit_code"] == 0
    assert steps[3]["seen"]["seen"] == 19 and steps[3]["seen"]["held"] is True
    assert trace["definition"]["steps"][1] == {"wait": 60}


def test_a_set_nobody_answered_is_read_back_by_one_scheduler_then_times_out_and_ends_the_steps(database):
    with_node(database, 5)
    add(database, hall(Step(set={"node": 5, "on": 1}), Step(wait=10)))
    clock = Clock(START + timedelta(seconds=HOUR))
    pair = schedulers(database, clock, 2)
    tick(pair, clock, 0)
    assert [(c.set, c.get) for _, c in commands(pair)] == [({"on": 1}, None)]
    tick(pair, clock, RESEND_AFTER)  # its sender may have died: whichever takes the send fence reads the key
    assert [(c.set, c.get) for _, c in commands(pair)] == [({"on": 1}, None), (None, ["on"])]
    tick(pair, clock, RESEND_AFTER)
    assert len(commands(pair)) == 3
    tick(pair, clock, 30 - 2 * RESEND_AFTER)
    rows = step_rows(database)
    assert [(row.kind, row.state) for row in rows] == [("set", "timed_out")]
    tick(pair, clock, 60)
    assert len(step_rows(database)) == 1  # the steps after it never begin
    assert last_run_state(database, 1) == "failed"


@pytest.mark.parametrize("node_has, sets", [(1, 1), (0, 2)])
def test_a_set_read_back_is_done_if_the_node_has_it_and_sent_again_only_if_not(database, node_has, sets):
    with_node(database, 5)
    add(database, hall(Step(set={"node": 5, "on": True})))  # a boolean is what the node holds as 1
    clock = Clock(START + timedelta(seconds=HOUR))
    pair = schedulers(database, clock, 2)
    tick(pair, clock, 0)
    tick(pair, clock, RESEND_AFTER)
    fire = step_rows(database)[0].run_id
    reply(pair, f"{fire}/0/read".encode(), "on", node_has, op="get")
    assert [c.set for _, c in commands(pair) if c.set] == [{"on": True}] * sets
    if sets == 2:
        reply(pair, f"{fire}/0".encode(), "on", 1)
    [row] = step_rows(database)
    assert row.state == "done"
    assert json.loads(row.outcome).get("read_back", False) == (sets == 1)


def test_a_failed_run_or_a_refused_set_ends_the_steps_and_a_wait_for_timeout_goes_on_unless_told_to_stop(database):
    with_node(database, 5)
    add(
        database,
        hall(
            Step(wait_for=WaitFor(ValueIs(5, "on", equals=1), timeout=30)),
            Step(set={"node": 5, "on": 7}),
            Step(wait=5),
        ),
    )
    clock = Clock(START + timedelta(seconds=HOUR))
    pair = schedulers(database, clock, 2)
    tick(pair, clock, 0)
    tick(pair, clock, 30)  # the condition never held: timed out, and on (`on_timeout: continue`)
    assert [(row.kind, row.state) for row in step_rows(database)] == [("wait_for", "timed_out"), ("set", "waiting")]
    fire = step_rows(database)[0].run_id
    reply(pair, f"{fire}/1".encode(), "on", None, ok=False)
    assert [row.state for row in step_rows(database)] == ["timed_out", "failed"]
    tick(pair, clock, 60)
    assert len(step_rows(database)) == 2


def test_a_wait_for_a_nodes_presence_ends_when_the_node_comes_online_and_sees_it(database):
    from hacer.automations import PresenceIs
    from hacer.messages import Presence

    with_node(database, 5)
    add(database, hall(Step(wait_for=WaitFor(PresenceIs(5, "online"), timeout=600)), Step(wait=5)))
    clock = Clock(START + timedelta(seconds=HOUR))
    pair = schedulers(database, clock, 2)

    def presence(state: str) -> None:
        at = datetime.fromtimestamp(clock.now, UTC)
        deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "ip", state, at, at).to_payload())

    presence("offline")
    tick(pair, clock, 0)
    assert [row.state for row in step_rows(database)] == ["waiting"]
    clock.advance(30)
    presence("online")
    rows = step_rows(database)
    assert [row.state for row in rows] == ["done", "waiting"]
    seen = json.loads(rows[0].outcome)["seen"]
    assert seen == {"condition": {"kind": "presence", "node": 5, "state": "online"}, "seen": "online", "held": True}


def test_a_step_begun_by_a_scheduler_that_died_is_ended_by_another(database):
    add(database, hall(Step(wait=60), Step(run=RunStep("fan"))))
    clock = Clock(START + timedelta(seconds=HOUR))
    [(first, _)] = schedulers(database, clock, 1)
    first.tick()
    assert [(row.kind, row.state) for row in step_rows(database)] == [("wait", "waiting")]
    # `first` is gone; a scheduler started later reads the wait's due time from its row.
    clock.advance(61)
    later = schedulers(database, clock, 1)
    later[0][0].tick()
    assert [(row.kind, row.state) for row in step_rows(database)] == [("wait", "done"), ("run", "waiting")]
    fire = step_rows(database)[0].run_id
    with database.session() as session:  # the run ended while no scheduler watched: read from its row
        session.execute(update(Run).where(Run.run_id == step_run_id(fire, 1)).values(state="failed"))
        session.commit()
    tick(later, clock, 1)
    assert [row.state for row in step_rows(database)] == ["done", "failed"]


def test_restart_mode_cancels_the_waiting_step_of_the_fire_it_replaces_and_its_run(database):
    from hacer.automations import NodePresence
    from hacer.messages import Presence

    steps = (Step(run=RunStep("fan")), Step(wait=600))
    add(database, AutomationSpec("gone", NodePresence(5, "offline"), steps=steps, mode="restart"))
    clock = Clock(START + timedelta(seconds=10))
    pair = schedulers(database, clock, 2)
    for seconds in (2, 6):  # two transitions while the first fire's run is still going
        went = START + timedelta(seconds=seconds)
        deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "ip", "offline", went, went).to_payload())
    rows = step_rows(database)
    assert sorted((row.position, row.state) for row in rows) == [(0, "cancelled"), (0, "waiting")]
    [cancelled] = [row.run_id for row in rows if row.state == "cancelled"]
    cancels = [t for _, bus in pair for t, _ in bus.published if t.endswith("/cancel")]
    assert cancels == [f"hacer/runs/{cancelled}/cancel", f"hacer/runs/{step_run_id(cancelled, 0)}/cancel"]
    run_ended(pair, step_run_id(cancelled, 0), "cancelled")  # the cancelled fire's wait never begins
    assert len(step_rows(database)) == 2
    assert last_run_state(database, 1) == "running"  # the new fire's


def test_queued_mode_begins_a_fires_steps_once_the_steps_before_it_ended(database):
    from hacer.automations import NodePresence
    from hacer.messages import Presence

    add(database, AutomationSpec("gone", NodePresence(5, "offline"), steps=(Step(wait=60),), mode="queued"))
    clock = Clock(START + timedelta(seconds=10))
    pair = schedulers(database, clock, 2)
    for seconds in (2, 6):  # two transitions while the first fire's wait waits
        went = START + timedelta(seconds=seconds)
        deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "ip", "offline", went, went).to_payload())
    assert [row.state for row in step_rows(database)] == ["waiting"]
    tick(pair, clock, 60)  # the first wait ends; the queued fire's wait begins, once
    tick(pair, clock, 1)
    assert sorted(row.state for row in step_rows(database)) == ["done", "waiting"]
    assert len({row.run_id for row in step_rows(database)}) == 2


@pytest.mark.parametrize(
    "definition, field",
    [
        ({"script": "fan", "steps": [{"wait": 5}]}, "$.script"),
        ({}, "$.script"),
        ({"steps": [{"wait": 5, "run": {"script": "fan"}}]}, "$.steps[0]"),
        ({"steps": [{"wait": 5}, {}]}, "$.steps[1]"),
        ({"steps": [{"set": {"on": 1}}]}, "$.steps[0].set.node"),
        ({"steps": [{"set": {"node": 5}}]}, "$.steps[0].set"),
        ({"steps": [{"wait": 0}]}, "$.steps[0].wait"),
        ({"steps": [{"wait_for": {"condition": {"kind": "value", "node": 5, "key": "on"}}}]}, "$.steps[0].wait_for"),
        ({"steps": [{"run": {"script": "fan", "colour": 1}}]}, "$.steps[0].run.colour"),
        ({"steps": [{"wait": 5}], "params": ["x"]}, "$.params"),
        ({"steps": [{"set": {"node": 5, "level": 1.5}}]}, "$.steps[0].set"),
        (
            {"steps": [{"wait_for": {"condition": {"kind": "presence", "node": 5, "state": "away"}, "timeout": 9}}]},
            "$.steps[0].wait_for.condition.state",
        ),
    ],
)
def test_bad_steps_name_the_field_at_fault(definition, field):
    body = {"name": "hall", "trigger": {"kind": "every", "seconds": 60}, **definition}
    with pytest.raises(MessageError) as refused:
        AutomationSpec.from_json(json.dumps(body))
    assert f"`{field}`" in str(refused.value)


# --- real processes -----------------------------------------------------------------------------


def test_steps_run_each_once_across_a_scheduler_kill_at_every_step_boundary(
    spawn, runner_env, start_runner, start_bridge, runs, watch, tmp_path
):
    """Real scheduler processes, broker, bridge, node, runner and recorder: the scheduler is SIGKILLed
    as each step begins (five times) and another started; every step ends once, in order."""
    import uuid

    from emulator.nodes import EmulatedNode, Emulator
    from hacer.models import Database

    from support import presence_of, target, wait_until

    runner_env["HACER_OFFLINE_AFTER"] = "30"
    runner_env["HACER_STEP_RESEND_AFTER"] = "2"
    node_id = uuid.uuid4().int % 10**9
    node = EmulatedNode(node_id, "toggle", "127.0.0.6", int(runner_env["HACER_NODE_PORT"]), interval=0.5)
    node.values["on"] = 0
    answered: list[tuple[str, str, object]] = []  # every command the node got
    answer = node.answer

    def recording(op, key, value):
        answered.append((op, key, value))
        return answer(op, key, value)

    node.answer = recording  # type: ignore[method-assign]
    emulator = Emulator([node], target(runner_env))
    database = Database(f"sqlite:///{runner_env['HADB_PATH']}")
    database.init()
    marked = tmp_path / "marked"
    steps = (
        Step(set={"node": node_id, "on": 1}),
        Step(wait=2),
        Step(run=RunStep("mark", (str(marked),))),
        Step(wait=2),
        Step(set={"node": node_id, "on": 0}),
    )
    presence = watch(f"hacer/nodes/{node_id}/presence")
    told = watch("hacer/automations/+/step")
    start_bridge()
    emulator.start()
    try:
        presence.wait_for(lambda m: presence_of(m).state == "online", timeout=20)
        start_runner()
        spawn(["recorder"], runner_env)
        # Due 2 s from now, then a day later: one fire.
        automation_id = add(
            database, AutomationSpec("hall", Every(86400), steps=steps), datetime.now(UTC) - timedelta(seconds=86398)
        )
        scheduler = spawn(["scheduler"], {**runner_env, "HACER_SCHEDULER_ID": "s0"})
        for position in range(len(steps)):
            wait_until(lambda p=position: len(step_rows(database)) > p, 40, f"step {position} begun")
            scheduler.stop(kill=True)
            scheduler = spawn(["scheduler"], {**runner_env, "HACER_SCHEDULER_ID": f"s{position + 1}"})
        wait_until(lambda: step_rows(database)[-1].state != "waiting", 40, "the last step ended")
        rows = step_rows(database)
        assert [(row.position, row.kind, row.state) for row in rows] == [
            (0, "set", "done"),
            (1, "wait", "done"),
            (2, "run", "done"),
            (3, "wait", "done"),
            (4, "set", "done"),
        ]
        for before, after in zip(rows, rows[1:], strict=False):  # each began once the one before it ended
            assert before.ended_at <= after.started_at
        assert rows[1].ended_at - rows[1].started_at >= timedelta(seconds=2)
        assert node.values["on"] == 0 and marked.read_text() == "ran"
        # Each set reached the node once: a scheduler that took over one read the key back first.
        assert [command for command in answered if command[0] == "set"] == [("set", "on", 1), ("set", "on", 0)]
        fire = rows[0].run_id
        run = runs.wait_finished(step_run_id(fire, 2))
        assert run.state == "succeeded" and [s.state for s in runs.statuses(run.run_id)].count("running") == 1
        for row, value in ((rows[0], 1), (rows[4], 0)):
            assert [(r["ok"], r["value"]) for r in json.loads(row.outcome)["results"]] == [(True, value)]
        positions = [json.loads(m.payload)["position"] for m in told.messages]
        assert len(positions) == len(set(positions))  # each told at most once (a kill may lose a telling)
        with database.session() as session:
            [trace] = traces(session, automation_id)
        assert [step["state"] for step in trace["steps"]] == ["done", "done", "succeeded", "done", "done"]
    finally:
        emulator.stop()
