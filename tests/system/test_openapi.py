"""/api/openapi.json documents every route, and real responses validate against it."""

from __future__ import annotations

import re
import uuid

import jsonschema
import pytest
from test_api import System, module_postgres_url, node_of, system, wait_run  # noqa: F401

from api.app import create_app
from api.openapi import document
from hacer.settings import Settings


def routes() -> set[tuple[str, str]]:
    app = create_app({"HACER_SETTINGS": Settings.from_env({}), "ASYNC_MODE": "threading"})
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            found |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return found


def documented() -> set[tuple[str, str]]:
    return {(path, method) for path, item in document()["paths"].items() for method in item if method != "parameters"}


def test_every_route_is_documented_and_nothing_else():
    assert routes() == documented()


def validate(response, path: str, method: str) -> None:
    spec = document()["paths"][path][method]["responses"][str(response.status_code)]
    schema = spec["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": document()["components"]}).validate(response.json())


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_real_responses_validate(system):  # noqa: F811
    toggle = node_of(system, "toggle")
    started = system.post("/api/scripts/exec/name/test", json={"params": ["x"]})
    wait_run(system, started.json()["log_thread_id"])
    calls = [
        ("get", "/api/nodes", "/api/nodes", {}),
        ("get", "/api/nodes/id/{node_id}", f"/api/nodes/id/{toggle.id}", {}),
        ("get", "/api/nodes/id/{node_id}", "/api/nodes/id/1", {}),
        (
            "post",
            "/api/nodes/id/{node_id}",
            f"/api/nodes/id/{toggle.id}",
            {"json": {"name": f"n{uuid.uuid4().hex[:4]}"}},
        ),
        ("post", "/api/nodes/id/{node_id}", f"/api/nodes/id/{toggle.id}", {"data": "nope"}),
        ("get", "/api/nodes/name/{name}", "/api/nodes/name/none", {}),
        ("post", "/api/nodes/id/{node_id}/set", f"/api/nodes/id/{toggle.id}/set", {"json": {"on": 1}}),
        ("get", "/api/nodes/id/{node_id}/get/{key}", f"/api/nodes/id/{toggle.id}/get/on", {}),
        ("get", "/api/nodes/id/{node_id}/get/{key}", f"/api/nodes/id/{toggle.id}/get/nokey", {}),
        ("get", "/api/nodes/id/{node_id}/history", f"/api/nodes/id/{toggle.id}/history", {}),
        (
            "get",
            "/api/nodes/id/{node_id}/history",
            f"/api/nodes/id/{node_of(system, 'thermostat').id}/history?key=temperature&step=60",
            {},
        ),
        (
            "get",
            "/api/nodes/id/{node_id}/history",
            f"/api/nodes/id/{node_of(system, 'thermostat').id}/history?key=temperature",
            {},
        ),
        ("get", "/api/nodes/id/{node_id}/history", f"/api/nodes/id/{toggle.id}/history?step=x", {}),
        ("get", "/api/node_types", "/api/node_types", {}),
        ("get", "/api/scripts/list", "/api/scripts/list", {}),
        ("post", "/api/scripts/exec/name/{name}", "/api/scripts/exec/name/missing", {"json": {}}),
        ("get", "/api/runs", "/api/runs", {}),
        ("get", "/api/runs/{key}", f"/api/runs/{started.json()['run_id']}", {}),
        ("post", "/api/runs/{key}/cancel", f"/api/runs/{started.json()['run_id']}/cancel", {}),
        ("get", "/api/logs/script", "/api/logs/script", {}),
        (
            "get",
            "/api/logs/script/thread_id/{thread_id}",
            f"/api/logs/script/thread_id/{started.json()['log_thread_id']}",
            {},
        ),
        ("get", "/api/health", "/api/health", {}),
        ("get", "/api/openapi.json", "/api/openapi.json", {}),
    ]
    validate(started, "/api/scripts/exec/name/{name}", "post")
    for method, path, url, kwargs in calls:
        response = getattr(__import__("requests"), method)(system.url + url, timeout=10, **kwargs)
        validate(response, path, method)
