"""The REST API under /api: the 2015 endpoints field for field, and what came after them."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import String, cast, func, select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter

from api.errors import ApiError, bad_request, not_found
from api.openapi import document
from api.services import Services
from hacer import runstates
from hacer.history import MAX_BUCKETS, history, millis
from hacer.messages import (
    EARLIEST_TIME,
    FIRE_RUN_PREFIX,
    LATEST_TIME,
    LOG_ENTRY_TYPES,
    MAX_KEY_CHARS,
    GetCommand,
    MessageError,
    RunRequest,
    SetCommand,
)
from hacer.models import MAX_ROW_ID, Node, NodeType, Run, ScriptLogEntry, ScriptLogEntryType
from hacer.nodecommands import CommandTimeout
from hacer.nodewire import MAX_NODE_ID
from hacer.scriptdir import Script

api = Blueprint("api", __name__, url_prefix="/api")

MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000
# A log read without paging (the 2015 app's call) stops at whichever bound comes first.
UNPAGED_ENTRIES = 10_000
UNPAGED_BYTES = 4 * 1024 * 1024
NODE_ID, ROW_ID = "node_id", "row_id"


class _IdConverter(BaseConverter):
    """An id in a path, answered 404 when out of range (Werkzeug's own bound answers POSTs 405)."""

    regex = r"\d+"
    maximum = MAX_ROW_ID

    def to_python(self, value: str) -> int:
        if len(value) > 19 or int(value) > self.maximum:
            raise NotFound(f"no such id: {value[:40]} is more than {self.maximum}")
        return int(value)

    def to_url(self, value: Any) -> str:
        return str(int(value))


class _NodeIdConverter(_IdConverter):
    maximum = MAX_NODE_ID  # JSON's exact integers, as beacons carry them


@api.record_once
def _register_converters(state: Any) -> None:
    state.app.url_map.converters.update({NODE_ID: _NodeIdConverter, ROW_ID: _IdConverter})


def services() -> Services:
    return current_app.extensions["hacer"]


@api.before_request
def check_token() -> None:
    token = services().settings.api_token
    if not token:
        return
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "this server needs `Authorization: Bearer <HACER_API_TOKEN>`")


def json_body() -> dict[str, Any]:
    """The request's JSON object, whatever its content type says (2015 clients send none)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def page_args() -> tuple[int, int]:
    """`page` (from 1) and `per_page` (at most MAX_PER_PAGE) of the query string."""
    try:
        page = int(request.args.get("page", "1"))
        per_page = int(request.args.get("per_page", "100"))
    except ValueError:
        raise bad_request("page and per_page must be integers") from None
    if not 1 <= page <= MAX_PAGE or not 1 <= per_page <= MAX_PER_PAGE:
        raise bad_request(f"page must be in 1..{MAX_PAGE} and per_page in 1..{MAX_PER_PAGE}")
    return page, per_page


def time_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise bad_request(f"{name}={raw[:40]!r} is not an ISO 8601 time between years 1 and 9999") from None
    return moment


def stamp(moment: datetime | None, fraction: bool = False) -> str:
    """The 2015 time format, `YYYY-MM-DDTHH:MM:SS` (UTC); "" when unknown."""
    if moment is None:
        return ""
    return moment.isoformat(timespec="milliseconds" if fraction else "seconds")


# --- nodes ------------------------------------------------------------------------------------


def node_json(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name or "",
        "type": node.type.name,
        "ip": node.ip or "",
        "last_updated": max(stamp(node.last_update), services().live.seen_stamps.get(node.id, "")),
    }


@api.get("/nodes")
def list_nodes() -> ResponseReturnValue:
    # Core rows (the ORM's loading of even plain columns tripled the cost: it is paid on the
    # server's loop, by every poll of the 2015 app) and the time as the database's text
    # ("YYYY-MM-DD HH:MM:SS...") rather than datetimes: 1 000 nodes in about a millisecond.
    query = (
        select(Node.id, Node.name, NodeType.name, Node.ip, cast(Node.last_update, String))
        .join(NodeType)
        .order_by(Node.id)
    )
    with services().sessions() as session:
        rows = session.connection().execute(query).all()
    # The recorder writes last-seen times once a minute; the bus's are fresher (every few seconds).
    seen = services().live.seen_stamps
    return fast_json(
        {
            "node_list": [
                {
                    "id": node_id,
                    "name": name or "",
                    "type": type_name,
                    "ip": ip or "",
                    "last_updated": max((updated or "")[:19].replace(" ", "T"), seen.get(node_id, "")),
                }
                for node_id, name, type_name, ip, updated in rows
            ]
        }
    )


def fast_json(body: Any) -> ResponseReturnValue:
    """A JSON response without Flask's key sorting and indentation checks (big lists)."""
    return current_app.response_class(msgspec.json.encode(body), mimetype="application/json")


