"""Automations: the definition format, due times (daylight saving, the sun), and exactly-once fires."""

import json
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from hacer.automations import AutomationSpec, Cron, Every, Sun, location_of, next_due, upcoming
from hacer.messages import MessageError, RunRequest
from hacer.models import Automation, AutomationFire, Database, Run
from hacer.topics import Topics
from scheduler.firing import HELD_KEPT
from scheduler.service import Scheduler

from test_runner import runner_env, runs, scripts_dir, start_runner  # noqa: F401

MADRID = ZoneInfo("Europe/Madrid")


def local(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=MADRID)


def test_a_time_in_the_spring_forward_gap_fires_once_when_the_gap_ends():
    # 2026-03-29 02:00 -> 03:00 in Madrid: 02:30 does not exist that day.
    dues = upcoming(
        AutomationSpec("a", Cron("30 2 * * *", "Europe/Madrid"), "t"),
        local(2026, 3, 28),
        local(2026, 3, 28, 12),
        None,
        3,
    )
    assert [d.astimezone(MADRID).isoformat() for d in dues] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_a_time_in_the_repeated_fall_back_hour_fires_once_at_its_first_occurrence():
    # 2026-10-25 03:00 -> 02:00 in Madrid: 02:30 happens twice that day.
    dues = upcoming(
        AutomationSpec("a", Cron("30 2 * * *", "Europe/Madrid"), "t"),
        local(2026, 10, 24),
        local(2026, 10, 24, 12),
        None,
        2,
    )
    assert [d.astimezone(MADRID).isoformat() for d in dues] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    assert dues[0] == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def test_every_counts_from_the_last_change():
    since = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
    assert next_due(Every(600), since, since, None) == since + timedelta(seconds=600)
    assert next_due(Every(600), since + timedelta(seconds=601), since, None) == since + timedelta(seconds=1200)


def test_sun_triggers_follow_the_sun_and_survive_the_polar_night():
    madrid = location_of(40.4, -3.7)
    after = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    sunset = next_due(Sun("sunset", 0, "Europe/Madrid"), after, after, madrid)
    early = next_due(Sun("sunset", -600, "Europe/Madrid"), after, after, madrid)
    assert sunset is not None and early is not None
    assert sunset.astimezone(MADRID).date().isoformat() == "2026-12-02" and 17 <= sunset.astimezone(MADRID).hour <= 18
    assert sunset - early == timedelta(seconds=600)
    longyearbyen = location_of(78.2, 15.6)  # no sunrise from late October to mid February
    sunrise = next_due(Sun("sunrise", 0, "Arctic/Longyearbyen"), after, after, longyearbyen)
    assert sunrise is not None and sunrise.month == 2


@pytest.mark.parametrize(
    "definition, field",
    [
        ({"trigger": {"kind": "cron", "cron": "61 * * * *"}}, "$.trigger.cron"),
        ({"trigger": {"kind": "cron", "cron": "0 8 * * *", "tz": "Mars/Olympus"}}, "$.trigger.tz"),
        ({"trigger": {"kind": "every", "seconds": 0}}, "$.trigger.seconds"),
        ({"trigger": {"kind": "weekly"}}, "$.trigger"),
        ({"trigger": {"kind": "sun", "event": "sunset"}}, "$.trigger"),  # no location set
        ({"trigger": {"kind": "at", "at": "2026-13-40T25:00"}}, "$.trigger.at"),
        ({"script": ""}, "$.script"),
        ({"params": ["a\u0000"]}, "$.params[0]"),
        ({"missed": "sometimes"}, "$.missed"),
        ({"colour": "blue"}, "$.colour"),
        ({"trigger": {"kind": "every", "seconds": 60, "colour": "blue"}}, "$.trigger.colour"),
        (
            {"conditions": [{"kind": "time", "after": "08:00", "before": "09:00", "colour": 1}]},
            r"$.conditions[0].colour",
        ),
    ],
)
def test_bad_definitions_name_the_field_at_fault(definition, field):
    body = {"name": "a", "script": "toggle", "trigger": {"kind": "every", "seconds": 60}, **definition}
    with pytest.raises(MessageError, match=field.replace("$", r"\$").replace("[", r"\[")):
        AutomationSpec.from_json(json.dumps(body))


def test_the_automation_payloads_fit_their_schemas():
    import jsonschema

    from hacer.automations import AutomationFired, AutomationState, AutomationStepEnded, RunStep, Step, ValueIs, WaitFor
    from hacer.schemas import json_schemas

    schemas = json_schemas()
    spec = AutomationSpec("porch", Sun("sunset", -600, "Europe/Madrid"), "toggle", ("porch", "on"))
    steps = (
        Step(set={"node": 7, "on": 1}),
        Step(run=RunStep("fan", ("hall",), 60.0)),
        Step(wait=30),
        Step(wait_for=WaitFor(ValueIs(7, "temperature", below=20), 600, "stop")),
    )
    stepped = AutomationSpec("hall", Every(60), steps=steps)
    due = datetime(2026, 12, 2, 16, 38, 29, tzinfo=UTC)
    for name, payload in (
        ("AutomationState", AutomationState(3, spec, due)),
        ("AutomationFired", AutomationFired(3, "porch", due, "auto-3-20261202T163829Z", "s1")),
        ("AutomationState", AutomationState(4, stepped, due)),
        (
            "AutomationStepEnded",
            AutomationStepEnded(4, "hall", "auto-4-20261202T163829Z", 0, "set", "done", due, due, {"results": []}),
        ),
    ):
        jsonschema.validate(json.loads(payload.to_payload()), {**schemas[name], "$defs": schemas})
        assert type(payload).from_payload(payload.to_payload()) == payload


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PublishingBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.client_id = "publishing-bus"

    def publish(self, topic, payload, **options) -> bool:
        self.published.append((topic, payload))
        return True

    def subscribe(self, topic_filter, handler, **options) -> None:
        pass

    def subscribe_decoded(self, topic_filter, decode, handler, **options) -> None:
        pass

    def on_drained(self, hook) -> None:
        pass

    def requests(self) -> list[RunRequest]:
        return [RunRequest.from_payload(p) for t, p in self.published if t == "hacer/runs/request"]


START = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def add(database: Database, spec: AutomationSpec, changed_at: datetime = START) -> int:
    with database.session() as session:
        row = Automation(
            name=spec.name,
            definition=spec.to_json().decode(),
            enabled=spec.enabled,
            changed_at=changed_at.replace(tzinfo=None),
        )
        session.add(row)
        session.commit()
        return row.id


def schedulers(database: Database, clock: Clock, count: int) -> list[tuple[Scheduler, PublishingBus]]:
    made = []
    for n in range(count):
        bus = PublishingBus()
        made.append((Scheduler(bus, Topics(), database.session, f"s{n}", clock=clock), bus))  # type: ignore[arg-type]
    return made


def fires(database: Database) -> list[AutomationFire]:
    with database.session() as session:
        return list(session.scalars(select(AutomationFire).order_by(AutomationFire.due_at)))


