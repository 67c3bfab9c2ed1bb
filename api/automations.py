"""REST under /api/automations: define, list, change, switch and delete automations.

The scheduler reads the same table (it polls for changes every second), so what is saved here
is planned within a second; each definition is checked by the one declaration in
hacer/automations.py, and a script must exist in the scripts folder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
from astral import Observer
from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import ApiError, bad_request, not_found
from api.rest import ROW_ID, api, services
from hacer import runstates
from hacer.automations import (
    AutomationSpec,
    NameTaken,
    describe,
    describe_all,
    location_of,
    missing_references,
    save,
    start_time,
    upcoming,
)
from hacer.messages import MessageError, decode
from hacer.models import Automation, AutomationFire, AutomationHeld, AutomationStep, Run, aware_utc

automations = Blueprint("automations", __name__, url_prefix="/automations")


def traces(session: Session, automation_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """An automation's last fires and holds as people read them, newest first: what triggered each, its
    conditions with the values they saw, its steps (the run it made, with its state and times, or each
    of its `steps`) or why it did not run, the definition then."""
    rows = session.execute(
        select(AutomationFire, Run)
        .outerjoin(Run, Run.run_id == AutomationFire.run_id)
        .where(AutomationFire.automation_id == automation_id)
        .order_by(AutomationFire.due_at.desc())
        .limit(limit)
    ).all()
    held = session.scalars(
        select(AutomationHeld)
        .where(AutomationHeld.automation_id == automation_id)
        .order_by(AutomationHeld.due_at.desc())
        .limit(limit)
    ).all()
    steps = steps_of(session, [fire.run_id for fire, _ in rows])
    not_run = [
        {
            "due": moment(row.due_at),
            "fired_at": None,
            "late": False,
            "scheduler": row.scheduler,
            "outcome": "held back",
            "why": row.why,
            "trigger": json.loads(row.cause),
            "conditions": json.loads(row.conditions),
            "steps": [],
            "definition": json.loads(row.definition),
        }
        for row in held
    ]
    fired = [
        {
            "due": moment(fire.due_at),
            "fired_at": moment(fire.fired_at),
            "late": fire.late,
            "scheduler": fire.scheduler,
            "outcome": "fired",
            "why": None,
            "trigger": None if fire.cause is None else json.loads(fire.cause),  # None: fired before traces
            "conditions": json.loads(fire.conditions or "[]"),
            "steps": steps.get(fire.run_id) or [run_trace(fire.run_id, run, "pending" if fire.pending else None)],
            "definition": None if fire.definition is None else json.loads(fire.definition),
        }
        for fire, run in rows
    ]
    return sorted(fired + not_run, key=lambda trace: datetime.fromisoformat(trace["due"]), reverse=True)[:limit]


def moment(value: datetime | None) -> str | None:
    """A database time as the api writes times (ISO 8601, UTC)."""
    return None if value is None else aware_utc(value).isoformat()


def run_trace(run_id: str, run: Run | None, state: str | None = None) -> dict[str, Any]:
    """A run a fire or step made, as a trace shows it: its state and times."""
    return {
        "kind": "run",
        "run_id": run_id,
        "state": state or (runstates.QUEUED if run is None else run.state),
        "exit_code": None if run is None else run.exit_code,
        "error": None if run is None else run.error,
        "started_at": None if run is None else moment(run.started_at),
        "finished_at": None if run is None else moment(run.finished_at),
    }


def steps_of(session: Session, fires: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The steps of fires that have steps, in order: each its state, times and what came of it."""
    rows = session.scalars(
        select(AutomationStep).where(AutomationStep.run_id.in_(fires)).order_by(AutomationStep.position)
    ).all()
    outcomes = {(row.run_id, row.position): json.loads(row.outcome or "{}") for row in rows}
    run_ids = [outcome["run_id"] for outcome in outcomes.values() if "run_id" in outcome]
    runs = {run.run_id: run for run in session.scalars(select(Run).where(Run.run_id.in_(run_ids)))}
    traced: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        outcome = outcomes[row.run_id, row.position]
        run = run_trace(outcome["run_id"], runs.get(outcome["run_id"])) if "run_id" in outcome else {}
        traced.setdefault(row.run_id, []).append(
            {
                "state": row.state,  # a run step's: its run's
                **run,
                **outcome,
                "kind": row.kind,
                "position": row.position,
                "step_state": row.state,
                "began_at": moment(row.started_at),
                "due_at": moment(row.due_at),
                "ended_at": moment(row.ended_at),
            }
        )
    return traced


def location() -> Observer | None:
    settings = services().settings
    return location_of(settings.latitude, settings.longitude)