def find_node(session: Any, node_id: int) -> Node:
    node = session.get(Node, node_id)
    if node is None:
        raise not_found(f"no node with id {node_id}")
    return node


@api.get(f"/nodes/id/<{NODE_ID}:node_id>")
def get_node(node_id: int) -> ResponseReturnValue:
    with services().sessions() as session:
        return jsonify(node_json(find_node(session, node_id)))


@api.get("/nodes/name/<path:name>")
def get_node_by_name(name: str) -> ResponseReturnValue:
    with services().sessions() as session:
        node = session.scalar(select(Node).where(Node.name == name))
        if node is None:
            raise not_found(f"no node named {name!r}")
        return jsonify(node_json(node))


@api.post(f"/nodes/id/<{NODE_ID}:node_id>")
def rename_node(node_id: int) -> ResponseReturnValue:
    body = json_body()
    name = body.get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 64:
        raise bad_request("name must be a string of 1 to 64 characters")
    name = name.strip()
    if name.isdigit() and name != str(node_id):  # scripts take a node by name or id: one must not be the other
        raise bad_request(f"a name made only of digits reads as a node id: {name!r} can only name node {name}")
    svc = services()
    with svc.sessions() as session:
        node = find_node(session, node_id)
        holder = session.scalar(select(Node).where(Node.name == name, Node.id != node_id))
        if holder is not None and holder.named_by_user:
            raise ApiError(409, f"the name {name!r} is taken by node {holder.id}")
        if holder is not None:  # a beacon's claim: the user's name wins
            holder.name = None
            session.flush()
        node.name, node.named_by_user = name, True
        try:
            session.commit()
        except IntegrityError:
            raise ApiError(409, f"the name {name!r} is taken") from None
        if holder is not None:
            svc.publish_meta(holder)
        svc.publish_meta(node)
        return jsonify({"success": True, "node": node_json(node)})


@api.delete(f"/nodes/id/<{NODE_ID}:node_id>")
def delete_node(node_id: int) -> ResponseReturnValue:
    svc = services()
    with svc.sessions() as session:
        session.delete(find_node(session, node_id))
        session.commit()
    for name in ("node_presence", "node_meta", "node_state", "node_readings"):  # empty retained: cleared
        svc.bus.publish(svc.topics.build(name, node_id), b"", retain=True)
    return jsonify({"success": True})


@api.get(f"/nodes/id/<{NODE_ID}:node_id>/history")
def node_history(node_id: int) -> ResponseReturnValue:
    now = time.time()
    until = history_time("until", now)
    since = history_time("since", until - 86400)
    if not since < until:
        raise bad_request("since must be before until")
    key = request.args.get("key") or None
    if key is not None and (len(key) > MAX_KEY_CHARS or "\0" in key):
        raise bad_request(f"key must be at most {MAX_KEY_CHARS} characters, without NUL")
    step: int | None = None
    if request.args.get("step"):
        try:
            step = int(request.args["step"])
        except ValueError:
            raise bad_request("step must be an integer number of seconds (0: every sample)") from None
        if not 0 <= step <= 366 * 86400:
            raise bad_request("step must be 0 (every sample) up to a year of seconds")
        if step and (until - since) / step > MAX_BUCKETS:
            raise bad_request(f"more than {MAX_BUCKETS} buckets: give a larger step")
    svc = services()
    with svc.sessions() as session:
        find_node(session, node_id)
        return fast_json(history(session.connection(), node_id, key, millis(since), millis(until), step))


def history_time(name: str, default: float) -> float:
    """A query time as a Unix time: ISO 8601 (UTC when it has no offset) or Unix seconds."""
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        moment = time_arg(name)
        assert moment is not None
        seconds = moment.replace(tzinfo=UTC).timestamp()
    if not EARLIEST_TIME.timestamp() <= seconds < LATEST_TIME.timestamp():  # nan and infinities too
        raise bad_request(f"{name}={raw[:40]!r} is not a time between {EARLIEST_TIME.year} and {LATEST_TIME.year}")
    return seconds


@api.get("/node_types")
def node_types() -> ResponseReturnValue:
    with services().sessions() as session:
        return jsonify({"node_types": [t.name for t in session.scalars(select(NodeType).order_by(NodeType.id))]})


def command_reply(node_id: int, command: SetCommand | GetCommand) -> ResponseReturnValue:
    svc = services()
    with svc.sessions() as session:
        find_node(session, node_id)
    try:
        results = svc.commands.command(node_id, command, svc.settings.node_timeout + 2)
    except CommandTimeout as exc:
        raise ApiError(504, str(exc)) from None
    body = [json.loads(r.to_payload()) for r in results]
    if any(r.reason == "timeout" for r in results):
        return jsonify({"error": "node timeout", "message": "the node did not answer", "results": body}), 504
    if not all(r.ok for r in results):
        return jsonify(
            {"error": "node error", "message": "; ".join(r.error or "" for r in results if not r.ok), "results": body}
        ), 502
    return jsonify({"results": body})


