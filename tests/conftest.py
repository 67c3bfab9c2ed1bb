"""Fixtures every folder of tests shares: a real mosquitto per test on free ports, bus clients, watchers,
databases of each kind and hacer processes (the helpers they use are in support.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port
from hacer.bus import Bus
from hacer.topics import Topics
from ops.broker import BrokerProcess
from ops.brokerusers import USERS

from support import (
    POSTGRES_URL,
    HacerProcess,
    Watcher,
    free_port,
    start_broker,
    start_production_broker,
    url,
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A mosquitto from mosquitto/dev.conf on free ports, its files in the test's folder."""
    process = start_broker(tmp_path / "broker")
    yield process
    process.stop()


@pytest.fixture
def topics() -> Topics:
    return Topics("hacer")


@pytest.fixture
def make_bus(broker: BrokerProcess, topics: Topics) -> Iterator[Callable[..., Bus]]:
    """Start connected Bus clients; fail the test if any handler raised."""
    buses: list[Bus] = []

    def make(client_id: str | None = None, **options: object) -> Bus:
        bus = Bus(broker.url, topics, client_id or f"test-{uuid.uuid4().hex[:8]}", **options)  # type: ignore[arg-type]
        bus.start()
        bus.wait_connected(10)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.stop()
    assert all(bus.handler_errors == 0 for bus in buses), "a bus handler raised; see the log"


@pytest.fixture
def watch(make_bus: Callable[..., Bus]) -> Callable[[str], Watcher]:
    """Watch a topic filter with a fresh client, subscribed when this returns."""

    def make(topic_filter: str) -> Watcher:
        bus = make_bus()
        watcher = Watcher(bus, topic_filter)
        bus.sync()
        return watcher

    return make


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL; skipped, saying why, when none answers."""
    from sqlalchemy import text

    from hacer.models import Database

    schema = f"test_{uuid.uuid4().hex[:10]}"
    admin = Database(POSTGRES_URL)
    try:
        with admin.engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means no server here
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a SQLite file in tmp_path, and a fresh PostgreSQL schema."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'hacer.db'}"


@pytest.fixture
def database(database_url: str) -> Iterator[Any]:
    """An initialised database of each kind."""
    from hacer.models import Database

    database = Database(database_url)
    database.init()
    yield database
    database.engine.dispose()


@pytest.fixture
def hacer_env(broker: BrokerProcess, tmp_path: Path) -> dict[str, str]:
    """Environment for hacer children: this test's broker, free ports, files in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}
    env.update(
        {
            "HACER_MQTT_URL": broker.url,
            "HACER_DISCOVERY_HOST": "127.0.0.1",
            "HACER_DISCOVERY_PORT": str(free_port(socket.SOCK_DGRAM)),
            "HACER_NODE_PORT": str(free_port()),
            "HACER_STATE_DIR": str(tmp_path / "state"),
            "HADB_PATH": str(tmp_path / "hacer.db"),
            "HACER_STATS_INTERVAL": "0.5",
            "HACER_LASTSEEN_INTERVAL": "0.5",
            "HACER_POLL": "off",  # the tests of the bridge's reads turn them on
            "HACER_NODE_DATA_EVERY": "0",  # readings in the database at once (tests/component/test_recorder.py waits)
            # A run's messages too: a second's wait at each run's end made the suite twice as long.
            # tests/component/test_recorder.py tests the wait; tests/system/test_chaos.py runs with the default.
            "HACER_RUN_DATA_EVERY": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def spawn(tmp_path: Path, broker: BrokerProcess) -> Iterator[Callable[..., HacerProcess]]:
    """Start hacer child processes; stop them all at the end of the test."""
    children: list[HacerProcess] = []

    def start(command: list[str], env: dict[str, str], name: str | None = None) -> HacerProcess:
        child = HacerProcess(command, env, tmp_path / f"{name or command[0]}-{len(children)}.log").start()
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


# --- the bridge as a process ------------------------------------------------------------------


@pytest.fixture
def bridge_env(hacer_env):
    hacer_env["HACER_OFFLINE_AFTER"] = "1.5"
    return hacer_env


@pytest.fixture
def start_bridge(spawn, bridge_env, watch, topics):
    """Start `manage.py bridge`; return once its retained state says online."""
    state = watch(topics.build("bridge_state"))

    def start():
        count = len([m for m in state.messages if m.payload == b"online"])
        child = spawn(["bridge"], bridge_env)
        state.wait_for(lambda m: m.payload == b"online", timeout=15, start=len(state.messages) if count else 0)
        return child

    return start


# --- the production broker: password file and ACL ---------------------------------------------


@pytest.fixture
def production_broker(tmp_path):
    work = tmp_path / "broker"
    work.mkdir()
    passwords = work / "passwd"
    for user in USERS:
        flags = ["-b"] if passwords.exists() else ["-c", "-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwords), user, f"{user}-secret"], check=True)
    process = start_production_broker(work, passwords)
    yield process
    process.stop()


@pytest.fixture
def connect(production_broker):
    buses = []

    def make(user, wait=True):
        bus = Bus(url(production_broker, user), Topics(), f"{user or 'anon'}-{uuid.uuid4().hex[:6]}")
        bus.start()
        buses.append(bus)
        if wait:
            bus.wait_connected(5)
        return bus

    yield make
    for bus in buses:
        bus.stop()
