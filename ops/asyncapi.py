"""The AsyncAPI 3.0 document of the bus (docs/asyncapi.json), derived from hacer/topics.py and hacer/messages.py.

Every topic is a channel; its publishing is an operation with the MQTT binding's QoS and retain
flag and says who publishes; payloads are the declared schemas. `manage.py schemas --write`
renews the file; tests/unit/test_docs.py fails while it is stale.
"""

from __future__ import annotations

from typing import Any

from hacer.schemas import json_schemas
from hacer.topics import TOPIC_SPECS, TopicSpec

# The variable level's name in each branch of the tree, as docs/topics.md writes it.
PARAMETERS = {
    "nodes": ("id", "a node's id (its ESP chip id)"),
    "runs": ("run_id", "a run's id"),
    "runners": ("runner_id", "a runner's id (HACER_RUNNER_ID)"),
    "recorders": ("recorder_id", "a recorder's id (HACER_RECORDER_ID)"),
    "schedulers": ("scheduler_id", "a scheduler's id (HACER_SCHEDULER_ID)"),
    "automations": ("id", "an automation's id"),
    "clients": ("client_id", "an MQTT client id"),
    "replies": ("client_id", "the MQTT client id of the command's sender"),
}
TEXT = {"type": "string", "description": "plain text (UTF-8), not JSON"}
MQTT_BINDING = "0.2.0"


def parameter(spec: TopicSpec) -> tuple[str, str] | None:
    """The name and meaning of a topic's variable level, None for a topic without one."""
    return PARAMETERS[spec.pattern.split("/")[0]] if "{arg}" in spec.pattern else None


def document(prefix: str = "hacer") -> dict[str, Any]:
    """The whole AsyncAPI document for topics under `prefix`."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in TOPIC_SPECS:
        message = spec.payload or f"{spec.name}_text"
        messages.setdefault(
            message,
            {"name": message, "contentType": "application/json", "payload": {"$ref": f"#/components/schemas/{message}"}}
            if spec.payload
            else {"name": message, "contentType": "text/plain", "payload": TEXT},
        )
        address = f"{prefix}/{spec.pattern}"
        channel: dict[str, Any] = {
            "address": address,
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            "description": f"{'retained' if spec.retained else 'not retained'}, QoS {spec.qos}; see docs/topics.md",
        }
        named = parameter(spec)
        if named is not None:
            channel["address"] = address.replace("{arg}", "{" + named[0] + "}")
            channel["parameters"] = {named[0]: {"description": named[1]}}
        channels[spec.name] = channel
        operations[f"publish_{spec.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{spec.name}"},
            "summary": f"published by: {spec.publisher}",
            "messages": [{"$ref": f"#/channels/{spec.name}/messages/{message}"}],
            "bindings": {"mqtt": {"qos": spec.qos, "retain": spec.retained, "bindingVersion": MQTT_BINDING}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "hacer bus",
            "version": "1",
            "description": "Every topic of hacer's MQTT bus (MQTT 5), who publishes it, its QoS and retain "
            "flag, and its payload's schema. docs/topics.md says the same with examples.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:1883",
                "protocol": "mqtt",
                "protocolVersion": "5",
                "description": "the broker runserver starts, or mosquitto with mosquitto/production.conf",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": _asyncapi_schema(json_schemas("#/components/schemas/{name}"))},
    }


def _asyncapi_schema(schema: Any) -> Any:
    """A JSON schema as AsyncAPI takes it: its discriminator is the property's name, not OpenAPI's object."""
    if isinstance(schema, dict):
        return {
            key: value["propertyName"]
            if key == "discriminator" and isinstance(value, dict)
            else _asyncapi_schema(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_asyncapi_schema(item) for item in schema]
    return schema
