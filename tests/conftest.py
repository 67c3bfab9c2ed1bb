"""Fixtures: a real mosquitto per test on free ports, bus clients, watchers and hacer processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port
from hacer.bus import Bus, Message
from hacer.messages import Presence
from hacer.parentdeath import child_env
from hacer.settings import PROJECT_DIR
from hacer.topics import Topics
from ops.broker import CONFIG_DIR, BrokerError, BrokerProcess, port_answers
from ops.brokerusers import USERS

POSTGRES_URL = os.environ.get("HACER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll `predicate` until it is truthy; for state with no event to wait on (files, processes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Watcher:
    """Collects the messages of a topic filter and waits for the ones a test expects."""

    def __init__(self, bus: Bus, topic_filter: str) -> None:
        self.messages: list[Message] = []
        self.arrival_times: list[float] = []
        self._changed = threading.Condition()
        bus.subscribe(topic_filter, self._on_message)

    def _on_message(self, message: Message) -> None:
        with self._changed:
            self.messages.append(message)
            self.arrival_times.append(time.time())
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 10.0, start: int = 0) -> Message:
        """Return the first message from index `start` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            index = start
            while True:
                while index < len(self.messages):
                    if predicate(self.messages[index]):
                        return self.messages[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no matching message within {timeout} s; got "
                        f"{[(m.topic, m.payload[:80]) for m in self.messages[-10:]]}"
                    )
                self._changed.wait(remaining)

    def topic(self, topic: str) -> list[Message]:
        """Return the messages received on one topic."""
        with self._changed:
            return [m for m in self.messages if m.topic == topic]


def start_broker(work: Path, template: Path = CONFIG_DIR / "dev.conf") -> BrokerProcess:
    """A mosquitto on free ports; others are tried if one is taken before it binds them (TIME_WAIT, another test)."""
    for attempt in range(3):
        process = BrokerProcess(work, [free_port()], template=template)
        try:
            process.start()
            return process
        except BrokerError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


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


class HacerProcess:
    """A `python manage.py <command>` child with its output in a file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HacerProcess:
        with open(self.log_path, "ab") as log:
            # child_env: the child dies with this test process, even if pytest is killed
            self.process = subprocess.Popen(
                [sys.executable, str(PROJECT_DIR / "manage.py"), *self.command],
                env=child_env(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_DIR,
            )
        return self

    def stop(self, kill: bool = False) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


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


def target(env):
    return ("127.0.0.1", int(env["HACER_DISCOVERY_PORT"]))


def presence_of(message):
    return Presence.from_payload(message.payload)


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


def start_production_broker(work: Path, passwords: Path, port: int | None = None) -> BrokerProcess:
    """mosquitto with the production config, the project's ACL, `passwords` and a new certificate.

    Its ports are picked last, right before it binds them: the certificate takes a while to make,
    and a port picked before that may be taken meanwhile.
    """
    acl = work / "acl"
    shutil.copy(CONFIG_DIR / "acl", acl)
    certificate, key = work / "hacer.crt", work / "hacer.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hacer",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
        ],
        check=True,
        capture_output=True,
    )
    for attempt in range(3):
        process = BrokerProcess(
            work,
            [port or free_port(), free_port()],
            template=CONFIG_DIR / "production.conf",
            password_file=passwords,
            acl_file=acl,
            tls_files=(certificate, key),
        )
        try:
            process.start()
            return process
        except BrokerError:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


def url(broker, user):
    return f"mqtt://{user}:{user}-secret@127.0.0.1:{broker.port}" if user else broker.url


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


# --- a live api process (the hostile suite) ------------------------------------------------------


# The api's two servers: eventlet's, and gunicorn's threaded worker (runserver's default layout).
API_MODES = {"eventlet": ["api"], "threads": ["parts", "api"]}


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