def test_two_schedulers_fire_each_due_time_once(database):
    automation_id = add(database, AutomationSpec("tick", Every(60), "toggle", ("lamp", "on")))
    clock = Clock(START)
    pair = schedulers(database, clock, 2)
    for minute in range(10):
        clock.advance(60)
        for scheduler, _ in pair if minute % 2 else reversed(pair):  # either may come first
            scheduler.tick()
    dues = [f.due_at for f in fires(database)]
    assert dues == [(START + timedelta(minutes=m)).replace(tzinfo=None) for m in range(1, 11)]
    requests = [r for _, bus in pair for r in bus.requests()]
    assert sorted(r.run_id for r in requests) == sorted(f.run_id for f in fires(database))  # each once
    assert {r.requested_by for r in requests} == {"automation:tick"} and requests[0].params == ("lamp", "on")
    # The second scheduler's first plan starts after the first fire; each later due time it tried too.
    assert sum(s.counts.fired for s, _ in pair) == 10 and sum(s.counts.fired_elsewhere for s, _ in pair) == 9
    with database.session() as session:  # the run rows hold the requests, for the recorders to resend
        runs = session.scalars(select(Run).where(Run.run_id.like(f"auto-{automation_id}-%"))).all()
        assert len(runs) == 10 and all(run.state == "queued" and run.request for run in runs)


def test_a_restarted_scheduler_fires_no_due_time_again(database):
    add(database, AutomationSpec("tick", Every(60), "toggle"))
    clock = Clock(START)
    ((first, _),) = schedulers(database, clock, 1)
    for _ in range(2):
        clock.advance(61)
        first.tick()
    ((second, bus),) = schedulers(database, clock, 1)  # a fresh process: only the database remembers
    second.tick()
    assert len(fires(database)) == 2 and bus.requests() == []
    clock.advance(60)
    second.tick()
    assert [f.due_at.minute for f in fires(database)] == [1, 2, 3]


@pytest.mark.parametrize("missed, late_fires", [("skip", 0), ("run_once", 1)])
def test_missed_due_times_follow_the_policy(database, missed, late_fires):
    add(database, AutomationSpec("tick", Every(60), "toggle", missed=missed, grace=30))
    clock = Clock(START)
    ((scheduler, _),) = schedulers(database, clock, 1)
    scheduler.tick()
    clock.advance(10 * 60 + 20)  # the scheduler was away for ten due times
    scheduler.tick()
    assert [f.due_at.minute for f in fires(database)] == [10] * late_fires
    assert all(f.late for f in fires(database))
    clock.advance(40)  # 11:00: on time again
    scheduler.tick()
    assert [f.due_at.minute for f in fires(database)][-1] == 11


def test_a_fire_within_grace_still_happens_and_a_change_restarts_the_count(database):
    automation_id = add(database, AutomationSpec("tick", Every(60), "toggle", grace=60))
    clock = Clock(START)
    ((scheduler, _),) = schedulers(database, clock, 1)
    clock.advance(60 + 45)  # 45 s late: within grace
    scheduler.tick()
    assert [f.late for f in fires(database)] == [False]
    changed = START + timedelta(seconds=110)
    with database.session() as session:
        row = session.get(Automation, automation_id)
        row.definition = AutomationSpec("tick", Every(300), "toggle").to_json().decode()
        row.changed_at = changed.replace(tzinfo=None)
        session.commit()
    clock.advance(290)  # 10:06:35: the old plan's due times are gone, the new one is due at 10:06:50
    scheduler.tick()
    assert len(fires(database)) == 1
    clock.advance(20)
    scheduler.tick()
    assert fires(database)[-1].due_at == (changed + timedelta(seconds=300)).replace(tzinfo=None)


def test_a_disabled_or_deleted_automation_stops_and_its_plan_is_cleared(database):
    automation_id = add(database, AutomationSpec("tick", Every(60), "toggle"))
    clock = Clock(START)
    ((scheduler, bus),) = schedulers(database, clock, 1)
    scheduler.tick()
    assert (f"hacer/automations/{automation_id}", b"") not in bus.published
    with database.session() as session:
        session.get(Automation, automation_id).enabled = False
        session.commit()
    clock.advance(120)
    scheduler.tick()
    assert fires(database) == [] and bus.published[-1] == (f"hacer/automations/{automation_id}", b"")


def test_rest_automations_are_checked_saved_switched_and_deleted(tmp_path):
    import jsonschema

    from api.app import create_app
    from api.openapi import document
    from hacer.settings import Settings

    settings = Settings.from_env({"HADB_PATH": str(tmp_path / "api.db"), "HACER_SCRIPTS_DIR": str(tmp_path)})
    (tmp_path / "lamp.py").write_text("print('on')\n")
    Database(settings.database_url).init()
    app = create_app({"HACER_SETTINGS": settings, "HACER_BUS": PublishingBus(), "ASYNC_MODE": "threading"})
    client = app.test_client()
    components = document()["components"]

    def check(answer, status, path, method):
        assert answer.status_code == status, answer.get_json()
        schema = document()["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": components}).validate(answer.get_json())
        return answer.get_json()

    lamp = {"name": "lamp", "script": "lamp", "params": ["7"], "trigger": {"kind": "cron", "cron": "0 8 * * *"}}
    created = check(client.post("/api/automations", data=json.dumps(lamp)), 201, "/api/automations", "post")
    one = f"/api/automations/{created['id']}"
    assert created["definition"]["params"] == ["7"] and created["next_fires"][0].endswith("T08:00:00+00:00")
    assert len(created["next_fires"]) == 5 and created["last_runs"] == []
    refused = client.post("/api/automations", data=json.dumps({**lamp, "name": "b", "script": "nope"}))
    assert refused.status_code == 400 and "$.script" in refused.get_json()["message"]
    refused = client.post("/api/automations", data=json.dumps({**lamp, "trigger": {"kind": "cron", "cron": "x"}}))
    assert refused.status_code == 400 and "$.trigger.cron" in refused.get_json()["message"]
    assert client.post("/api/automations", data=json.dumps(lamp)).status_code == 409  # the name is taken
    # The due times from a day asked for, in the trigger's zone: Madrid's clocks skip 02:00-03:00 on
    # 28 March 2027, and the 02:30 fire comes at 03:00 then, as Debian's cron does.
    madrid = {**lamp, "name": "night", "trigger": {"kind": "cron", "cron": "30 2 * * *", "tz": "Europe/Madrid"}}
    night = check(client.post("/api/automations", data=json.dumps(madrid)), 201, "/api/automations", "post")
    path = "/api/automations/{automation_id}"
    listed = check(client.get(f"/api/automations/{night['id']}?from=2027-03-27T02:30&count=3"), 200, path, "get")
    assert listed["next_fires"] == [
        "2027-03-27T01:30:00+00:00",
        "2027-03-28T01:00:00+00:00",
        "2027-03-29T00:30:00+00:00",
    ]
    for query in ("from=27%20March", "from=0001-01-01T00:00%2B00:00", "count=0", "count=x"):
        assert client.get(f"/api/automations/{night['id']}?{query}").status_code == 400, query
    client.delete(f"/api/automations/{night['id']}")
    # A definition previewed: checked as saving it would, its next five due times, nothing saved.
    before = client.get("/api/automations").get_json()["automations"]
    path = "/api/automations/preview"
    shown = check(client.post(path, data=json.dumps({**madrid, "name": "preview"})), 200, path, "post")
    assert len(shown["next_fires"]) == 5 and shown["definition"]["name"] == "preview"
    dues = [datetime.fromisoformat(due) for due in shown["next_fires"]]
    assert dues == sorted(set(dues)) and dues[0] > datetime.now(UTC)  # daily from now (02:30, but on a DST night)
    bad = {**madrid, "trigger": {"kind": "cron", "cron": "61 * * * *"}}
    refused = check(client.post(path, data=json.dumps(bad)), 400, path, "post")
    assert "$.trigger.cron" in refused["message"]
    assert client.get("/api/automations").get_json()["automations"] == before
    # A fire's trace, as the scheduler wrote it.
    every = {**lamp, "name": "tick", "trigger": {"kind": "every", "seconds": 60}}
    ticking = check(client.post("/api/automations", data=json.dumps(every)), 201, "/api/automations", "post")
    ((scheduler, _),) = schedulers(Database(settings.database_url), Clock(datetime.now(UTC) + timedelta(seconds=61)), 1)
    scheduler.tick()
    path = "/api/automations/{automation_id}/traces"
    (trace,) = check(client.get(f"/api/automations/{ticking['id']}/traces"), 200, path, "get")["traces"]
    assert trace["trigger"] == {"kind": "time", "due": trace["due"]} and trace["definition"]["name"] == "tick"
    assert trace["steps"][0]["state"] == "queued" and trace["steps"][0]["run_id"].startswith("auto")
    assert client.get(f"/api/automations/{ticking['id']}/traces?limit=0").status_code == 400
    assert client.get("/api/automations/999999/traces").status_code == 404
    client.delete(f"/api/automations/{ticking['id']}")
    changed = {**lamp, "trigger": {"kind": "every", "seconds": 600}}
    check(client.put(one, data=json.dumps(changed)), 200, "/api/automations/{automation_id}", "put")
    disabled = check(client.post(f"{one}/disable"), 200, "/api/automations/{automation_id}/disable", "post")
    assert disabled["enabled"] is False and disabled["next_fires"] == []
    assert check(client.post(f"{one}/enable"), 200, "/api/automations/{automation_id}/enable", "post")["enabled"]
    listed = check(client.get("/api/automations"), 200, "/api/automations", "get")
    assert [a["definition"]["trigger"]["seconds"] for a in listed["automations"]] == [600]
    check(client.delete(one), 200, "/api/automations/{automation_id}", "delete")
    assert client.get(one).status_code == 404 and client.get("/api/automations").get_json() == {"automations": []}


