"""A real Home Assistant (2024.1.6, the newest on Python 3.11) discovers the nodes through the bridge.

`./setup.sh --dev` installs it in `.venv-ha`, apart from the project's environment. It connects to
this test's broker through a config entry written to `.storage`, publishes its entities' states
with `mqtt_statestream` (so the test reads what Home Assistant shows), and its automations, fired
by an MQTT message, switch the outlet and colour the light as a user would.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from emulator.nodes import Emulator, make_nodes
from hacer.settings import PROJECT_DIR

from support import target, wait_until

HA_PYTHON = PROJECT_DIR / ".venv-ha" / "bin" / "python"
STATES = "hastates"  # mqtt_statestream's base topic
CONFIGURATION = """
homeassistant:
  name: hacer test
  unit_system: metric
  time_zone: UTC
  latitude: 40.4
  longitude: -3.7
  elevation: 0
logger:
  default: warning
automation:
  - alias: outlet on
    trigger: {{platform: mqtt, topic: hatest/outlet_on}}
    action: {{service: switch.turn_on, target: {{entity_id: switch.toggle_{toggle}}}}}
  - alias: light colour
    trigger: {{platform: mqtt, topic: hatest/light_colour}}
    action:
      service: light.turn_on
      target: {{entity_id: light.light_rgb_{light}}}
      data: {{rgb_color: [255, 0, 128]}}
mqtt_statestream:
  base_topic: {states}
  publish_attributes: false
"""


def config_entry(port: int) -> dict:
    return {
        "version": 1,
        "minor_version": 1,
        "key": "core.config_entries",
        "data": {
            "entries": [
                {
                    "entry_id": uuid.uuid4().hex,
                    "version": 1,
                    "minor_version": 1,
                    "domain": "mqtt",
                    "title": "127.0.0.1",
                    "data": {"broker": "127.0.0.1", "port": port, "discovery": True},
                    "options": {},
                    "pref_disable_new_entities": False,
                    "pref_disable_polling": False,
                    "source": "user",
                    "unique_id": None,
                    "disabled_by": None,
                }
            ]
        },
    }


class HomeAssistant:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.folder / "ha.log", "ab")
        self.process = subprocess.Popen(
            [str(HA_PYTHON), "-m", "homeassistant", "-c", str(self.folder), "--skip-pip"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # Home Assistant saves its registries as it stops
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def registry(self, name: str) -> dict:
        path = self.folder / ".storage" / name
        return json.loads(path.read_text())["data"] if path.exists() else {}

    def log(self) -> str:
        return (self.folder / "ha.log").read_text(errors="replace")


@pytest.fixture
def home_assistant(tmp_path, broker):
    if not HA_PYTHON.exists():
        pytest.fail("Home Assistant is missing: `./setup.sh --dev` installs it in .venv-ha")
    folder = tmp_path / "ha"
    (folder / ".storage").mkdir(parents=True)
    (folder / ".storage" / "core.config_entries").write_text(json.dumps(config_entry(broker.port)))
    ha = HomeAssistant(folder)
    yield ha
    ha.stop()


@pytest.mark.timeout(600)  # Home Assistant starts twice
def test_home_assistant_discovers_shows_and_commands_every_node_type(
    home_assistant, start_bridge, bridge_env, watch, make_bus, topics
):
    bridge_env["HACER_OFFLINE_AFTER"] = "600"
    bridge_env["HACER_POLL"] = "thermostat:temperature,target@1 sensor_temp:temperature@1 toggle:on@1 light_rgb:color@1"
    made = make_nodes(4, ["toggle", "light_rgb", "thermostat", "sensor_temp"], port=int(bridge_env["HACER_NODE_PORT"]))
    toggle, light, thermostat, sensor = made
    (home_assistant.folder / "configuration.yaml").write_text(
        CONFIGURATION.format(toggle=toggle.id, light=light.id, states=STATES)
    )
    emulator = Emulator(made, target(bridge_env))
    emulator.start()
    states = watch(f"{STATES}/#")
    try:
        start_bridge()
        home_assistant.start()
        wanted = {
            f"{STATES}/sensor/sensor_temp_{sensor.id}/state": b"21",
            f"{STATES}/sensor/thermostat_{thermostat.id}_temperature/state": b"21",
            f"{STATES}/number/thermostat_{thermostat.id}_target/state": b"20",
            f"{STATES}/switch/toggle_{toggle.id}/state": b"off",
        }
        for topic, value in wanted.items():
            states.wait_for(lambda m, t=topic, v=value: m.topic == t and m.payload == v, timeout=90)
        assert "extra keys not allowed" not in home_assistant.log()

        bus = make_bus()
        bus.publish("hatest/outlet_on", b"1")
        wait_until(lambda: toggle.values["on"] == 1, 30, "the outlet switched on by Home Assistant")
        states.wait_for(lambda m: m.topic == f"{STATES}/switch/toggle_{toggle.id}/state" and m.payload == b"on", 30)
        bus.publish("hatest/light_colour", b"1")
        wait_until(lambda: light.values["color"] == 0xFF0080, 30, "the light coloured by Home Assistant")

        def discovered() -> dict[str, dict]:
            entities = home_assistant.registry("core.entity_registry").get("entities", [])
            return {e["unique_id"]: e for e in entities if e["platform"] == "mqtt"}

        unique_ids = {
            f"hacer_{toggle.id}_on",
            f"hacer_{light.id}_color",
            f"hacer_{thermostat.id}_temperature",
            f"hacer_{thermostat.id}_target",
            f"hacer_{sensor.id}_temperature",
        }
        home_assistant.stop()  # it saves its registries as it stops
        assert set(discovered()) == unique_ids
        devices = home_assistant.registry("core.device_registry")["devices"]
        identifiers = {tuple(i) for d in devices for i in d["identifiers"] if i[0] == "mqtt"}
        assert identifiers == {("mqtt", f"hacer_{node.id}") for node in made}
        assert len({discovered()[uid]["device_id"] for uid in unique_ids}) == 4  # one device a node

        seen = len(states.messages)
        home_assistant.start()  # after a restart: the same entities, their states again
        states.wait_for(
            lambda m: m.topic == f"{STATES}/sensor/sensor_temp_{sensor.id}/state" and m.payload == b"21",
            timeout=120,
            start=seen,
        )
        home_assistant.stop()
        assert set(discovered()) == unique_ids
    finally:
        emulator.stop()
