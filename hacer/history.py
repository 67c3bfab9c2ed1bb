"""Node history: what the recorder keeps of node values and availability, and how it is read back.

A sample is a value as the bridge's readings gave it; it holds from its time until the next one
(readings are published on change). Past `raw_days` samples are rolled up into buckets of
`step` seconds (low, mean, high, count) and the raw rows go; rollups and availability changes go
past `keep_days`. Times are Unix milliseconds in BIGINT columns, so a time's bucket is the same
integer division in SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, delete, exists, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from hacer.messages import NodeReadings, Presence
from hacer.models import NodeAvailability, NodeRollup, NodeSample

DAY_MS = 86_400_000
ROLL_UP_WINDOW_MS = 3_600_000  # samples rolled up per transaction: an hour of every node
MAX_RAW_POINTS = 5000  # beyond this many samples, a history without a step is given in buckets
MAX_BUCKETS = 2000
AVAILABILITY_KINDS = (("online", "offline"), ("answering", "not_answering"))
NICE_STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)


@dataclass(frozen=True)
class HistoryRetention:
    """How long node history is kept, and how finely."""

    raw_days: float = 7.0
    keep_days: float = 730.0
    step: int = 300  # seconds of a rollup bucket


def millis(seconds: float) -> int:
    """Unix milliseconds of a Unix time."""
    return int(seconds * 1000)


def sample_rows(readings: NodeReadings) -> list[dict[str, Any]]:
    """The node_sample rows of a readings message (their times make a repeat a duplicate)."""
    return [
        {
            "node_id": readings.node_id,
            "key": key,
            "at_ms": millis(reading.at.timestamp()),
            "value": None if isinstance(reading.value, str) else float(reading.value),
            "text": reading.value if isinstance(reading.value, str) else None,
        }
        for key, reading in readings.values.items()
    ]


def availability_of_readings(readings: NodeReadings) -> dict[str, Any]:
    """The node_availability row of whether a node answers."""
    state = "answering" if readings.answering else "not_answering"
    return {
        "node_id": readings.node_id,
        "at_ms": millis(readings.since.timestamp()),
        "state": state,
        "reason": readings.error,
    }


def availability_of_presence(presence: Presence) -> dict[str, Any]:
    """The node_availability row of a node's presence."""
    return {
        "node_id": presence.id,
        "at_ms": millis(presence.since.timestamp()),
        "state": presence.state,
        "reason": None,
    }


# --- rolling up and purging -------------------------------------------------------------------


