"""Home Assistant discovery: configs checked against its schemas, their templates run (the bridge publishing them:
tests/component/test_bridge.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest

from bridge.discovery import entity_configs
from hacer.messages import SetCommand
from hacer.topics import DiscoveryTopics, Topics, is_wildcard

SCHEMA = json.loads((Path(__file__).parent.parent / "data" / "ha-mqtt-discovery.json").read_text())
TOPICS = Topics()
NODE = 1234567
TYPES = ("toggle", "light_rgb", "sensor_temp", "thermostat")
EXPECTED = {
    "toggle": {("switch", "on")},
    "light_rgb": {("light", "color")},
    "sensor_temp": {("sensor", "temperature")},
    "thermostat": {("sensor", "temperature"), ("number", "target")},
    "other": set(),
}


def check_keys(config: dict, part: dict, what: str) -> None:
    allowed = set(part.get("required", [])) | set(part.get("optional", []))
    assert set(config) <= allowed, f"{what}: keys Home Assistant does not know: {set(config) - allowed}"
    assert set(part.get("required", [])) <= set(config), f"{what}: missing {set(part['required']) - set(config)}"
    for key, values in part.get("values", {}).items():
        assert key not in config or config[key] in values, f"{what}: {key}={config[key]!r}"


def check_config(component: str, config: dict) -> None:
    platform = SCHEMA["platforms"][component]
    family = SCHEMA[platform["extends"]]
    common = SCHEMA["entity_common"]
    merged = {
        "required": family["required"] + platform.get("required", []),
        "optional": SCHEMA["base"]["optional"] + family["optional"] + common["optional"] + platform["optional"],
        "values": {**common["values"], **platform.get("values", {})},
    }
    check_keys(config, merged, component)
    for pair in common["exclusive"]:
        assert sum(key in config for key in pair) <= 1, f"{component}: {pair} exclude each other"
    for item in config.get("availability", []):
        check_keys(item, SCHEMA["availability_item"], "availability")
        assert not is_wildcard(item["topic"])
    check_keys(config["device"], SCHEMA["device"], "device")
    assert any(config["device"].get(key) for key in SCHEMA["device"]["one_of"]), "a device needs an identifier"
    check_keys(config["origin"], SCHEMA["origin"], "origin")
    for key in ("command_topic", "state_topic"):
        assert key not in config or (config[key] and not is_wildcard(config[key]))
    assert "min" not in config or config["min"] < config["max"]
    assert config["qos"] in (0, 1, 2)


@pytest.mark.parametrize("node_type", [*TYPES, "other"])
def test_every_config_is_one_home_assistant_takes(node_type):
    configs = entity_configs(TOPICS, NODE, node_type, "hall")
    assert set(configs) == EXPECTED[node_type]
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for (component, object_id), config in configs.items():
        check_config(component, config)
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", object_id)
        assert config["device"]["identifiers"] == [f"hacer_{NODE}"] and config["device"]["name"] == "hall"
        assert (
            DiscoveryTopics().config(component, NODE, object_id)
            == f"homeassistant/{component}/hacer_{NODE}/{object_id}/config"
        )


# --- the templates, run as Home Assistant runs them (Jinja, with value_json the payload's JSON) --------


def render(template: str, payload: dict | None = None, **variables) -> str:
    return jinja2.Environment(undefined=jinja2.Undefined).from_string(template).render(value_json=payload, **variables)


def command(payload: str) -> dict:
    return SetCommand.from_payload(payload).values  # what the bridge will accept


def test_the_switch_turns_the_outlet_and_reads_it_back():
    switch = entity_configs(TOPICS, NODE, "toggle", "")[("switch", "on")]
    assert command(switch["payload_on"]) == {"on": 1} and command(switch["payload_off"]) == {"on": 0}
    assert switch["command_topic"] == TOPICS.build("node_set", NODE) == "hacer/nodes/1234567/set"
    read = [render(switch["value_template"], state) for state in ({"on": 1}, {"on": 0}, {"name": "x"})]
    assert read == [switch["state_on"], switch["state_off"], "None"]  # "None": unknown, to Home Assistant


def test_the_light_sends_and_reads_its_colour_as_one_integer():
    light = entity_configs(TOPICS, NODE, "light_rgb", "")[("light", "color")]
    assert command(render(light["command_on_template"], red=255, green=0, blue=128)) == {"color": 0xFF0080}
    assert command(render(light["command_on_template"])) == {"color": 0xFFFFFF}  # on, no colour given
    assert command(render(light["command_off_template"])) == {"color": 0}
    state = {"color": 0x00FF80, "name": ""}
    assert [render(light[f"{c}_template"], state) for c in ("red", "green", "blue")] == ["0", "255", "128"]
    assert render(light["state_template"], state) == "on" and render(light["state_template"], {"color": 0}) == "off"
    assert render(light["state_template"], {"name": ""}) == "off"


def test_the_thermostat_shows_its_temperature_and_takes_a_target():
    configs = entity_configs(TOPICS, NODE, "thermostat", "")
    sensor, target_ = configs["sensor", "temperature"], configs["number", "target"]
    state = {"temperature": 21, "target": 20}
    assert render(sensor["value_template"], state) == "21" and render(target_["value_template"], state) == "20"
    assert sensor["device_class"] == "temperature" and sensor["unit_of_measurement"] == "°C"
    assert command(render(target_["command_template"], value=22.0)) == {"target": 22}


def test_availability_needs_the_bridge_the_beacons_and_the_answers():
    availability = entity_configs(TOPICS, NODE, "toggle", "")[("switch", "on")]["availability"]
    presence, readings = availability[1], availability[2]
    assert availability[0]["topic"] == "hacer/bridge/state"  # its payloads are Home Assistant's defaults
    assert render(presence["value_template"], {"state": "offline"}) == "offline"
    assert render(readings["value_template"], {"answering": True}) == "online"
    assert render(readings["value_template"], {"answering": False}) == "offline"
