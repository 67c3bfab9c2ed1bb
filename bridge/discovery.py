"""Home Assistant MQTT discovery: every node appears in Home Assistant by itself, as Zigbee2MQTT's do.

For each node the bridge publishes a retained config per entity under the discovery prefix:
a `switch` for an outlet, a `light` (template schema: the RGB colour as one integer) for an RGB
light, a temperature `sensor` for a thermometer, and a `sensor` plus a `number` (the target) for
a thermostat. Commands go to `hacer/nodes/<id>/set`, state comes from `hacer/nodes/<id>/state`,
and an entity is available only while the bridge is online, the node beacons and it answers.
A config is published when it changes (a new node, a new type or name), all of them again when
Home Assistant starts or the broker connection returns, and cleared when the node is deleted.
docs/topics.md shows the payloads; tests/unit/test_discovery.py checks them against Home
Assistant's discovery schemas.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from hacer.bus import Bus, Message
from hacer.messages import MessageError, NodeMeta
from hacer.topics import DiscoveryTopics, TopicError, Topics

log = logging.getLogger(__name__)

ORIGIN = {"name": "hacer"}
# The node's values are integers; Home Assistant's templates read them from the state JSON.
TEMPERATURE = {"device_class": "temperature", "unit_of_measurement": "°C"}


def entity_configs(topics: Topics, node_id: int, node_type: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The discovery configs of a node by (component, object id); none for a type Home Assistant has no entity for."""
    state, command = topics.build("node_state", node_id), topics.build("node_set", node_id)
    common: dict[str, Any] = {
        "availability_mode": "all",
        "availability": [
            {"topic": topics.build("bridge_state")},
            {"topic": topics.build("node_presence", node_id), "value_template": "{{ value_json.state }}"},
            {
                "topic": topics.build("node_readings", node_id),
                "value_template": "{{ 'online' if value_json.answering else 'offline' }}",
            },
        ],
        "device": {
            "identifiers": [f"hacer_{node_id}"],
            "name": name or f"{node_type} {node_id}",
            "manufacturer": "hacer",
            "model": node_type,
        },
        "origin": ORIGIN,
        "qos": 1,
    }

    def entity(key: str, entity_name: str | None, **fields: Any) -> dict[str, Any]:
        return {"name": entity_name, "unique_id": f"hacer_{node_id}_{key}", **common, **fields}

    if node_type == "toggle":
        return {
            ("switch", "on"): entity(
                "on",
                None,
                device_class="outlet",
                command_topic=command,
                payload_on='{"on": 1}',
                payload_off='{"on": 0}',
                state_topic=state,
                value_template="{{ 'ON' if value_json.on == 1 else 'OFF' if value_json.on == 0 else 'None' }}",
                state_on="ON",
                state_off="OFF",
            )
        }
    if node_type == "light_rgb":
        color = "(value_json.color | default(0) | int)"
        return {
            ("light", "color"): entity(
                "color",
                None,
                schema="template",
                command_topic=command,
                # Turned on without a colour: white, the firmware's own default.
                command_on_template='{"color": {{ (red | default(255)) * 65536 + (green | default(255)) * 256'
                " + (blue | default(255)) }}}",
                command_off_template='{"color": 0}',
                state_topic=state,
                state_template=f"{{{{ 'on' if {color} > 0 else 'off' }}}}",
                red_template=f"{{{{ {color} // 65536 }}}}",
                green_template=f"{{{{ {color} // 256 % 256 }}}}",
                blue_template=f"{{{{ {color} % 256 }}}}",
            )
        }
    configs: dict[tuple[str, str], dict[str, Any]] = {}
    if node_type in ("sensor_temp", "thermostat"):
        configs["sensor", "temperature"] = entity(
            "temperature",
            None if node_type == "sensor_temp" else "Temperature",
            **TEMPERATURE,
            state_class="measurement",
            state_topic=state,
            value_template="{{ value_json.temperature }}",
        )
    if node_type == "thermostat":
        configs["number", "target"] = entity(
            "target",
            "Target",
            **TEMPERATURE,
            command_topic=command,
            command_template='{"target": {{ value | int }}}',
            state_topic=state,
            value_template="{{ value_json.target }}",
            min=5,
            max=35,
            step=1,
            mode="box",
        )
    return configs


class Discovery:
    """Publishes and clears the nodes' discovery configs; see the module docstring."""

    def __init__(
        self, bus: Bus, topics: Topics, discovery: DiscoveryTopics, publish: Callable[[str, bytes], None]
    ) -> None:
        self.bus = bus
        self._send = publish  # retained, and sent again when the bus could not take it at once
        self.topics = topics
        self.discovery = discovery
        self._nodes: dict[int, tuple[str, str]] = {}  # node id -> (type, name)
        self._published: dict[int, dict[str, bytes]] = {}  # node id -> config topic -> payload
        self._lock = threading.Lock()

    def subscribe(self) -> None:
        """Follow Home Assistant's birth message and the nodes' names (before the bus starts)."""
        self.bus.subscribe(self.discovery.status(), self._on_status)
        self.bus.subscribe(self.topics.filter("node_meta"), self._on_meta)

    def node(self, node_id: int, node_type: str) -> None:
        """Publish the configs of a node seen with this type (nothing when unchanged)."""
        with self._lock:
            name = self._nodes.get(node_id, ("", ""))[1]
            self._nodes[node_id] = (node_type, name)
        self._publish(node_id)

    def forget(self, node_id: int) -> None:
        """Clear the configs of a deleted node."""
        with self._lock:
            self._nodes.pop(node_id, None)
            published = self._published.pop(node_id, {})
        for topic in published:
            self._send(topic, b"")

    def republish(self) -> None:
        """Publish every config again (Home Assistant restarted, or the broker may have lost them)."""
        with self._lock:
            self._published.clear()
            nodes = list(self._nodes)
        for node_id in nodes:
            self._publish(node_id)

    def _on_status(self, message: Message) -> None:
        if message.payload == b"online":
            log.info("Home Assistant started: publishing the discovery configs again")
            self.republish()

    def sync(self, nodes: list[tuple[int, str]]) -> None:
        """Know exactly these (node id, type) and publish every config again (after each connect)."""
        with self._lock:
            names = {node_id: known[1] for node_id, known in self._nodes.items()}
            self._nodes = {node_id: (node_type, names.get(node_id, "")) for node_id, node_type in nodes}
        self.republish()

    def _on_meta(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            meta = NodeMeta.from_payload(message.payload)
            if self.topics.node_id(message.topic) != meta.id:
                return
        except (MessageError, TopicError):
            return
        node_id, name = meta.id, meta.name or ""
        with self._lock:
            known = self._nodes.get(node_id)
            if known is None:  # its name is kept for when the node is seen
                self._nodes[node_id] = ("", name)
                return
            if known[1] == name:
                return
            self._nodes[node_id] = (known[0], name)
        self._publish(node_id)

    def _publish(self, node_id: int) -> None:
        with self._lock:
            if node_id not in self._nodes:
                return
            node_type, name = self._nodes[node_id]
            wanted = {
                self.discovery.config(component, node_id, object_id): json.dumps(config).encode()
                for (component, object_id), config in entity_configs(self.topics, node_id, node_type, name).items()
            }
            before = self._published.get(node_id, {})
            self._published[node_id] = wanted
        for topic in before.keys() - wanted.keys():  # the node changed type
            self._send(topic, b"")
        for topic, payload in wanted.items():
            if before.get(topic) != payload:
                self._send(topic, payload)
