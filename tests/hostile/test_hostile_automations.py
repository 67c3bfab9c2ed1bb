"""One bad automation against the api and the scheduler: refused where it can be, alone where it cannot."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select
from test_automations import START, Clock, add, fires, schedulers

from bench.common import free_port
from hacer.automations import (
    SECONDS_PER_YEAR,
    AutomationSpec,
    Every,
    describe_all,
    location_of,
    next_due,
    upcoming,
)
from hacer.messages import MessageError
from hacer.models import Automation, AutomationFire
from ops.broker import port_answers

from support import API_MODES, wait_until

END_OF_TIME = {"kind": "at", "at": "9999-12-31T23:59", "tz": "America/Los_Angeles"}


@pytest.fixture(scope="module")
def api(live_api):
    return live_api


def test_a_time_no_date_can_hold_is_refused_and_the_list_stays_readable(api):
    body = {"name": "end of time", "script": "toggle", "params": ["1000", "1"], "trigger": END_OF_TIME}
    answer = requests.post(api.url + "/api/automations", data=json.dumps(body), timeout=10)
    assert answer.status_code == 400 and "$.trigger.at" in answer.json()["message"], answer.text
    listed = requests.get(api.url + "/api/automations", timeout=10)
    assert listed.status_code == 200
    assert "end of time" not in [a["name"] for a in listed.json()["automations"]]


def test_one_automation_that_cannot_be_planned_fails_alone(database, monkeypatch):
    import scheduler.service

    add(database, AutomationSpec("broken", Every(61), "toggle"))
    healthy = add(database, AutomationSpec("healthy", Every(60), "toggle"))
    switched_off = add(database, AutomationSpec("switched off", Every(60), "toggle", enabled=False))

    def next_due_with_a_bug(trigger, after, since, location):  # as an arithmetic error in one trigger kind would
        if isinstance(trigger, Every) and trigger.seconds == 61:
            raise OverflowError("date value out of range")
        return next_due(trigger, after, since, location)

    monkeypatch.setattr(scheduler.service, "next_due", next_due_with_a_bug)
    clock = Clock(START)
    ((planner, bus),) = schedulers(database, clock, 1)
    for _ in range(3):
        planner.tick()
        clock.advance(60)
    planner.tick()
    assert {fire.automation_id for fire in fires(database)} == {healthy}
    assert len(fires(database)) == 3 and planner.counts.failed == 1
    with database.session() as session:
        shown = {a["name"]: a for a in describe_all(session, None, START)}
        assert "OverflowError" in shown["broken"]["failure"]
        assert shown["healthy"]["failure"] is None and shown["healthy"]["next_fires"]
        assert shown["switched off"]["failure"] is None
        session.get(Automation, healthy).enabled = False  # switching one off still works while another is broken
        session.commit()
    clock.advance(600)
    planner.tick()
    assert len(fires(database)) == 3 and switched_off not in {fire.automation_id for fire in fires(database)}


def test_a_deleted_automations_id_is_never_given_again(database):
    first = add(database, AutomationSpec("first", Every(60), "toggle"))
    clock = Clock(START)
    ((planner, _),) = schedulers(database, clock, 1)
    clock.advance(61)
    planner.tick()
    with database.session() as session:
        session.delete(session.get(Automation, first))
        session.commit()
    second = add(database, AutomationSpec("second", Every(60), "toggle"))
    assert second > first
    with database.session() as session:
        shown = {a["id"]: a for a in describe_all(session, None, START)}
        assert shown[second]["last_runs"] == []  # not the deleted one's fire
        assert [f.automation_id for f in session.scalars(select(AutomationFire))] == [first]


def test_listing_many_automations_takes_two_queries(database):
    for n in range(50):
        add(database, AutomationSpec(f"a{n}", Every(60 + n), "toggle"))
    queries: list[str] = []
    event.listen(database.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    with database.session() as session:
        assert len(describe_all(session, None, START)) == 50
    assert len(queries) == 2, queries


# --- no definition the api accepts can raise in the scheduler ---------------------------------------

ZONES = ["UTC", "America/Los_Angeles", "Pacific/Kiritimati", "Etc/GMT+12", "Australia/Lord_Howe", "Europe/Madrid"]
MOMENTS = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))
TRIGGERS = st.one_of(
    st.builds(
        lambda moment, tz: {"kind": "at", "at": moment.strftime("%Y-%m-%dT%H:%M").rjust(16, "0"), "tz": tz},
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
        st.sampled_from(ZONES),
    ),
    st.builds(
        lambda fields, tz: {"kind": "cron", "cron": " ".join(fields), "tz": tz},
        st.tuples(
            st.sampled_from(["*", "0", "59", "*/7", "1-5"]),
            st.sampled_from(["*", "0", "23", "2", "2-3"]),
            st.sampled_from(["*", "1", "29", "31", "L"]),
            st.sampled_from(["*", "2", "12", "1-3"]),
            st.sampled_from(["*", "0", "6", "1-5"]),
        ),
        st.sampled_from(ZONES),
    ),
    st.builds(lambda seconds: {"kind": "every", "seconds": seconds}, st.integers(1, SECONDS_PER_YEAR)),
    st.builds(
        lambda event, offset, tz: {"kind": "sun", "event": event, "offset": offset, "tz": tz},
        st.sampled_from(["dawn", "sunrise", "noon", "sunset", "dusk"]),
        st.integers(-6 * 3600, 6 * 3600),
        st.sampled_from(ZONES),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trigger=TRIGGERS,
    changed=MOMENTS,
    after=MOMENTS,
    latitude=st.floats(-89.9, 89.9),
    longitude=st.floats(-180, 180),
)
def test_no_accepted_definition_raises_when_planned(trigger, changed, after, latitude, longitude):
    location = location_of(latitude, longitude)
    try:
        spec = AutomationSpec.from_json(json.dumps({"name": "p", "script": "s", "trigger": trigger}), location)
    except MessageError:
        return  # refused with a 400: never reaches the scheduler
    dues = upcoming(spec, changed, after, location, 3)
    assert dues == sorted(dues) and all(due > after for due in dues)
    following = next_due(spec.trigger, after + timedelta(days=1), changed.replace(microsecond=0), location)
    assert following is None or following > after


@pytest.mark.parametrize("mode", list(API_MODES))
def test_a_user_can_create_only_so_many_automations(mode, spawn, hacer_env):
    port = free_port()
    spawn(API_MODES[mode], {**hacer_env, "HACER_HTTP_PORT": str(port), "HACER_MAX_AUTOMATIONS": "2"})
    wait_until(lambda: port_answers("127.0.0.1", port), 30, "the api")
    url = f"http://127.0.0.1:{port}/api/automations"
    test = {"script": "test", "trigger": {"kind": "every", "seconds": 60}}
    assert [requests.post(url, json={**test, "name": f"a{n}"}, timeout=10).status_code for n in range(3)] == [
        201,
        201,
        409,
    ]
    assert "HACER_MAX_AUTOMATIONS" in requests.post(url, json={**test, "name": "a9"}, timeout=10).json()["message"]