def test_two_scheduler_processes_fire_every_due_time_once_through_a_kill(spawn, runner_env, start_runner, runs, watch):
    """Real schedulers, broker and runner: one scheduler SIGKILLed mid-way, no due time lost or run twice."""
    from support import wait_until

    database = Database(f"sqlite:///{runner_env['HADB_PATH']}")
    database.init()
    automation_id = add(database, AutomationSpec("each second", Every(1), "echo", ("tick",)), datetime.now(UTC))
    fired = watch(f"hacer/automations/{automation_id}/fired")
    start_runner()
    first = spawn(["scheduler"], {**runner_env, "HACER_SCHEDULER_ID": "first"})
    spawn(["scheduler"], {**runner_env, "HACER_SCHEDULER_ID": "second"})
    fired.wait_for(lambda m: True, timeout=20)
    wait_until(lambda: len(fired.messages) >= 3, 20, "three fires")
    first.stop(kill=True)
    killed_at = len(fired.messages)
    wait_until(lambda: len(fired.messages) >= killed_at + 3, 20, "three fires after the kill")
    with database.session() as session:
        session.get(Automation, automation_id).enabled = False
        session.commit()
    wait_until(lambda: fired.messages and len(fired.messages) == len(fires(database)), 10, "the last fire told")
    rows = fires(database)
    seconds = [(row.due_at - rows[0].due_at).total_seconds() for row in rows]
    assert seconds == list(range(len(rows))), "a due time skipped"  # and each once: the fire rows are unique
    told = [json.loads(m.payload)["run_id"] for m in fired.messages]
    assert sorted(told) == sorted(row.run_id for row in rows) and len(set(told)) == len(told)
    for row in rows:
        runs.wait_finished(row.run_id)
        assert [s.state for s in runs.statuses(row.run_id)].count("running") == 1
    assert rows[-1].scheduler == "second"  # the survivor went on alone


def test_a_for_wait_fires_once_across_a_scheduler_kill_and_a_broker_restart_and_not_for_a_node_back(
    spawn, hacer_env, broker, make_bus, watch
):
    """Real scheduler processes and broker: the waits live in the database, not in a process."""
    from hacer.automations import NodePresence, NodeValue
    from hacer.messages import NodeReadings, Presence, Reading
    from hacer.models import AutomationTrigger, AutomationWait

    from support import wait_until

    database = Database(f"sqlite:///{hacer_env['HADB_PATH']}")
    database.init()
    now = datetime.now(UTC)
    stays = add(database, AutomationSpec("5 gone", NodePresence(5, "offline", 10), "alert"), now)
    comes_back = add(database, AutomationSpec("6 gone", NodePresence(6, "offline", 10), "alert"), now)
    hot = add(database, AutomationSpec("7 hot", NodeValue(7, "temperature", above=25, lasting=10), "fan"), now)
    fired = watch("hacer/automations/+/fired")
    went = datetime.fromtimestamp(int(time.time()) + 1, UTC)

    def presence(node: int, state: str, since: datetime) -> None:  # as the bridge publishes it, retained
        make_bus().publish(
            f"hacer/nodes/{node}/presence",
            Presence(node, "toggle", "ip", state, since, since).to_payload(),
            retain=True,
        )

    def temperature(value: int) -> None:  # as the bridge publishes it, retained, read now
        at = datetime.now(UTC)
        readings = NodeReadings(7, {"temperature": Reading(value, at)}, True, at)
        make_bus().publish("hacer/nodes/7/readings", readings.to_payload(), retain=True)

    for node in (5, 6):
        presence(node, "offline", went)
    temperature(20)
    scheduler = spawn(["scheduler"], {**hacer_env, "HACER_SCHEDULER_ID": "first"})
    with database.session() as session:
        wait_until(lambda: session.scalar(select(AutomationTrigger.armed)), 20, "node 7's value seen, under 25")
        temperature(30)
        wait_until(lambda: len(session.scalars(select(AutomationWait)).all()) == 3, 20, "the three waits written")
    scheduler.stop(kill=True)
    killed_before_due = time.time() < went.timestamp() + 10
    broker.restart()
    presence(6, "online", went + timedelta(seconds=1))  # node 6 back before its 10 s
    spawn(["scheduler"], {**hacer_env, "HACER_SCHEDULER_ID": "second"})
    message = fired.wait_for(lambda m: m.topic == f"hacer/automations/{stays}/fired", timeout=30)
    assert json.loads(message.payload)["due"] == (went + timedelta(seconds=10)).isoformat().replace("+00:00", "Z")
    fired.wait_for(lambda m: m.topic == f"hacer/automations/{hot}/fired", timeout=30)  # still 30 after 10 s
    with database.session() as session:  # node 6's wait judged at its due time too: cancelled
        wait_until(lambda: session.scalars(select(AutomationWait)).all() == [], 20, "node 6's wait cancelled")
    rows = fires(database)
    assert sorted(row.automation_id for row in rows) == [stays, hot] and len(fired.messages) == 2
    assert comes_back not in (stays, hot)
    if killed_before_due:  # (a machine that took 10 s to start a scheduler tests less, and still passes)
        assert rows[0].scheduler == "second"  # the wait outlived the process that saw it begin


