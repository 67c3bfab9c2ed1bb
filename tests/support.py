"""What tests of every folder build on: waiting, watching the bus, brokers and hacer processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import free_port
from hacer.bus import Bus, Message
from hacer.messages import Presence
from hacer.parentdeath import child_env
from hacer.settings import PROJECT_DIR
from ops.broker import CONFIG_DIR, BrokerError, BrokerProcess

__all__ = [
    "API_MODES",
    "POSTGRES_URL",
    "HacerProcess",
    "Watcher",
    "free_port",
    "presence_of",
    "start_broker",
    "start_production_broker",
    "target",
    "url",
    "wait_until",
]

# The api's two servers: eventlet's, and gunicorn's threaded worker (runserver's default layout).
API_MODES = {"eventlet": ["api"], "threads": ["parts", "api"]}
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


def target(env):
    return ("127.0.0.1", int(env["HACER_DISCOVERY_PORT"]))


def presence_of(message):
    return Presence.from_payload(message.payload)


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
