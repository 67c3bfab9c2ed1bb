"""`manage.py status`: whether the whole server is up, for people and for monitoring.

Read from the bus (every part's retained state, the bridge's counters, node presence) and from
the database (runs, dead letters, the schema's revision), so it answers while the api is down.
A problem is a part that is expected and not online, a database that cannot be read or is behind
its schema, a broker that cannot be reached; the exit code says which (see EXIT_*).
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy import func, select

from hacer import migrations, runstates
from hacer.bus import Bus, BusError, Message
from hacer.messages import BridgeStats, MessageError, Presence, RecorderState, RunnerState
from hacer.models import Database, DeadLetter, Run, schema_revision, utc_datetime
from hacer.settings import without_password
from hacer.topics import TopicError, Topics

EXIT_OK, EXIT_PROBLEMS, EXIT_UNREACHABLE = 0, 1, 2
PARTS = ("bridge", "runner", "recorder", "scheduler", "api")
STATE_TOPICS = ("bridge_state", "bridge_stats", "runner_state", "recorder_state", "scheduler_state", "api_state")
RECENT = timedelta(days=1)


def gather(
    mqtt_url: str,
    topics: Topics,
    database: Database,
    now: float,
    expected: tuple[str, ...] = PARTS,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """What the bus and the database say now, as one JSON-able report; `problems` says what is wrong."""
    report: dict[str, Any] = {"broker": {"url": without_password(mqtt_url)}, "problems": []}
    retained = _retained(mqtt_url, topics, timeout, report)
    if retained is not None:
        report.update(_parts(topics, retained))
        report["problems"] += [
            f"no {part} online"
            for part in expected
            if not any(entry["state"] == "online" for entry in report["parts"][part])
        ]
    report["database"] = _database(database, now, report["problems"])
    return report


def exit_code(report: dict[str, Any]) -> int:
    """EXIT_UNREACHABLE when the broker or the database cannot be read, EXIT_PROBLEMS for any other problem."""
    if "error" in report["broker"] or "error" in report["database"]:
        return EXIT_UNREACHABLE
    return EXIT_PROBLEMS if report["problems"] else EXIT_OK


def render(report: dict[str, Any]) -> str:
    """The report as lines for people."""
    broker, database = report["broker"], report["database"]
    lines = [f"broker     {broker['url']}: {broker.get('error', 'reachable')}"]
    if "error" in database:
        lines.append(f"database   {database['url']}: {database['error']}")
    else:
        lines.append(f"database   {database['url']}: schema {database['schema']}")
    for part in PARTS:
        for entry in report.get("parts", {}).get(part, []) or [{"name": "", "state": "not seen"}]:
            detail = entry.get("detail", "")
            lines.append(f"{part:<10} {entry['name']:<16} {entry['state']:<8} {detail}".rstrip())
    if "nodes" in report:
        lines.append(f"nodes      {report['nodes']['online']} online, {report['nodes']['offline']} offline")
    if "runs" in database:
        runs = database["runs"]
        ended = ", ".join(f"{count} {state}" for state, count in sorted(runs["ended_last_day"].items())) or "none"
        lines.append(f"runs       {runs['running']} running, {runs['queued']} queued; ended in the last day: {ended}")
        letters = database["dead_letters_last_day"]
        lines.append(
            f"errors     {letters['count']} dead letter(s) in the last day"
            + (f"; the last: {letters['last']}" if letters["last"] else "")
        )
    lines.append("problems   " + ("; ".join(report["problems"]) or "none"))
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON for programs."""
    return json.dumps(report, indent=2, sort_keys=True)


def _retained(mqtt_url: str, topics: Topics, timeout: float, report: dict[str, Any]) -> dict[str, bytes] | None:
    """topic -> payload of every part's retained state and node presence; None when the broker is away."""
    retained: dict[str, bytes] = {}
    lock = threading.Lock()

    def keep(message: Message) -> None:
        with lock:
            if message.payload:
                retained[message.topic] = message.payload
            else:
                retained.pop(message.topic, None)

    bus = Bus(mqtt_url, topics, client_id=f"hacer-status-{uuid.uuid4().hex[:8]}")
    for name in (*STATE_TOPICS, "node_presence"):
        bus.subscribe(topics.filter(name), keep)
    try:
        bus.start()
        bus.wait_connected(timeout)
        bus.sync(timeout)
    except BusError as exc:
        report["broker"]["error"] = f"unreachable ({exc})"
        report["problems"].append("the broker cannot be reached")
        return None
    finally:
        bus.stop()
    return retained