# --- bus triggers ---------------------------------------------------------------------------


def deliver(pair, topic: str, payload: bytes) -> None:
    """Hand each scheduler a bus message; a node's values (`nodes/<id>/state`) come as the bridge's
    readings of them, read now."""
    from hacer.bus import Message
    from hacer.messages import NodeReadings, Reading, bus_time

    if topic.endswith("/state"):
        node_id, at = int(topic.split("/")[2]), bus_time(pair[0][0].clock())
        readings = {key: Reading(value, at) for key, value in json.loads(payload).items()}
        topic, payload = topic.replace("/state", "/readings"), NodeReadings(node_id, readings, True, at).to_payload()
    for scheduler, _ in pair:
        scheduler._on_bus(Message(topic, payload, True, 1))
        scheduler.tick()


def with_node(database: Database, node_id: int = 5) -> None:
    from hacer.models import Node

    with database.session() as session:
        session.add(Node(id=node_id, name=None, type_id=1, ip="10.0.0.5"))
        session.commit()


def run_ids(pair) -> list[str]:
    return [r.run_id for _, bus in pair for r in bus.requests()]


def test_a_threshold_fires_once_per_crossing_with_hysteresis_across_two_schedulers(database):
    from hacer.automations import NodeValue

    spec = AutomationSpec("cold", NodeValue(5, "temperature", below=18, hysteresis=1), "heater", mode="parallel")
    add(database, spec)
    clock = Clock(START + timedelta(seconds=1))
    pair = schedulers(database, clock, 2)
    fired_at = []
    for value in (20, 17, 17, 18, 17, 19, 17, 16):
        clock.advance(1)
        before = len(run_ids(pair))
        deliver(pair, "hacer/nodes/5/state", json.dumps({"temperature": value}).encode())
        if len(run_ids(pair)) > before:
            fired_at.append(value)
    assert fired_at == [17, 17] and len(run_ids(pair)) == 2  # the crossing, and the one after 19 re-armed it


def test_a_first_value_already_past_the_threshold_is_no_crossing(database):
    from hacer.automations import NodeValue

    add(database, AutomationSpec("cold", NodeValue(5, "temperature", below=18), "heater"))
    clock = Clock(START + timedelta(seconds=1))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 15}')
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 14}')
    assert run_ids(pair) == []


def test_a_presence_transition_fires_once_however_often_it_is_seen(database):
    from hacer.automations import NodePresence
    from hacer.messages import Presence, bus_time

    add(database, AutomationSpec("gone", NodePresence(5, "offline"), "alert", mode="parallel"))
    clock = Clock(START + timedelta(seconds=30))
    pair = schedulers(database, clock, 2)
    went = START + timedelta(seconds=20)
    offline = Presence(5, "toggle", "10.0.0.5", "offline", went, went - timedelta(seconds=180)).to_payload()
    for _ in range(3):  # republished by the bridge's repair, redelivered after a broker restart
        deliver(pair, "hacer/nodes/5/presence", offline)
    online = Presence(5, "toggle", "10.0.0.5", "online", bus_time(went.timestamp() + 5), went).to_payload()
    deliver(pair, "hacer/nodes/5/presence", online)
    assert len(run_ids(pair)) == 1
    stale = START - timedelta(hours=1)  # a transition older than the automation: not its business
    deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "10.0.0.5", "offline", stale, stale).to_payload())
    assert len(run_ids(pair)) == 1


def offline_since(moment: datetime, state: str = "offline") -> bytes:
    from hacer.messages import Presence

    return Presence(5, "toggle", "10.0.0.5", state, moment, moment).to_payload()


def test_a_for_wait_fires_once_from_the_conditions_own_time_across_a_scheduler_restart(database):
    from api.automations import traces
    from hacer.automations import NodePresence
    from hacer.models import AutomationWait

    automation_id = add(database, AutomationSpec("gone 10 min", NodePresence(5, "offline", 600), "alert"))
    went = START + timedelta(seconds=20)
    clock = Clock(went + timedelta(seconds=90))  # the scheduler sees it 90 s after it began
    first = schedulers(database, clock, 1)
    deliver(first, "hacer/nodes/5/presence", offline_since(went))
    clock.advance(300)
    first[0][0].tick()
    assert run_ids(first) == []
    # The scheduler is gone (killed); another starts, and the broker gives it the retained presence.
    second = schedulers(database, clock, 1)
    deliver(second, "hacer/nodes/5/presence", offline_since(went))
    clock.advance(209)  # 599 s after the node went
    second[0][0].tick()
    assert run_ids(second) == []
    clock.advance(2)
    for _ in range(3):
        second[0][0].tick()
        first[0][0].tick()  # had it lived on, it would find the wait spent
    assert run_ids(first) == [] and len(run_ids(second)) == 1
    (fired,) = fires(database)
    assert fired.due_at == (went + timedelta(seconds=600)).replace(tzinfo=None) and not fired.late
    with database.session() as session:
        assert session.scalars(select(AutomationWait)).all() == []
        (trace,) = traces(session, automation_id)
    assert trace["trigger"] == {
        "kind": "presence",
        "node": 5,
        "state": "offline",
        "since": went.isoformat(),
        "for": 600,
    }


def test_a_pending_wait_is_shown_as_the_next_fire_until_it_ends(database):
    from hacer.automations import AutomationState, NodePresence, NodeValue

    gone = add(database, AutomationSpec("gone 10 min", NodePresence(5, "offline", 600), "alert"))
    hot = add(database, AutomationSpec("hot 5 min", NodeValue(5, "temperature", above=25, lasting=300), "fan"))
    went = START + timedelta(seconds=20)
    clock = Clock(went + timedelta(seconds=5))
    pair = schedulers(database, clock, 1)
    bus = pair[0][1]

    def next_fire(automation_id: int) -> datetime | None:
        topic = f"hacer/automations/{automation_id}"
        return AutomationState.from_payload([p for t, p in bus.published if t == topic][-1]).next_fire

    deliver(pair, "hacer/nodes/5/state", temperature(20))
    assert next_fire(gone) is None and next_fire(hot) is None
    deliver(pair, "hacer/nodes/5/presence", offline_since(went))
    deliver(pair, "hacer/nodes/5/state", temperature(30))
    assert next_fire(gone) == went + timedelta(seconds=600)
    assert next_fire(hot) == datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=300)
    clock.advance(60)
    deliver(pair, "hacer/nodes/5/presence", offline_since(went + timedelta(seconds=65), "online"))
    deliver(pair, "hacer/nodes/5/state", temperature(20))
    clock.advance(600)  # the presence wait judged at its due time: cancelled
    pair[0][0].tick()
    assert next_fire(gone) is None and next_fire(hot) is None and run_ids(pair) == []
    # A scheduler started while a wait is pending shows it at once.
    deliver(pair, "hacer/nodes/5/presence", offline_since(datetime.fromtimestamp(clock.now, UTC)))
    due = next_fire(gone)
    restarted = schedulers(database, clock, 1)
    restarted[0][0].tick()
    states = [AutomationState.from_payload(p) for t, p in restarted[0][1].published if t == f"hacer/automations/{gone}"]
    assert due is not None and [state.next_fire for state in states] == [due]


