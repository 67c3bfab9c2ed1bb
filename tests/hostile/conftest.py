"""The hostile suite's own fixture: a live api process in each of its servers."""

from __future__ import annotations

import os
import uuid

import pytest

from hacer.bus import Bus
from hacer.topics import Topics
from ops.broker import port_answers

from support import API_MODES, HacerProcess, Watcher, free_port, start_broker, wait_until


@pytest.fixture(scope="module", params=list(API_MODES))
def live_api(request, tmp_path_factory):
    """A broker and an api process (no token, the default) serving in each mode, with a watcher on run requests."""
    work = tmp_path_factory.mktemp(f"hostile-api-{request.param}")
    broker = start_broker(work / "broker")
    port = free_port()
    env = {
        "HACER_MQTT_URL": broker.url,
        "HACER_HTTP_PORT": str(port),
        "HADB_PATH": str(work / "hacer.db"),
        "HACER_STATE_DIR": str(work / "state"),
        "PYTHONUNBUFFERED": "1",
        "HACER_DATABASE_TIMEOUT": "2",
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}, **env}
    process = HacerProcess(API_MODES[request.param], env, work / "api.log").start()
    bus = Bus(broker.url, Topics(), f"hostile-{uuid.uuid4().hex[:6]}")
    requests_seen = Watcher(bus, Topics().build("run_request"))
    bus.start()
    bus.wait_connected(10)
    wait_until(lambda: port_answers("127.0.0.1", port), 20, "the api to listen")
    api = type("Api", (), {})()
    api.url, api.port, api.process, api.requests = f"http://127.0.0.1:{port}", port, process, requests_seen
    api.mode = request.param
    api.bus, api.database = bus, work / "hacer.db"
    yield api
    bus.stop()
    process.stop()
    broker.stop()