@api.post(f"/nodes/id/<{NODE_ID}:node_id>/set")
def set_values(node_id: int) -> ResponseReturnValue:
    try:
        command = SetCommand.from_body(json_body())
    except MessageError as exc:
        raise bad_request(str(exc)) from None
    return command_reply(node_id, command)


@api.get(f"/nodes/id/<{NODE_ID}:node_id>/get/<key>")
def get_value(node_id: int, key: str) -> ResponseReturnValue:
    try:
        command = GetCommand.of_key(key)
    except MessageError as exc:
        raise bad_request(str(exc)) from None
    return command_reply(node_id, command)


# --- scripts and runs -------------------------------------------------------------------------


@api.get("/scripts/list")
def list_scripts() -> ResponseReturnValue:
    return jsonify({"script_list": [{"id": s.id, "name": s.name} for s in services().scripts.list()]})


@api.post(f"/scripts/exec/id/<{ROW_ID}:script_id>")
def exec_script_by_id(script_id: int) -> ResponseReturnValue:
    script = services().scripts.find_id(script_id)
    if script is None:
        raise not_found(f"no script with id {script_id}")
    return exec_script(script)


@api.post("/scripts/exec/name/<name>")
def exec_script_by_name(name: str) -> ResponseReturnValue:
    script = services().scripts.find(name)
    if script is None:
        raise not_found(f"no script named {name!r}")
    return exec_script(script)


def exec_script(script: Script) -> ResponseReturnValue:
    """Record and request a run; once per run id, so a client whose answer was lost may ask again.

    The run id is the body's `run_id`, or one derived from an `Idempotency-Key` header, or a new one.
    """
    body = json_body()
    params = body.get("params", [])
    timeout = body.get("timeout")
    run_id = body.get("run_id") or idempotent_run_id(request.headers.get("Idempotency-Key")) or uuid.uuid4().hex
    if isinstance(run_id, str) and run_id.startswith(FIRE_RUN_PREFIX):
        raise bad_request(f"run ids starting with {FIRE_RUN_PREFIX!r} are the scheduler's")
    try:
        request_payload = RunRequest.from_body(
            {
                "script": script.name,
                "params": params,
                "run_id": run_id,
                "requested_by": "rest",
                **({"timeout": timeout} if timeout is not None else {}),
            }
        ).to_payload()
    except MessageError as exc:
        raise bad_request(str(exc)) from None
    svc = services()
    thread_id, recorded = svc.record_request(run_id, script.name, params, request_payload)
    if recorded is None:
        svc.bus.publish(svc.topics.build("run_request"), request_payload)
    elif recorded != request_payload.decode():
        raise ApiError(409, f"run {run_id} was requested already, with another script or parameters")
    # else asked again: the run it made, once (the recorders send its request again if no runner took it)
    return jsonify({"status": "ok", "log_thread_id": thread_id, "run_id": run_id})


def idempotent_run_id(key: str | None) -> str | None:
    """The run id of a request's Idempotency-Key: the same key, the same run."""
    if not key:
        return None
    if len(key) > 255:
        raise bad_request("Idempotency-Key is at most 255 characters")
    return "rest-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def run_json(run: Run) -> dict[str, Any]:
    return {
        "thread_id": run.id,
        "run_id": run.run_id,
        "script": run.script,
        "params": json.loads(run.params),
        "state": run.state,
        "runner": run.runner,
        "exit_code": run.exit_code,
        "error": run.error,
        "requested_by": run.requested_by,
        "requested_at": stamp(run.requested_at, True),
        "queued_at": stamp(run.queued_at, True),
        "started_at": stamp(run.started_at, True),
        "finished_at": stamp(run.finished_at, True),
    }


@api.get("/runs")
def list_runs() -> ResponseReturnValue:
    page, per_page = page_args()
    query = select(Run)
    if "state" in request.args:
        if request.args["state"] not in runstates.ALL_STATES:
            raise bad_request(f"state must be one of {', '.join(runstates.ALL_STATES)}")
        query = query.where(Run.state == request.args["state"])
    if "script" in request.args:
        query = query.where(Run.script == request.args["script"])
    with services().sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        runs = session.scalars(query.order_by(Run.id.desc()).offset((page - 1) * per_page).limit(per_page)).all()
        return jsonify({"runs": [run_json(r) for r in runs], "page": page, "per_page": per_page, "total": total})


