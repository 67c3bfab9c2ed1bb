"""Node history on SQLite and PostgreSQL: samples, rollups past the raw days, availability, reading back."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from hacer.history import HistoryRetention, availability_of_readings, choose_step, history, roll_up, sample_rows
from hacer.messages import NodeReadings, Reading, bus_time
from hacer.models import NodeAvailability, NodeRollup, NodeSample, insert_ignoring_duplicates

DAY = 86400
NOW = 1_800_000_000  # a Unix time on a 5-minute boundary
RETENTION = HistoryRetention(raw_days=1, keep_days=30, step=300)


def readings(node_id, at, answering=True, error=None, **values):
    return NodeReadings(
        node_id, {k: Reading(v, bus_time(at)) for k, v in values.items()}, answering, bus_time(at), error
    )


def write(database, *messages):
    with database.session() as session:
        for message in messages:
            insert_ignoring_duplicates(session, NodeSample.__table__, sample_rows(message), ["node_id", "key", "at_ms"])
            insert_ignoring_duplicates(
                session, NodeAvailability.__table__, [availability_of_readings(message)], ["node_id", "at_ms", "state"]
            )
        session.commit()


def read(database, node_id=1, key="temperature", since=NOW - 3 * DAY, until=NOW, step=None):
    with database.engine.connect() as connection:
        return history(connection, node_id, key, since * 1000, until * 1000, step)


def test_raw_points_hold_until_the_next_and_a_repeat_is_one_sample(database):
    write(database, readings(1, NOW - 100, temperature=21, name="hall"), readings(1, NOW - 50, temperature=22))
    write(database, readings(1, NOW - 50, temperature=22))  # delivered twice
    got = read(database, since=NOW - 60)
    assert got["step"] == 0 and got["points"] == [[NOW - 50, 22]]
    assert got["before"] == [NOW - 100, 21]
    assert read(database, key="name")["points"] == [[NOW - 100, "hall"]]
    assert read(database, node_id=2)["points"] == [] and read(database, node_id=2)["before"] is None


def test_buckets_agree_before_and_after_the_raw_samples_are_rolled_up(database):
    # Two days of a sample every minute: 20.0, 20.5, ... cycling, so each bucket has its own spread.
    samples = [readings(1, NOW - 2 * DAY + 60 * i, temperature=20 + i % 7) for i in range(2 * 24 * 60)]
    write(database, *samples)
    before = read(database, step=3600)
    rolled, dropped = roll_up(database.engine.connect(), RETENTION, NOW * 1000)
    assert rolled == 24 * 60 and dropped == 0  # the older day, to the bucket boundary
    after = read(database, step=3600)
    assert after["points"] == before["points"] and len(after["points"]) == 48
    start, low, mean, high, count = after["points"][0]
    assert (start, low, high, count) == (NOW - 2 * DAY, 20, 26, 60)
    assert mean == pytest.approx(sum(20 + i % 7 for i in range(60)) / 60)
    # A sample arriving late for a bucket already rolled up joins it.
    write(database, readings(1, NOW - 2 * DAY + 30, temperature=40))
    with database.engine.connect() as connection:
        assert roll_up(connection, RETENTION, NOW * 1000)[0] == 1
    assert read(database, step=3600)["points"][0][3:] == [40, 61]
    with database.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(NodeRollup)) == 24 * 12


def test_without_a_step_many_samples_come_in_buckets_and_rollups_are_never_raw(database):
    write(database, *[readings(1, NOW - DAY + 10 * i, temperature=i % 50) for i in range(6000)])
    many = read(database, since=NOW - DAY)
    assert many["step"] == choose_step(DAY * 1000) == 60 and sum(p[4] for p in many["points"]) == 6000
    hour = {"since": NOW - DAY, "until": NOW - DAY + 3600}
    few = read(database, **hour)
    assert few["step"] == 0 and len(few["points"]) == 360
    with database.engine.connect() as connection:
        roll_up(connection, HistoryRetention(raw_days=0.5, step=300), NOW * 1000)
    rolled = read(database, **hour)
    assert rolled["step"] == 300 and [p[4] for p in rolled["points"]] == [30] * 12


def test_availability_keeps_what_a_node_was_when_the_range_begins(database):
    write(
        database,
        readings(1, NOW - 40 * DAY, temperature=20),
        readings(1, NOW - 35 * DAY, answering=False, error="no reply within 3 s"),
        readings(1, NOW - 34 * DAY),
        readings(1, NOW - 3600, answering=False, error="cannot reach 10.0.0.5:7777"),
    )
    with database.engine.connect() as connection:
        _, dropped = roll_up(connection, RETENTION, NOW * 1000)
    assert dropped == 3  # the sample (as its rollup) and the two answering changes before the last one past the cut
    got = read(database, since=NOW - 2 * DAY)["availability"]
    assert [(a["t"], a["state"], a["reason"]) for a in got] == [
        (NOW - 34 * DAY, "answering", None),
        (NOW - 3600, "not_answering", "cannot reach 10.0.0.5:7777"),
    ]


def test_every_sample_asked_for_comes_in_pages(database):
    write(database, *[readings(1, NOW - DAY + 10 * i, temperature=i % 50) for i in range(6000)])
    first = read(database, since=NOW - DAY, step=0)
    assert first["truncated"] is True and len(first["points"]) == 5000
    rest = read(database, since=first["next_since"], step=0)
    assert "truncated" not in rest and len(rest["points"]) == 1000
    assert [p[0] for p in first["points"] + rest["points"]] == [NOW - DAY + 10 * i for i in range(6000)]