def spec_of_body(body: bytes) -> AutomationSpec:
    """The definition in a request body, checked; 400 naming the field at fault."""
    try:
        spec = AutomationSpec.from_json(body, location())
    except MessageError as exc:
        raise bad_request(str(exc)) from None
    with services().sessions() as session:
        refusal = missing_references(session, spec, services().scripts)
    if refusal:
        raise bad_request(refusal)
    return spec


def now() -> datetime:
    return datetime.now(UTC)


def find_row(session: Session, automation_id: int) -> Automation:
    row = session.get(Automation, automation_id)
    if row is None:
        raise not_found(f"no automation with id {automation_id}")
    return row


@automations.get("")
def list_automations() -> ResponseReturnValue:
    with services().sessions() as session:
        return jsonify({"automations": describe_all(session, location(), now())})


@automations.post("")
def add_automation() -> ResponseReturnValue:
    spec = spec_of_body(request.get_data(cache=True))
    limit = services().settings.max_automations
    with services().sessions() as session:
        if (session.scalar(select(func.count()).select_from(Automation)) or 0) >= limit:
            raise ApiError(409, f"there are {limit} automations already, the most HACER_MAX_AUTOMATIONS allows")
        try:
            row = save(session, spec, now())
        except NameTaken as exc:
            raise ApiError(409, str(exc)) from None
        session.commit()
        return jsonify(describe(session, row, location(), now())), 201


@automations.post("/preview")
def preview_automation() -> ResponseReturnValue:
    """A definition checked as saving it would (400 naming the field), with its next five due times: not saved."""
    spec = spec_of_body(request.get_data(cache=True))
    moment = now()
    next_fires = upcoming(spec, moment, moment, location(), 5)
    return jsonify({"definition": msgspec.to_builtins(spec), "next_fires": [due.isoformat() for due in next_fires]})


MAX_LISTED_FIRES = 100


def listed_count(name: str, default: str) -> int:
    """A count of things to list from the query (?count=5), 1 to MAX_LISTED_FIRES; 400 otherwise."""
    count = request.args.get(name, default)
    if not (count.isascii() and count.isdigit() and 1 <= int(count) <= MAX_LISTED_FIRES):
        raise bad_request(f"{name} must be a whole number from 1 to {MAX_LISTED_FIRES}")
    return int(count)


@automations.get(f"/<{ROW_ID}:automation_id>")
def get_automation(automation_id: int) -> ResponseReturnValue:
    """An automation; `?from=2027-03-27T00:00&count=10` lists its due times from then (the trigger's zone)."""
    count = listed_count("count", "5")
    with services().sessions() as session:
        row = find_row(session, automation_id)
        start = None
        if "from" in request.args:
            try:
                start = start_time(request.args["from"], decode(AutomationSpec, row.definition, "automation"))
            except MessageError as exc:
                raise bad_request(str(exc)) from None
        return jsonify(describe(session, row, location(), now(), count, start))


@automations.get(f"/<{ROW_ID}:automation_id>/traces")
def automation_traces(automation_id: int) -> ResponseReturnValue:
    """Its last fires as people read them (`?limit=20`): trigger, conditions seen, run, definition then."""
    limit = listed_count("limit", "20")
    with services().sessions() as session:
        return jsonify({"traces": traces(session, find_row(session, automation_id).id, limit)})


@automations.put(f"/<{ROW_ID}:automation_id>")
def change_automation(automation_id: int) -> ResponseReturnValue:
    spec = spec_of_body(request.get_data(cache=True))
    with services().sessions() as session:
        row = find_row(session, automation_id)
        try:
            save(session, spec, now(), row)
        except NameTaken as exc:
            raise ApiError(409, str(exc)) from None
        session.commit()
        return jsonify(describe(session, row, location(), now()))


@automations.post(f"/<{ROW_ID}:automation_id>/enable", defaults={"enabled": True})
@automations.post(f"/<{ROW_ID}:automation_id>/disable", defaults={"enabled": False})
def switch_automation(automation_id: int, enabled: bool) -> ResponseReturnValue:
    with services().sessions() as session:
        row = find_row(session, automation_id)
        spec = msgspec.structs.replace(AutomationSpec.from_json(row.definition, location()), enabled=enabled)
        save(session, spec, now(), row)
        session.commit()
        return jsonify(describe(session, row, location(), now()))


@automations.delete(f"/<{ROW_ID}:automation_id>")
def delete_automation(automation_id: int) -> ResponseReturnValue:
    with services().sessions() as session:
        session.delete(find_row(session, automation_id))
        session.commit()
    return jsonify({"success": True})


api.register_blueprint(automations)  # under /api, behind its token and request checks