def find_run(session: Any, key: str) -> Run:
    run = session.scalar(select(Run).where(Run.run_id == key))
    if run is None and key.isascii() and key.isdigit() and int(key) <= MAX_ROW_ID:
        run = session.get(Run, int(key))
    if run is None:
        raise not_found(f"no run {key!r}")
    return run


@api.get("/runs/<key>")
def get_run(key: str) -> ResponseReturnValue:
    with services().sessions() as session:
        return jsonify(run_json(find_run(session, key)))


@api.post("/runs/<key>/cancel")
def cancel_run(key: str) -> ResponseReturnValue:
    svc = services()
    with svc.sessions() as session:
        run = find_run(session, key)
        if run.state in runstates.FINISHED_STATES:
            raise ApiError(409, f"run {run.run_id} has already ended ({run.state})")
        svc.bus.publish(svc.topics.build("run_cancel", run.run_id), b"")
        return jsonify({"success": True, "run_id": run.run_id})


# --- logs -------------------------------------------------------------------------------------


def entry_json(entry: ScriptLogEntry) -> dict[str, Any]:
    try:
        params = [str(p) for p in json.loads(entry.params or "[]")]
    except ValueError:
        params = []
    return {
        "id": entry.id,
        "timestamp": stamp(entry.timestamp, True),
        "thread_id": entry.thread_id,
        "script_name": entry.script_name or "",
        "params": params,
        "entry_type": entry.entry_type.name,
        "data": entry.data or "",
    }


def entries(thread_id: int | None = None) -> ResponseReturnValue:
    query = select(ScriptLogEntry)
    if thread_id is not None:
        query = query.where(ScriptLogEntry.thread_id == thread_id)
    if "script" in request.args:
        query = query.where(ScriptLogEntry.script_name == request.args["script"])
    if "entry_type" in request.args:
        if request.args["entry_type"] not in LOG_ENTRY_TYPES:
            raise bad_request(f"entry_type must be one of {', '.join(LOG_ENTRY_TYPES)}")
        query = query.join(ScriptLogEntryType).where(ScriptLogEntryType.name == request.args["entry_type"])
    since, until = time_arg("since"), time_arg("until")
    if since:
        query = query.where(ScriptLogEntry.timestamp >= since)
    if until:
        query = query.where(ScriptLogEntry.timestamp < until)
    with services().sessions() as session:
        if "page" in request.args or "per_page" in request.args:
            page, per_page = page_args()
            query = query.order_by(ScriptLogEntry.thread_id, ScriptLogEntry.seq, ScriptLogEntry.id)
            found = list(session.scalars(query.offset((page - 1) * per_page).limit(per_page)))
        else:  # the 2015 app: a run's first entries, or the latest of all (oldest first), within bounds
            order = (ScriptLogEntry.seq, ScriptLogEntry.id) if thread_id else (ScriptLogEntry.id.desc(),)
            found, size = [], 0
            rows = session.scalars(query.order_by(*order).limit(UNPAGED_ENTRIES + 1).execution_options(yield_per=500))
            for entry in rows:
                size += len(entry.data or "")
                if len(found) == UNPAGED_ENTRIES or size > UNPAGED_BYTES:
                    return jsonify(
                        {"entry_list": [entry_json(e) for e in in_order(found, thread_id)], "truncated": True}
                    )
                found.append(entry)
            found = in_order(found, thread_id)
        return jsonify({"entry_list": [entry_json(e) for e in found]})


def in_order(found: list[ScriptLogEntry], thread_id: int | None) -> list[ScriptLogEntry]:
    """Entries read newest first (all runs' latest) put oldest first, as a run's are."""
    return found if thread_id else found[::-1]


@api.get("/logs/script")
def all_entries() -> ResponseReturnValue:
    return entries()


@api.get(f"/logs/script/thread_id/<{ROW_ID}:thread_id>")
def thread_entries(thread_id: int) -> ResponseReturnValue:
    return entries(thread_id)


@api.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(document())


# --- health -----------------------------------------------------------------------------------


@api.get("/health")
def health() -> ResponseReturnValue:
    svc = services()
    try:
        with svc.sessions() as session:
            session.scalar(select(func.count()).select_from(NodeType))
        database = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised: that is what a health check is for
        database = f"error: {type(exc).__name__}"
    runners = [r for r in svc.live.runners.values() if r["state"] == "online"]
    healthy = svc.bus.connected and database == "ok" and svc.live.bridge_state == "online" and runners
    return jsonify(
        {
            "status": "ok" if healthy else "degraded",
            "broker": "connected" if svc.bus.connected else "disconnected",
            "bridge": svc.live.bridge_state,
            "runners": runners,
            "database": database,
            "versions": svc.versions(),
        }
    ), 200 if healthy else 503
