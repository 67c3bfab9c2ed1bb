"""The OpenAPI 3.1 document of the REST API, served at /api/openapi.json.

tests/system/test_openapi.py checks that every route is documented and that real responses validate
against the schemas here.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec

from hacer.automations import AutomationSpec, HeldWhy, StepKind, StepState
from hacer.models import MAX_ROW_ID
from hacer.nodewire import MAX_NODE_ID
from hacer.schemas import json_schemas


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def body(name_or_schema: str | dict[str, Any], description: str = "OK") -> dict[str, Any]:
    schema = ref(name_or_schema) if isinstance(name_or_schema, str) else name_or_schema
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = body("Error", "error")
NODE_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_NODE_ID}
ROW_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID}
INT_ID = {"name": "node_id", "in": "path", "required": True, "schema": NODE_ID_SCHEMA}
RUN_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "run id or thread id",
    "schema": {"type": "string"},
}
AUTOMATION_ID = {"name": "automation_id", "in": "path", "required": True, "schema": ROW_ID_SCHEMA}
AUTOMATION_BODY = {
    "required": True,
    "content": {"application/json": {"schema": ref("AutomationSpec")}},
    "description": "the definition, JSON with or without a JSON content type",
}
PAGING = [
    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
    {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
]
JSON_OBJECT_BODY = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object"}}},
    "description": "JSON, with or without a JSON content type (2015 clients send none)",
}
TEXT = {"type": "string"}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "the same key (at most 255 characters), the same run: a request sent again runs nothing more",
    "schema": {"type": "string", "maxLength": 255},
}
OPTIONAL_TEXT = {"type": ["string", "null"]}

BUS_SCHEMAS = json_schemas(ref_template="#/components/schemas/{name}")
AUTOMATION_SCHEMAS = msgspec.json.schema_components([AutomationSpec], ref_template="#/components/schemas/{name}")[1]
NUMBER_OR_TEXT = {"type": ["number", "string"]}
SCHEMAS: dict[str, Any] = {
    "NodeHistory": {
        "type": "object",
        "description": "Times are Unix seconds. A raw point is [t, value] (the value holds until the next "
        "point); a bucket is [start, low, mean, high, count] of the samples in it. `before` is the point in "
        "effect at `since`. Availability lists changes, with the ones in effect at `since`: `online`/`offline` "
        "(beacons) and `answering`/`not_answering` (commands and reads). Raw points (`step=0`) come 5 000 at "
        "most: `truncated` then says so, and `next_since` is where the next page begins.",
        "required": ["node_id", "since", "until", "availability"],
        "properties": {
            "node_id": NODE_ID_SCHEMA,
            "key": TEXT,
            "since": {"type": "number"},
            "until": {"type": "number"},
            "step": {"type": "integer", "minimum": 0},
            "truncated": {"type": "boolean"},
            "next_since": {"type": "number"},
            "points": {
                "type": "array",
                "items": {
                    "oneOf": [
                        {
                            "type": "array",
                            "prefixItems": [{"type": "number"}, NUMBER_OR_TEXT],
                            "minItems": 2,
                            "maxItems": 2,
                        },
                        {"type": "array", "items": {"type": "number"}, "minItems": 5, "maxItems": 5},
                    ]
                },
            },
            "before": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "array",
                        "prefixItems": [{"type": "number"}, NUMBER_OR_TEXT],
                        "minItems": 2,
                        "maxItems": 2,
                    },
                ]
            },
            "availability": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["t", "state", "reason"],
                    "properties": {
                        "t": {"type": "number"},
                        "state": {"enum": ["online", "offline", "answering", "not_answering"]},
                        "reason": OPTIONAL_TEXT,
                    },
                },
            },
        },
    },
    "Error": {"type": "object", "required": ["error", "message"], "properties": {"error": TEXT, "message": TEXT}},
    "Node": {
        "type": "object",
        "required": ["id", "name", "type", "ip", "last_updated"],
        "additionalProperties": False,
        "properties": {"id": {"type": "integer"}, "name": TEXT, "type": TEXT, "ip": TEXT, "last_updated": TEXT},
    },
    "NodeList": {
        "type": "object",
        "required": ["node_list"],
        "properties": {"node_list": {"type": "array", "items": ref("Node")}},
    },
    "Success": {"type": "object", "required": ["success"], "properties": {"success": {"const": True}}},
    # The bus payloads REST shows as they are, derived from their declarations.
    "CommandResult": BUS_SCHEMAS["CommandResult"],
    "SetCommand": BUS_SCHEMAS["SetCommand"],
    **AUTOMATION_SCHEMAS,  # AutomationSpec and the triggers and conditions it refers to
    "AutomationPreview": {
        "type": "object",
        "required": ["definition", "next_fires"],
        "properties": {
            "definition": ref("AutomationSpec"),
            # Empty for bus triggers: they fire on an event, not at a time.
            "next_fires": {"type": "array", "items": {"type": "string", "format": "date-time"}},
        },
    },
    "Automation": {
        "type": "object",
        "required": ["id", "name", "enabled", "definition", "changed_at", "failure", "next_fires", "last_runs"],
        "properties": {
            "id": {"type": "integer"},
            "name": TEXT,
            "enabled": {"type": "boolean"},
            "definition": ref("AutomationSpec"),
            "changed_at": {"type": "string", "format": "date-time"},
            # Why the scheduler cannot plan this definition (it never fires); null when it can.
            "failure": {"type": ["string", "null"]},
            "next_fires": {"type": "array", "items": {"type": "string", "format": "date-time"}},
            "last_runs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["due", "run_id", "late", "state", "exit_code"],
                    "properties": {
                        "due": {"type": "string", "format": "date-time"},
                        "run_id": TEXT,
                        "late": {"type": "boolean"},
                        "state": TEXT,
                        "exit_code": {"type": ["integer", "null"]},
                    },
                },
            },
        },
    },
    "AutomationList": {
        "type": "object",
        "required": ["automations"],
        "properties": {"automations": {"type": "array", "items": ref("Automation")}},
    },
    "AutomationTraces": {
        "type": "object",
        "required": ["traces"],
        "properties": {
            "traces": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        *("due", "fired_at", "late", "scheduler", "outcome", "why"),
                        *("trigger", "conditions", "steps", "definition"),
                    ],
                    "properties": {
                        "due": {"type": "string", "format": "date-time"},
                        "fired_at": {"type": ["string", "null"], "format": "date-time"},  # null: not run
                        "late": {"type": "boolean"},
                        "scheduler": TEXT,
                        # Held back (no steps): by a condition, the cooldown, mode single or a full queue.
                        "outcome": {"enum": ["fired", "held back"]},
                        "why": {"enum": [*get_args(HeldWhy), None]},
                        # What triggered it: {"kind": "time", "due"}, or the bus event with the values it
                        # carried (presence, value, run); null for fires made before traces were kept.
                        "trigger": {"type": ["object", "null"], "required": ["kind"]},
                        "conditions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["condition", "seen", "held"],
                                "properties": {"condition": {"type": "object"}, "held": {"type": "boolean"}},
                            },
                        },
                        "steps": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                # A run (the fire's own, or a `run` step's) has its run's state and
                                # times; a step of `steps` also its place, its own state and times,
                                # a `set`'s results, a `wait_for`'s condition as seen.
                                "required": ["kind", "state"],
                                "properties": {
                                    "kind": {"enum": list(get_args(StepKind))},
                                    "position": {"type": "integer"},
                                    "step_state": {"enum": list(get_args(StepState))},
                                    "began_at": {"type": "string", "format": "date-time"},
                                    "due_at": {"type": ["string", "null"], "format": "date-time"},
                                    "ended_at": {"type": ["string", "null"], "format": "date-time"},
                                    "results": {"type": "array", "items": {"type": "object"}},
                                    "seen": {"type": "object"},
                                    "run_id": TEXT,
                                    "state": TEXT,
                                    "exit_code": {"type": ["integer", "null"]},
                                    "error": {"type": ["string", "null"]},
                                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                                    "finished_at": {"type": ["string", "null"], "format": "date-time"},
                                },
                            },
                        },
                        "definition": {"anyOf": [ref("AutomationSpec"), {"type": "null"}]},
                    },
                },
            },
        },
    },
    "CommandResults": {
        "type": "object",
        "required": ["results"],
        "properties": {"results": {"type": "array", "items": ref("CommandResult")}, "error": TEXT, "message": TEXT},
    },
    "ScriptList": {
        "type": "object",
        "required": ["script_list"],
        "properties": {
            "script_list": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "name"],
                    "properties": {"id": {"type": "integer"}, "name": TEXT},
                },
            }
        },
    },
    "Started": {
        "type": "object",
        "required": ["status", "log_thread_id"],
        "properties": {"status": {"const": "ok"}, "log_thread_id": {"type": "integer"}, "run_id": TEXT},
    },
    "Run": {
        "type": "object",
        "required": [
            "thread_id",
            "run_id",
            "script",
            "params",
            "state",
            "runner",
            "exit_code",
            "error",
            "requested_by",
            "requested_at",
            "queued_at",
            "started_at",
            "finished_at",
        ],
        "properties": {
            "thread_id": {"type": "integer"},
            "run_id": TEXT,
            "script": TEXT,
            "params": {"type": "array", "items": TEXT},
            "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"]},
            "runner": TEXT,
            "exit_code": {"type": ["integer", "null"]},
            "error": OPTIONAL_TEXT,
            "requested_by": TEXT,
            "requested_at": TEXT,
            "queued_at": TEXT,
            "started_at": TEXT,
            "finished_at": TEXT,
        },
    },
    "RunPage": {
        "type": "object",
        "required": ["runs", "page", "per_page", "total"],
        "properties": {
            "runs": {"type": "array", "items": ref("Run")},
            "page": {"type": "integer"},
            "per_page": {"type": "integer"},
            "total": {"type": "integer"},
        },
    },
    "Cancelled": {
        "type": "object",
        "required": ["success", "run_id"],
        "properties": {"success": {"const": True}, "run_id": TEXT},
    },
    "Entry": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "timestamp", "thread_id", "script_name", "params", "entry_type", "data"],
        "properties": {
            "id": {"type": "integer"},
            "timestamp": TEXT,
            "thread_id": {"type": "integer"},
            "script_name": TEXT,
            "params": {"type": "array", "items": TEXT},
            "entry_type": {"enum": ["launch", "output", "sent_set", "sent_get", "result", "exception", "exit_status"]},
            "data": TEXT,
        },
    },
    "EntryList": {
        "type": "object",
        "required": ["entry_list"],
        "properties": {
            "entry_list": {"type": "array", "items": ref("Entry")},
            "truncated": {
                "type": "boolean",
                "description": "a run's log read without paging stopped at 10 000 entries "
                "or 4 MiB of data: page it to read the rest",
            },
        },
    },
    "NodeTypes": {
        "type": "object",
        "required": ["node_types"],
        "properties": {"node_types": {"type": "array", "items": TEXT}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "broker", "bridge", "runners", "database", "versions"],
        "properties": {
            "status": {"enum": ["ok", "degraded"]},
            "broker": TEXT,
            "bridge": TEXT,
            "runners": {"type": "array"},
            "database": TEXT,
            "versions": {"type": "object"},
        },
    },
}

LOG_FILTERS = [
    {"name": "script", "in": "query", "schema": TEXT},
    {"name": "entry_type", "in": "query", "schema": TEXT},
    {"name": "since", "in": "query", "schema": TEXT, "description": "ISO 8601, inclusive"},
    {"name": "until", "in": "query", "schema": TEXT, "description": "ISO 8601, exclusive"},
    *PAGING,
]

COMMAND_RESPONSES = {
    "200": body("CommandResults"),
    "400": ERROR,
    "404": ERROR,
    "502": body("CommandResults", "the node refused"),
    "504": body("CommandResults", "the node did not answer"),
}

PATHS: dict[str, Any] = {
    "/api/nodes": {"get": {"summary": "List nodes (2015)", "responses": {"200": body("NodeList")}}},
    "/api/nodes/id/{node_id}": {
        "parameters": [INT_ID],
        "get": {"summary": "A node (2015)", "responses": {"200": body("Node"), "404": ERROR}},
        "post": {
            "summary": 'Rename a node (2015): {"name": ...}',
            "requestBody": JSON_OBJECT_BODY,
            "responses": {"200": body("Success"), "400": ERROR, "404": ERROR, "409": ERROR, "413": ERROR},
        },
        "delete": {
            "summary": "Forget a node and clear its retained topics",
            "responses": {"200": body("Success"), "404": ERROR},
        },
    },
    "/api/nodes/name/{name}": {
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": TEXT}],
        "get": {"summary": "A node by name (2015)", "responses": {"200": body("Node"), "404": ERROR}},
    },
    "/api/nodes/id/{node_id}/set": {
        "parameters": [INT_ID],
        "post": {
            "summary": "Set values on a node: {key: value}; answered with its replies",
            "requestBody": {
                **JSON_OBJECT_BODY,
                "required": True,
                "content": {"application/json": {"schema": ref("SetCommand")}},
            },
            "responses": COMMAND_RESPONSES,
        },
    },
    "/api/nodes/id/{node_id}/get/{key}": {
        "parameters": [INT_ID, {"name": "key", "in": "path", "required": True, "schema": TEXT}],
        "get": {
            "summary": "Get a value from a node",
            "responses": COMMAND_RESPONSES,
        },
    },
    "/api/nodes/id/{node_id}/history": {
        "parameters": [INT_ID],
        "get": {
            "summary": "A node's history: a key's values (raw, or in buckets) and its availability",
            "parameters": [
                {
                    "name": "key",
                    "in": "query",
                    "schema": TEXT,
                    "description": "the value's key; none: availability only",
                },
                {"name": "since", "in": "query", "schema": TEXT, "description": "ISO 8601 or Unix seconds; a day ago"},
                {"name": "until", "in": "query", "schema": TEXT, "description": "ISO 8601 or Unix seconds; now"},
                {
                    "name": "step",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "bucket seconds; 0: every sample; none: every sample up to 5 000, else chosen",
                },
            ],
            "responses": {"200": body("NodeHistory"), "400": ERROR, "404": ERROR},
        },
    },
    "/api/node_types": {"get": {"summary": "Node types", "responses": {"200": body("NodeTypes")}}},
    "/api/scripts/list": {"get": {"summary": "Scripts (2015)", "responses": {"200": body("ScriptList")}}},
    "/api/scripts/exec/id/{script_id}": {
        "parameters": [{"name": "script_id", "in": "path", "required": True, "schema": ROW_ID_SCHEMA}],
        "post": {
            "summary": 'Run a script (2015): {"params": [...]}; `run_id` or an Idempotency-Key runs it once',
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": JSON_OBJECT_BODY,
            "responses": {"200": body("Started"), "400": ERROR, "404": ERROR, "409": ERROR},
        },
    },
    "/api/scripts/exec/name/{name}": {
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": TEXT}],
        "post": {
            "summary": "Run a script by name (2015)",
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": JSON_OBJECT_BODY,
            "responses": {"200": body("Started"), "400": ERROR, "404": ERROR, "409": ERROR},
        },
    },
    "/api/runs": {
        "get": {
            "summary": "Runs, newest first",
            "parameters": [
                {"name": "state", "in": "query", "schema": TEXT},
                {"name": "script", "in": "query", "schema": TEXT},
                *PAGING,
            ],
            "responses": {"200": body("RunPage"), "400": ERROR},
        }
    },
    "/api/runs/{key}": {
        "parameters": [RUN_KEY],
        "get": {"summary": "A run", "responses": {"200": body("Run"), "404": ERROR}},
    },
    "/api/runs/{key}/cancel": {
        "parameters": [RUN_KEY],
        "post": {"summary": "Cancel a run", "responses": {"200": body("Cancelled"), "404": ERROR, "409": ERROR}},
    },
    "/api/automations": {
        "get": {"summary": "Automations, each with its next fire", "responses": {"200": body("AutomationList")}},
        "post": {
            "summary": "Add an automation (see docs/automations.md)",
            "requestBody": AUTOMATION_BODY,
            "responses": {"201": body("Automation"), "400": ERROR, "409": ERROR},
        },
    },
    "/api/automations/preview": {
        "post": {
            "summary": "Check a definition as adding it would, and list its next five due times; nothing is saved",
            "requestBody": AUTOMATION_BODY,
            "responses": {"200": body("AutomationPreview"), "400": ERROR},
        },
    },
    "/api/automations/{automation_id}": {
        "parameters": [AUTOMATION_ID],
        "get": {
            "summary": "An automation: definition, next fires, last runs",
            "parameters": [
                {
                    "name": "from",
                    "in": "query",
                    "description": "list due times from this ISO 8601 time (in the trigger's zone without an offset)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "count",
                    "in": "query",
                    "description": "how many due times (5)",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                },
            ],
            "responses": {"200": body("Automation"), "400": ERROR, "404": ERROR},
        },
        "put": {
            "summary": "Replace an automation's definition (its count starts again)",
            "requestBody": AUTOMATION_BODY,
            "responses": {"200": body("Automation"), "400": ERROR, "404": ERROR, "409": ERROR},
        },
        "delete": {
            "summary": "Delete an automation (its runs stay)",
            "responses": {"200": body("Success"), "404": ERROR},
        },
    },
    "/api/automations/{automation_id}/traces": {
        "parameters": [AUTOMATION_ID],
        "get": {
            "summary": "Its last fires, newest first: the trigger, the conditions with the values seen, the run, "
            "the definition then",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "description": "how many fires (20)",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                }
            ],
            "responses": {"200": body("AutomationTraces"), "400": ERROR, "404": ERROR},
        },
    },
    "/api/automations/{automation_id}/enable": {
        "parameters": [AUTOMATION_ID],
        "post": {
            "summary": "Enable an automation",
            "responses": {"200": body("Automation"), "400": ERROR, "404": ERROR},
        },
    },
    "/api/automations/{automation_id}/disable": {
        "parameters": [AUTOMATION_ID],
        "post": {
            "summary": "Disable an automation",
            "responses": {"200": body("Automation"), "400": ERROR, "404": ERROR},
        },
    },
    "/api/logs/script": {
        "get": {
            "summary": "Log entries (2015), with filters and paging",
            "parameters": LOG_FILTERS,
            "responses": {"200": body("EntryList"), "400": ERROR},
        }
    },
    "/api/logs/script/thread_id/{thread_id}": {
        "parameters": [{"name": "thread_id", "in": "path", "required": True, "schema": ROW_ID_SCHEMA}],
        "get": {
            "summary": "A run's log entries (2015); without paging, the first 10 000 or 4 MiB",
            "parameters": LOG_FILTERS,
            "responses": {"200": body("EntryList"), "400": ERROR},
        },
    },
    "/api/health": {
        "get": {
            "summary": "Broker, bridge, runners, database, versions",
            "responses": {"200": body("Health"), "503": body("Health", "degraded")},
        }
    },
    "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": body({"type": "object"})}}},
}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hacer",
            "version": "2.0",
            "description": "Home automation over MQTT; the 2015 endpoints are kept field for field. "
            "Every error is JSON {error, message}. With HACER_API_TOKEN set, send "
            "`Authorization: Bearer <token>` (401 otherwise).",
        },
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