def test_a_for_automation_added_while_its_node_is_away_counts_from_the_nodes_since(database):
    from hacer.automations import NodePresence

    went = START + timedelta(seconds=20)
    clock = Clock(went + timedelta(seconds=60))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/5/presence", offline_since(went))
    add(database, AutomationSpec("gone 10 min", NodePresence(5, "offline", 600), "alert"), went + timedelta(seconds=30))
    clock.advance(2)
    pair[0][0].tick()  # the new automation planned: the node is away already
    clock.advance(539)  # 601 s after the node went
    pair[0][0].tick()
    (fired,) = fires(database)
    assert fired.due_at == (went + timedelta(seconds=600)).replace(tzinfo=None)


def test_a_for_wait_is_cancelled_when_the_node_came_back_and_judged_on_return_when_nobody_watched(database):
    from hacer.automations import NodePresence

    add(database, AutomationSpec("gone 10 min", NodePresence(5, "offline", 600), "alert", grace=300, mode="parallel"))
    went = START + timedelta(seconds=20)
    clock = Clock(went + timedelta(seconds=1))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/5/presence", offline_since(went))
    clock.advance(299)
    deliver(pair, "hacer/nodes/5/presence", offline_since(went + timedelta(seconds=300), "online"))  # back
    clock.advance(400)
    pair[0][0].tick()
    assert run_ids(pair) == []
    # Gone again: a new wait from the new `since`. The scheduler dies; the node comes back 650 s after
    # it went, while no scheduler runs: it lasted its 600 s, so the wait fires on return (within grace).
    again = went + timedelta(seconds=700)
    deliver(pair, "hacer/nodes/5/presence", offline_since(again))
    clock.advance(800)
    back = schedulers(database, clock, 1)
    deliver(back, "hacer/nodes/5/presence", offline_since(again + timedelta(seconds=650), "online"))
    assert len(run_ids(back)) == 1 and fires(database)[0].due_at == (again + timedelta(seconds=600)).replace(
        tzinfo=None
    )
    # Gone, back and gone again while nobody watched (a newer `since`): the first wait did not last.
    third = datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=10)
    restarted = schedulers(database, clock, 1)
    clock.advance(10)
    deliver(restarted, "hacer/nodes/5/presence", offline_since(third))
    clock.advance(640)  # 40 s past its due time: within grace
    later = schedulers(database, clock, 1)
    deliver(later, "hacer/nodes/5/presence", offline_since(third + timedelta(seconds=400)))
    assert len(fires(database)) == 1
    clock.advance(400)  # the new wait's due time
    later[0][0].tick()
    assert len(fires(database)) == 2 and fires(database)[1].due_at == (third + timedelta(seconds=1000)).replace(
        tzinfo=None
    )


def temperature(value: float) -> bytes:
    return json.dumps({"temperature": value}).encode()


def test_a_value_held_past_its_threshold_for_its_time_fires_once_and_a_return_cancels_it(database):
    from api.automations import traces
    from hacer.automations import NodeValue
    from hacer.models import AutomationWait

    hot = NodeValue(5, "temperature", above=25, hysteresis=1, lasting=300)
    automation_id = add(database, AutomationSpec("hot 5 min", hot, "fan", mode="parallel"))
    clock = Clock(START + timedelta(seconds=10))
    pair = schedulers(database, clock, 2)
    deliver(pair, "hacer/nodes/5/state", temperature(20))
    clock.advance(10)
    deliver(pair, "hacer/nodes/5/state", temperature(26))  # crossed: both see it, one waits
    crossed = datetime.fromtimestamp(clock.now, UTC)
    clock.advance(100)
    deliver(pair, "hacer/nodes/5/state", temperature(25))  # within the hysteresis: still waiting
    clock.advance(150)
    deliver(pair, "hacer/nodes/5/state", temperature(23))  # back, 250 s in: cancelled
    clock.advance(100)
    deliver(pair, "hacer/nodes/5/state", temperature(27))  # a new crossing, a new wait
    again = datetime.fromtimestamp(clock.now, UTC)
    clock.advance(299)
    deliver(pair, "hacer/nodes/5/state", temperature(28))
    assert run_ids(pair) == []
    clock.advance(1)
    for scheduler, _ in pair:
        scheduler.tick()
    assert len(run_ids(pair)) == 1
    (fired,) = fires(database)
    assert fired.due_at == (again + timedelta(seconds=300)).replace(tzinfo=None) and crossed < again
    with database.session() as session:
        assert session.scalars(select(AutomationWait)).all() == []
        (trace,) = traces(session, automation_id)
    assert trace["trigger"] == {
        "kind": "value",
        "node": 5,
        "key": "temperature",
        "value": 28,
        "since": again.isoformat(),
        "for": 300,
    }


def test_a_value_wait_outlives_its_scheduler_and_a_return_nobody_saw_is_read_from_the_samples(database):
    from hacer.automations import NodeValue
    from hacer.history import millis
    from hacer.models import NodeSample

    add(
        database,
        AutomationSpec(
            "hot 5 min", NodeValue(5, "temperature", above=25, lasting=300), "fan", grace=600, mode="parallel"
        ),
    )
    clock = Clock(START + timedelta(seconds=10))
    first = schedulers(database, clock, 1)
    deliver(first, "hacer/nodes/5/state", temperature(20))
    deliver(first, "hacer/nodes/5/state", temperature(30))
    began = clock.now
    clock.advance(120)  # the scheduler dies; another starts and gets the retained value
    second = schedulers(database, clock, 1)
    deliver(second, "hacer/nodes/5/state", temperature(30))
    clock.advance(179)
    second[0][0].tick()
    assert run_ids(second) == []
    clock.advance(1)
    second[0][0].tick()
    assert len(run_ids(second)) == 1  # the wait was the dead scheduler's: fired at its due time
    # Back and hot again while no scheduler ran: the recorder's samples show the value went back.
    deliver(second, "hacer/nodes/5/state", temperature(20))
    deliver(second, "hacer/nodes/5/state", temperature(30))
    began = clock.now
    with database.session() as session:
        for at, value in ((began + 100, 22.0), (began + 110, 31.0)):
            session.add(NodeSample(node_id=5, key="temperature", at_ms=millis(at), value=value))
        session.commit()
    clock.advance(400)
    third = schedulers(database, clock, 1)
    deliver(third, "hacer/nodes/5/state", temperature(31))
    assert run_ids(third) == [] and len(fires(database)) == 1