def _parts(topics: Topics, retained: dict[str, bytes]) -> dict[str, Any]:
    parts: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
    nodes = {"online": 0, "offline": 0}
    for topic, payload in sorted(retained.items()):
        try:
            name, arg = topics.parse(topic)
            if name == "node_presence":
                nodes[Presence.from_payload(payload).state] += 1
            elif name == "runner_state":
                runner = RunnerState.from_payload(payload)
                detail = f"{len(runner.running)}/{runner.capacity} running, {runner.queued} queued"
                parts["runner"].append(
                    {
                        "name": arg,
                        "state": runner.state,
                        "detail": detail,
                        "running": len(runner.running),
                        "capacity": runner.capacity,
                        "queued": runner.queued,
                    }
                )
            elif name == "recorder_state":
                recorder = RecorderState.from_payload(payload)
                detail = f"{recorder.written} written, {recorder.set_aside} set aside"
                parts["recorder"].append(
                    {
                        "name": arg,
                        "state": recorder.state,
                        "detail": detail,
                        "written": recorder.written,
                        "set_aside": recorder.set_aside,
                    }
                )
            elif name in ("bridge_state", "api_state", "scheduler_state"):
                part = name.removesuffix("_state")
                parts[part].append({"name": arg or "", "state": payload.decode(errors="replace")[:16]})
        except (MessageError, TopicError, KeyError):
            continue  # not the shape it should be: the part is not shown as online
    stats_payload = retained.get(topics.build("bridge_stats"))
    if stats_payload and parts["bridge"]:
        try:
            stats = BridgeStats.from_payload(stats_payload)
        except MessageError:
            pass
        else:
            dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.dropped.items()) if count)
            commands = ", ".join(f"{result} {count}" for result, count in sorted(stats.commands.items()))
            parts["bridge"][0]["detail"] = (
                f"{stats.datagrams} datagrams, dropped: {dropped or 'none'}; commands: {commands or 'none'}"
            )
            parts["bridge"][0]["stats"] = msgspec.to_builtins(stats)
    return {"parts": parts, "nodes": nodes}


def _database(database: Database, now: float, problems: list[str]) -> dict[str, Any]:
    url = database.url.split("@")[-1]
    since = utc_datetime(now) - RECENT
    try:
        with database.engine.connect() as connection:
            schema = schema_revision(connection)
            if schema is None:
                problems.append("the database has no schema: run `manage.py initdb`")
                return {"url": url, "schema": None}
            counts = dict(
                connection.execute(
                    select(Run.state, func.count())
                    .where(Run.state.in_((runstates.QUEUED, runstates.RUNNING)))
                    .group_by(Run.state)
                )
                .tuples()
                .all()
            )
            ended = dict(
                connection.execute(select(Run.state, func.count()).where(Run.finished_at >= since).group_by(Run.state))
                .tuples()
                .all()
            )
            letters = connection.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.at >= since))
            last = connection.execute(
                select(DeadLetter.at, DeadLetter.topic, DeadLetter.error).order_by(DeadLetter.id.desc()).limit(1)
            ).first()
    except Exception as exc:  # noqa: BLE001 - whatever keeps it from being read is what to report
        problems.append("the database cannot be read")
        return {"url": url, "error": f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})"}
    finally:
        database.engine.dispose()
    if schema != migrations.HEAD:
        problems.append(f"the database's schema is {schema}, not {migrations.HEAD}: run `manage.py initdb`")
    return {
        "url": url,
        "schema": schema,
        "runs": {
            "running": counts.get(runstates.RUNNING, 0),
            "queued": counts.get(runstates.QUEUED, 0),
            "ended_last_day": ended,
        },
        "dead_letters_last_day": {
            "count": letters,
            "last": f"{last.at:%Y-%m-%d %H:%M:%S} {last.topic}: {last.error}" if last is not None else "",
        },
    }