def roll_up(connection: Connection, retention: HistoryRetention, now_ms: int) -> tuple[int, int]:
    """Roll samples older than `raw_days` into buckets and drop them, then drop what is past `keep_days`.

    Returns (samples rolled up, rows dropped past keep_days). Each hour of samples is one
    transaction; a late sample in a bucket already rolled up is added to it.
    """
    step_ms = retention.step * 1000
    cutoff = (now_ms - int(retention.raw_days * DAY_MS)) // step_ms * step_ms
    rolled = 0
    while True:
        with connection.begin():
            oldest = connection.scalar(select(func.min(NodeSample.at_ms)).where(NodeSample.at_ms < cutoff))
            if oldest is None:
                break
            until = min(cutoff, (oldest // step_ms * step_ms) + ROLL_UP_WINDOW_MS)
            window = (NodeSample.at_ms >= oldest) & (NodeSample.at_ms < until)
            connection.execute(_merge_buckets(connection, window, step_ms))
            rolled += connection.execute(delete(NodeSample).where(window)).rowcount or 0
    keep = now_ms - int(retention.keep_days * DAY_MS)
    dropped = 0
    with connection.begin():
        dropped += connection.execute(delete(NodeRollup).where(NodeRollup.start_ms < keep)).rowcount or 0
        dropped += connection.execute(delete(NodeSample).where(NodeSample.at_ms < keep)).rowcount or 0
        # Each node's last change of each kind before the cut stays: it says what the node was at the cut.
        for states in AVAILABILITY_KINDS:
            later = aliased(NodeAvailability)
            superseded = exists().where(
                later.node_id == NodeAvailability.node_id,
                later.state.in_(states),
                later.at_ms > NodeAvailability.at_ms,
                later.at_ms < keep,
            )
            old = (NodeAvailability.at_ms < keep) & NodeAvailability.state.in_(states) & superseded
            dropped += connection.execute(delete(NodeAvailability).where(old)).rowcount or 0
    return rolled, dropped


def _merge_buckets(connection: Connection, window: Any, step_ms: int) -> Any:
    bucket = (NodeSample.at_ms // literal(step_ms, BigInteger)) * literal(step_ms, BigInteger)
    buckets = (
        select(
            NodeSample.node_id,
            NodeSample.key,
            bucket,
            literal(step_ms, BigInteger),
            func.min(NodeSample.value),
            func.max(NodeSample.value),
            func.sum(NodeSample.value),
            func.count(NodeSample.value),
        )
        .where(window, NodeSample.value.is_not(None))
        .group_by(NodeSample.node_id, NodeSample.key, bucket)
    )
    postgres = connection.dialect.name == "postgresql"
    insert = (postgresql if postgres else sqlite).insert(NodeRollup)
    lower, higher = (func.least, func.greatest) if postgres else (func.min, func.max)
    statement = insert.from_select(["node_id", "key", "start_ms", "step_ms", "low", "high", "total", "count"], buckets)
    return statement.on_conflict_do_update(
        index_elements=["node_id", "key", "start_ms"],
        set_={
            "low": lower(NodeRollup.low, statement.excluded.low),
            "high": higher(NodeRollup.high, statement.excluded.high),
            "total": NodeRollup.total + statement.excluded.total,
            "count": NodeRollup.count + statement.excluded.count,
        },
    )


# --- reading back -----------------------------------------------------------------------------


def choose_step(span_ms: int, floor_seconds: int = 0) -> int:
    """A round bucket size (seconds) that gives at most MAX_BUCKETS over `span_ms`."""
    wanted = max(math.ceil(span_ms / 1000 / MAX_BUCKETS), floor_seconds, 1)
    return next((step for step in NICE_STEPS if step >= wanted), wanted)


def history(
    connection: Connection, node_id: int, key: str | None, since_ms: int, until_ms: int, step: int | None
) -> dict[str, Any]:
    """A node's history between two times: a key's points (raw, or in buckets) and its availability.

    Raw points are `[t, value]`; bucketed ones `[t, low, mean, high, count]` (t in Unix seconds,
    a bucket's start). `before` is the sample in effect at `since_ms`, when there is one.
    """
    answer: dict[str, Any] = {"node_id": node_id, "since": since_ms / 1000, "until": until_ms / 1000}
    if key:
        if step is None:
            step = _auto_step(connection, node_id, key, since_ms, until_ms)
        answer.update(key=key, step=step)
        if step:
            answer["points"] = _buckets(connection, node_id, key, since_ms, until_ms, step * 1000)
        else:
            answer["points"] = _raw(connection, node_id, key, since_ms, until_ms)
            if len(answer["points"]) > MAX_RAW_POINTS:  # the first ones, and where the rest begins
                del answer["points"][MAX_RAW_POINTS:]
                answer["truncated"] = True
                answer["next_since"] = (round(answer["points"][-1][0] * 1000) + 1) / 1000
        before = connection.execute(
            select(NodeSample.at_ms, NodeSample.value, NodeSample.text)
            .where(NodeSample.node_id == node_id, NodeSample.key == key, NodeSample.at_ms < since_ms)
            .order_by(NodeSample.at_ms.desc())
            .limit(1)
        ).first()
        answer["before"] = None if before is None else _point(before)
    answer["availability"] = _availability(connection, node_id, since_ms, until_ms)
    return answer


def _auto_step(connection: Connection, node_id: int, key: str, since_ms: int, until_ms: int) -> int:
    rolled = connection.scalar(
        select(NodeRollup.step_ms)
        .where(NodeRollup.node_id == node_id, NodeRollup.key == key)
        .where(NodeRollup.start_ms >= since_ms, NodeRollup.start_ms < until_ms)
        .limit(1)
    )
    if rolled is None:
        in_range = (
            select(NodeSample.at_ms)
            .where(NodeSample.node_id == node_id, NodeSample.key == key)
            .where(NodeSample.at_ms >= since_ms, NodeSample.at_ms < until_ms)
            .limit(MAX_RAW_POINTS + 1)
            .subquery()
        )
        if (connection.scalar(select(func.count()).select_from(in_range)) or 0) <= MAX_RAW_POINTS:
            return 0
    return choose_step(until_ms - since_ms, (rolled or 0) // 1000)


def _point(row: Any) -> list[Any]:
    return [row.at_ms / 1000, row.text if row.value is None else _number(row.value)]


def _number(value: float) -> float | int:
    return int(value) if value.is_integer() else value


def _raw(connection: Connection, node_id: int, key: str, since_ms: int, until_ms: int) -> list[list[Any]]:
    rows = connection.execute(
        select(NodeSample.at_ms, NodeSample.value, NodeSample.text)
        .where(NodeSample.node_id == node_id, NodeSample.key == key)
        .where(NodeSample.at_ms >= since_ms, NodeSample.at_ms < until_ms)
        .order_by(NodeSample.at_ms)
        .limit(MAX_RAW_POINTS + 1)
    )
    return [_point(row) for row in rows]


def _buckets(
    connection: Connection, node_id: int, key: str, since_ms: int, until_ms: int, step_ms: int
) -> list[list[Any]]:
    step = literal(step_ms, BigInteger)
    raw_bucket = (NodeSample.at_ms // step) * step
    rolled_bucket = (NodeRollup.start_ms // step) * step
    raw = (
        select(
            raw_bucket,
            func.min(NodeSample.value),
            func.sum(NodeSample.value),
            func.max(NodeSample.value),
            func.count(NodeSample.value),
        )
        .where(NodeSample.node_id == node_id, NodeSample.key == key, NodeSample.value.is_not(None))
        .where(NodeSample.at_ms >= since_ms, NodeSample.at_ms < until_ms)
        .group_by(raw_bucket)
    )
    rolled = (
        select(
            rolled_bucket,
            func.min(NodeRollup.low),
            func.sum(NodeRollup.total),
            func.max(NodeRollup.high),
            func.sum(NodeRollup.count),
        )
        .where(NodeRollup.node_id == node_id, NodeRollup.key == key)
        .where(NodeRollup.start_ms >= since_ms, NodeRollup.start_ms < until_ms)
        .group_by(rolled_bucket)
    )
    merged: dict[int, tuple[float, float, float, int]] = {}
    for statement in (rolled, raw):
        for row in connection.execute(statement):
            if not row[4]:
                continue
            # PostgreSQL's sums are NUMERIC (Decimal): the arithmetic here is in floats.
            start, low, total, high, count = int(row[0]), float(row[1]), float(row[2]), float(row[3]), int(row[4])
            if start in merged:
                kept = merged[start]
                merged[start] = (min(kept[0], low), kept[1] + total, max(kept[2], high), kept[3] + count)
            else:
                merged[start] = (low, total, high, count)
    return [
        [start / 1000, _number(low), round(total / count, 6), _number(high), count]
        for start, (low, total, high, count) in sorted(merged.items())
    ]


def _availability(connection: Connection, node_id: int, since_ms: int, until_ms: int) -> list[dict[str, Any]]:
    of_node = NodeAvailability.node_id == node_id
    rows = list(
        connection.execute(
            select(NodeAvailability.at_ms, NodeAvailability.state, NodeAvailability.reason)
            .where(of_node, NodeAvailability.at_ms >= since_ms, NodeAvailability.at_ms < until_ms)
            .order_by(NodeAvailability.at_ms)
        )
    )
    # What the node was when the range began: its last presence and answering changes before it.
    for states in AVAILABILITY_KINDS:
        before = connection.execute(
            select(NodeAvailability.at_ms, NodeAvailability.state, NodeAvailability.reason)
            .where(of_node, NodeAvailability.at_ms < since_ms, NodeAvailability.state.in_(states))
            .order_by(NodeAvailability.at_ms.desc())
            .limit(1)
        ).first()
        if before is not None:
            rows.insert(0, before)
    rows.sort(key=lambda row: row.at_ms)
    return [{"t": row.at_ms / 1000, "state": row.state, "reason": row.reason} for row in rows]