def run_ended(run_id: str, state: str, at: float, script: str = "backup") -> tuple[str, bytes]:
    from hacer.messages import RunStatus, bus_time

    moment = bus_time(at)
    return f"hacer/runs/{run_id}/status", RunStatus(
        run_id, script, (), state, "r", 1, moment, moment, moment
    ).to_payload()


def test_a_run_failing_with_no_success_for_its_time_fires_once_a_streak(database):
    from api.automations import traces
    from hacer.automations import RunFinished

    automation_id = add(database, AutomationSpec("backup broken", RunFinished("backup", lasting=3600), "alert"))
    clock = Clock(START + timedelta(seconds=10))
    pair = schedulers(database, clock, 2)
    for run_id, state in (("b1", "failed"), ("b2", "timed_out"), ("b3", "succeeded"), ("b4", "failed"), ("b5", "lost")):
        clock.advance(600)  # b1 starts a streak, b2 is in it, b3 ends it; b4 starts another, b5 is in it
        deliver(pair, *run_ended(run_id, state, clock.now))
        if run_id == "b4":
            streak = datetime.fromtimestamp(clock.now, UTC)
    clock.advance(3600 - 601)
    deliver(pair, *run_ended("other", "succeeded", clock.now, script="another"))  # another script's: no matter
    assert run_ids(pair) == []
    clock.advance(1)
    for scheduler, _ in pair:
        scheduler.tick()
    assert len(run_ids(pair)) == 1
    (fired,) = fires(database)
    assert fired.due_at == (streak + timedelta(seconds=3600)).replace(tzinfo=None)
    with database.session() as session:
        (trace,) = traces(session, automation_id)
    assert trace["trigger"] == {
        "kind": "run",
        "script": "backup",
        "states": ["failed", "timed_out", "lost"],
        "since": streak.isoformat(),
        "for": 3600,
    }


def test_a_success_no_scheduler_saw_ends_a_run_wait_from_the_recorded_runs(database):
    from hacer.automations import RunFinished

    add(database, AutomationSpec("backup broken", RunFinished("backup", lasting=3600), "alert", grace=600))
    clock = Clock(START + timedelta(seconds=10))
    first = schedulers(database, clock, 1)
    deliver(first, *run_ended("b1", "failed", clock.now))
    with database.session() as session:  # the scheduler is gone; a run succeeds, as the recorder writes it
        finished = datetime.fromtimestamp(clock.now + 1800, UTC).replace(tzinfo=None)
        session.add(Run(run_id="b2", script="backup", state="succeeded", requested_at=finished, finished_at=finished))
        session.commit()
    clock.advance(3700)
    later = schedulers(database, clock, 1)
    later[0][0].tick()
    assert run_ids(later) == [] and fires(database) == []


def test_a_value_wait_counts_from_when_the_value_was_read_not_from_when_a_scheduler_saw_it(database):
    from hacer.automations import NodeValue
    from hacer.messages import NodeReadings, Reading

    add(database, AutomationSpec("hot 5 min", NodeValue(5, "temperature", above=25, lasting=300), "fan"))
    clock = Clock(START + timedelta(seconds=10))
    first = schedulers(database, clock, 1)
    deliver(first, "hacer/nodes/5/state", temperature(20))  # seen under the threshold, then the scheduler dies
    read = START + timedelta(seconds=60)  # the bridge reads 30 while no scheduler runs
    clock.advance(170)
    second = schedulers(database, clock, 1)  # started 120 s later: the retained readings say when
    crossed = NodeReadings(5, {"temperature": Reading(30, read)}, True, read).to_payload()
    deliver(second, "hacer/nodes/5/readings", crossed)
    clock.advance(179)  # 299 s after the read
    second[0][0].tick()
    assert run_ids(second) == []
    clock.advance(1)
    second[0][0].tick()
    (fired,) = fires(database)
    assert fired.due_at == (read + timedelta(seconds=300)).replace(tzinfo=None) and not fired.late


def test_for_needs_a_threshold_on_a_value_trigger():
    from hacer.automations import NodeValue, check_trigger

    with pytest.raises(MessageError, match=r"`for` needs a threshold.*\$\.trigger\.for"):
        check_trigger(NodeValue(5, "on", lasting=60), None)


def test_cooldown_and_single_mode_hold_back_a_storm(database):
    from api.automations import traces
    from hacer.automations import AutomationHeldBack, RunFinished
    from hacer.messages import RunStatus, bus_time

    automation_id = add(database, AutomationSpec("on failure", RunFinished("crash"), "alert", cooldown=60))
    clock = Clock(START + timedelta(seconds=1))
    pair = schedulers(database, clock, 2)

    def failed(n: int) -> bytes:
        at = bus_time(clock.now)
        return RunStatus(f"c{n}", "crash", (), "failed", "r", 1, at, at, at).to_payload()

    for n in range(5):  # five failures within a minute: one alert
        clock.advance(5)
        deliver(pair, f"hacer/runs/c{n}/status", failed(n))
    assert len(run_ids(pair)) == 1
    clock.advance(61)  # the cooldown is over, but the first alert is still queued: single mode waits
    deliver(pair, "hacer/runs/c9/status", failed(9))
    assert len(run_ids(pair)) == 1
    with database.session() as session:
        session.scalars(select(Run).where(Run.run_id == run_ids(pair)[0])).one().state = "succeeded"
        session.commit()
    clock.advance(1)
    deliver(pair, "hacer/runs/c10/status", failed(10))
    assert len(run_ids(pair)) == 2
    with database.session() as session:
        assert session.get(Automation, automation_id).active_run == run_ids(pair)[1]
        outcomes = [(t["trigger"]["run_id"], t["outcome"], t["why"]) for t in traces(session, automation_id)]
    held = [(f"c{n}", "held back", "single") for n in (9, 4, 3, 2, 1)]  # each once, seen by two schedulers
    assert outcomes == [("c10", "fired", None), *held, ("c0", "fired", None)]
    told = [AutomationHeldBack.from_payload(p) for _, bus in pair for t, p in bus.published if t.endswith("/held")]
    assert {(event.id, event.why) for event in told} == {(automation_id, "single")} and len(told) >= 5


def test_what_the_cooldown_held_back_is_traced_once_beside_the_fires(database):
    from api.automations import traces
    from hacer.automations import RunFinished
    from hacer.messages import RunStatus, bus_time

    spec = AutomationSpec("on failure", RunFinished("crash"), "alert", cooldown=60, mode="parallel")
    automation_id = add(database, spec)
    clock = Clock(START + timedelta(seconds=1))
    pair = schedulers(database, clock, 2)
    for n in range(3):
        clock.advance(30)
        at = bus_time(clock.now)
        deliver(
            pair, f"hacer/runs/c{n}/status", RunStatus(f"c{n}", "crash", (), "failed", "r", 1, at, at, at).to_payload()
        )
    with database.session() as session:
        outcomes = [(t["trigger"]["run_id"], t["outcome"], t["why"]) for t in traces(session, automation_id)]
    assert outcomes == [("c2", "fired", None), ("c1", "held back", "cooldown"), ("c0", "fired", None)]


def test_conditions_gate_a_trigger(database):
    from hacer.automations import NodeValue, TimeWindow, ValueIs

    with_node(database, 6)
    spec = AutomationSpec(
        "cold at night",
        NodeValue(5, "temperature", below=18),
        "heater",
        conditions=(TimeWindow("22:00", "07:00", "UTC"), ValueIs(6, "on", equals=1)),
        mode="parallel",
    )
    add(database, spec)
    clock = Clock(datetime(2026, 12, 1, 23, 0, tzinfo=UTC))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/6/state", b'{"on": 0}')
    for value in (20, 17):  # at night, but the other node is off: spent, not run
        deliver(pair, "hacer/nodes/5/state", json.dumps({"temperature": value}).encode())
    deliver(pair, "hacer/nodes/6/state", b'{"on": 1}')
    for value in (20, 17):
        deliver(pair, "hacer/nodes/5/state", json.dumps({"temperature": value}).encode())
    assert len(run_ids(pair)) == 1
    clock.advance(9 * 3600)  # 08:00: outside the window
    for value in (20, 17):
        deliver(pair, "hacer/nodes/5/state", json.dumps({"temperature": value}).encode())
    assert len(run_ids(pair)) == 1


def test_a_time_trigger_fires_only_while_its_conditions_hold(database):
    from api.automations import traces
    from hacer.automations import TimeWindow, ValueIs

    with_node(database, 6)
    spec = AutomationSpec(
        "heat while home",
        Every(3600),
        "heater",
        conditions=(TimeWindow("08:00", "20:00", "UTC"), ValueIs(6, "on", equals=1)),
    )
    tick = add(database, spec, changed_at=datetime(2026, 12, 1, 5, 0, tzinfo=UTC))
    clock = Clock(datetime(2026, 12, 1, 5, 0, tzinfo=UTC))
    pair = schedulers(database, clock, 1)
    scheduler = pair[0][0]
    deliver(pair, "hacer/nodes/6/state", b'{"on": 1}')
    for hour in range(6, 11):  # 06:00 and 07:00 outside the window; 08:00 on; 09:00 the node off; 10:00 on
        clock.advance(3600)
        deliver(pair, "hacer/nodes/6/state", b'{"on": 0}' if hour == 9 else b'{"on": 1}')
        scheduler.tick()
    assert [f.due_at.hour for f in fires(database)] == [8, 10]
    assert scheduler.counts.held_back == 3
    with database.session() as session:
        latest, held, *_ = traces(session, tick)
        outcomes = [(aware_hour(t["due"]), t["outcome"], t["why"]) for t in traces(session, tick)]
    assert latest["trigger"] == {"kind": "time", "due": "2026-12-01T10:00:00+00:00"}
    assert [(c["seen"], c["held"]) for c in latest["conditions"]] == [("10:00", True), (1, True)]
    assert [(c["seen"], c["held"]) for c in held["conditions"]] == [("09:00", True), (0, False)]
    assert outcomes == [(10, "fired", None), (9, "held back", "conditions"), (8, "fired", None)] + [
        (hour, "held back", "conditions") for hour in (7, 6)
    ]
    deliver(pair, "hacer/nodes/6/state", b'{"on": 0}')
    for _ in range(30):  # a day and more held back: the latest 20 are kept
        clock.advance(3600)
        scheduler.tick()
    with database.session() as session:
        kept = [t for t in traces(session, tick, limit=100) if t["outcome"] == "held back"]
    assert len(kept) == HELD_KEPT and aware_hour(kept[0]["due"]) == 16  # 10:00 and 30 hours


def aware_hour(moment: str) -> int:
    return datetime.fromisoformat(moment).hour


def test_a_fire_keeps_its_trace_the_trigger_the_values_its_conditions_saw_its_run_and_the_definition(database):
    from api.automations import traces
    from hacer.automations import NodeValue, TimeWindow, ValueIs

    with_node(database, 6)
    spec = AutomationSpec(
        "cold at night",
        NodeValue(5, "temperature", below=18),
        "heater",
        conditions=(TimeWindow("22:00", "07:00", "Europe/Madrid"), ValueIs(6, "on", equals=1)),
        mode="parallel",
    )
    cold = add(database, spec)
    tick = add(database, AutomationSpec("tick", Every(60), "toggle", ("lamp", "on")))
    clock = Clock(datetime(2026, 12, 1, 23, 0, tzinfo=UTC))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/6/state", b'{"on": 1}')
    for value in (20, 17):
        deliver(pair, "hacer/nodes/5/state", json.dumps({"temperature": value}).encode())
    clock.advance(60)
    pair[0][0].tick()
    with database.session() as session:
        (fired,) = traces(session, cold)
        session.execute(
            update(Run).where(Run.run_id == fired["steps"][0]["run_id"]).values(state="succeeded", exit_code=0)
        )
        session.commit()
        (fired,) = traces(session, cold)
        (ticked,) = traces(session, tick)
    assert fired["trigger"] == {"kind": "value", "node": 5, "key": "temperature", "value": 17}
    assert fired["conditions"] == [
        {"condition": {"kind": "time", "after": "22:00", "before": "07:00", "tz": "Europe/Madrid"}, "seen": "00:00",
         "held": True},
        {"condition": {"kind": "value", "node": 6, "key": "on", "below": None, "above": None, "equals": 1}, "seen": 1,
         "held": True},
    ]  # fmt: skip
    assert (fired["steps"][0]["state"], fired["steps"][0]["exit_code"]) == ("succeeded", 0)
    assert fired["definition"] == json.loads(spec.to_json()) and fired["late"] is False
    assert ticked["trigger"] == {"kind": "time", "due": ticked["due"]} and ticked["conditions"] == []
    assert ticked["steps"][0]["state"] == "queued"


def test_a_value_trigger_sees_each_crossing_through_broker_and_scheduler_restarts(
    spawn, hacer_env, make_bus, watch, broker
):
    """Retained readings re-read on every (re)connect and compared with the trigger's row in the database."""
    from hacer.automations import NodeValue
    from hacer.messages import NodeReadings, Reading
    from hacer.models import AutomationTrigger

    from support import wait_until

    database = Database(f"sqlite:///{hacer_env['HADB_PATH']}")
    database.init()
    with_node(database)
    spec = AutomationSpec("cold", NodeValue(5, "temperature", below=18, hysteresis=1), "echo", mode="parallel")
    automation_id = add(database, spec, datetime.now(UTC))
    fired = watch(f"hacer/automations/{automation_id}/fired")
    node = make_bus()

    def value(temperature: int) -> None:  # as the bridge publishes it, retained, read now
        at = datetime.now(UTC)
        readings = NodeReadings(5, {"temperature": Reading(temperature, at)}, True, at)
        node.publish("hacer/nodes/5/readings", readings.to_payload(), retain=True)

    def armed() -> bool | None:
        with database.session() as session:
            row = session.get(AutomationTrigger, automation_id)
            return None if row is None else row.armed

    scheduler = spawn(["scheduler"], {**hacer_env, "HACER_SCHEDULER_ID": "one"})
    value(20)
    wait_until(lambda: armed() is True, 20, "the first value seen")
    value(17)
    fired.wait_for(lambda m: True, timeout=20)
    broker.restart(kill=True)  # everyone reconnects and gets the retained 17 again: no new crossing
    node.wait_connected(20)
    value(21)
    wait_until(lambda: armed() is True, 20, "re-armed after the restart")
    value(16)
    wait_until(lambda: len(fired.messages) == 2, 20, "the second crossing")
    value(22)
    wait_until(lambda: armed() is True, 20, "re-armed")
    scheduler.stop(kill=True)
    value(15)  # crossed while no scheduler runs: seen as the retained value when one starts
    spawn(["scheduler"], {**hacer_env, "HACER_SCHEDULER_ID": "two"})
    wait_until(lambda: len(fired.messages) == 3, 20, "the crossing made while the scheduler was down")
    wait_until(lambda: armed() is False, 10, "disarmed")
    assert len(fires(database)) == 3
    assert [json.loads(m.payload)["scheduler"] for m in fired.messages] == ["one", "one", "two"]


def test_rest_refuses_a_trigger_on_an_unknown_node(tmp_path):
    from api.app import create_app
    from hacer.settings import Settings

    settings = Settings.from_env({"HADB_PATH": str(tmp_path / "api.db"), "HACER_SCRIPTS_DIR": str(tmp_path)})
    (tmp_path / "heater.py").write_text("print('on')\n")
    Database(settings.database_url).init()
    client = create_app(
        {"HACER_SETTINGS": settings, "HACER_BUS": PublishingBus(), "ASYNC_MODE": "threading"}
    ).test_client()
    body = {"name": "cold", "script": "heater", "trigger": {"kind": "value", "node": 5, "key": "t", "below": 18}}
    refused = client.post("/api/automations", data=json.dumps(body))
    assert refused.status_code == 400 and "no node 5" in refused.get_json()["message"]
    both = {**body, "trigger": {**body["trigger"], "above": 30}}
    assert "not both" in client.post("/api/automations", data=json.dumps(both)).get_json()["message"]


def test_a_value_trigger_defined_later_knows_the_value_seen_before(database):
    from hacer.automations import NodeValue

    clock = Clock(START + timedelta(seconds=1))
    pair = schedulers(database, clock, 1)
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 20}')  # retained, before the automation exists
    automation_id = add(database, AutomationSpec("cold", NodeValue(5, "temperature", below=18), "heater"), START)
    clock.advance(1)  # the scheduler reads the table once a second
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 17}')
    assert len(run_ids(pair)) == 1
    with database.session() as session:  # a new threshold: the trigger sees its node afresh
        row = session.get(Automation, automation_id)
        row.definition = (
            AutomationSpec("cold", NodeValue(5, "temperature", below=10), "heater", mode="parallel").to_json().decode()
        )
        row.changed_at = (START + timedelta(seconds=2)).replace(tzinfo=None)
        session.commit()
    clock.advance(5)
    deliver(pair, "hacer/nodes/5/state", b'{"temperature": 9}')
    assert len(run_ids(pair)) == 2


def test_restart_mode_cancels_the_run_it_replaces(database):
    from hacer.automations import NodePresence
    from hacer.messages import Presence

    add(database, AutomationSpec("gone", NodePresence(5, "offline"), "alert", mode="restart"))
    clock = Clock(START + timedelta(seconds=10))
    pair = schedulers(database, clock, 2)
    for seconds in (2, 6):  # two transitions while the first alert is still queued
        went = START + timedelta(seconds=seconds)
        deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "ip", "offline", went, went).to_payload())
    first, second = run_ids(pair)
    cancels = [t for _, bus in pair for t, _ in bus.published if t.endswith("/cancel")]
    assert cancels == [f"hacer/runs/{first}/cancel"]
    with database.session() as session:
        assert session.scalars(select(Automation)).one().active_run == second


def test_the_live_view_relays_automation_plans_and_fires(tmp_path):
    from test_api_components import RecordingBus

    from api.live import LiveView
    from hacer.automations import AutomationFired, AutomationHeldBack, AutomationState, AutomationStepEnded

    bus = RecordingBus()
    live = LiveView(bus, Topics())  # type: ignore[arg-type]
    live.subscribe()
    events = []
    live.add_listener(events.append)
    spec = AutomationSpec("tick", Every(60), "toggle")
    due = START + timedelta(minutes=1)
    bus.deliver("hacer/automations/3", AutomationState(3, spec, due).to_payload(), retain=True)
    bus.deliver("hacer/automations/3/fired", AutomationFired(3, "tick", due, "auto-3-x", "s").to_payload())
    assert json.loads(json.dumps(live.snapshot()["automations"])) == [  # as the websocket sends it
        {"id": 3, "name": "tick", "definition": json.loads(spec.to_json()), "next_fire": due.isoformat()}
    ]
    assert [e["kind"] for e in events] == ["automation", "automation_fired"]
    assert events[1]["data"]["run_id"] == "auto-3-x"
    bus.deliver("hacer/automations/3/held", AutomationHeldBack(3, "tick", due, "cooldown", "s").to_payload())
    assert events[-1]["kind"] == "automation_held" and events[-1]["data"]["why"] == "cooldown"
    ended = AutomationStepEnded(3, "tick", "auto-3-x", 1, "wait", "done", due, due + timedelta(seconds=5))
    bus.deliver("hacer/automations/3/step", ended.to_payload())
    assert events[-1]["kind"] == "automation_step"
    assert json.loads(json.dumps(events[-1]["data"])) == json.loads(ended.to_payload())  # as the websocket sends it
    bus.deliver("hacer/automations/3", b"", retain=True)  # disabled
    assert live.snapshot()["automations"] == [] and events[-1]["kind"] == "automation_removed"


def test_queued_mode_starts_each_fire_when_the_run_before_it_ended(database):
    from hacer.automations import NodePresence
    from hacer.messages import Presence, RunStatus, bus_time

    add(database, AutomationSpec("gone", NodePresence(5, "offline"), "alert", mode="queued"))
    clock = Clock(START + timedelta(seconds=20))
    pair = schedulers(database, clock, 2)
    for seconds in (2, 6, 9):  # three transitions while the first run has not ended
        went = START + timedelta(seconds=seconds)
        deliver(pair, "hacer/nodes/5/presence", Presence(5, "toggle", "ip", "offline", went, went).to_payload())
    assert len(run_ids(pair)) == 1
    assert [f.pending for f in fires(database)] == [False, True, True]
    order = [f.run_id for f in fires(database)]  # by due time
    ended = order[0]
    for expected in (2, 3):
        with database.session() as session:  # as the recorder writes it
            session.scalars(select(Run).where(Run.run_id == ended)).one().state = "succeeded"
            session.commit()
        at = bus_time(clock.now)
        status = RunStatus(ended, "alert", (), "succeeded", "r", 0, at, at, at).to_payload()
        deliver(pair, f"hacer/runs/{ended}/status", status)
        assert sorted(run_ids(pair)) == order[:expected]  # the next in line, by one of the two schedulers
        ended = order[expected - 1]
    assert [f.pending for f in fires(database)] == [False, False, False]
