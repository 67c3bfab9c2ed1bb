"""A LAN host that opens connections and never finishes them, against the api in both servers and runserver."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys

import pytest
import requests
from test_manage import status

from bench.common import free_port
from hacer.parentdeath import child_env
from hacer.settings import PROJECT_DIR
from ops.broker import port_answers

from support import API_MODES, wait_until

HALF_A_REQUEST = b"GET /api/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # and never the blank line


def hold(count: int, port: int, source: str = "127.0.0.2") -> list[socket.socket]:
    """Open `count` connections from `source`, each with half a request sent; refused ones are closed by the server."""
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        with contextlib.suppress(OSError):
            sock.sendall(HALF_A_REQUEST)
        held.append(sock)
    return held


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("mode", list(API_MODES))
def test_an_idle_half_sent_request_is_closed(mode, spawn, hacer_env):
    port = free_port()
    spawn(API_MODES[mode], {**hacer_env, "HACER_HTTP_PORT": str(port), "HACER_HTTP_IDLE_TIMEOUT": "2"})
    wait_until(lambda: port_answers("127.0.0.1", port), 30, "the api")
    (sock,) = hold(1, port)
    try:
        assert closed_by_server(sock, 30), "the server kept a connection that sent nothing for 2 s"
    finally:
        sock.close()


@pytest.fixture
def more_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("layout", [[], ["--split"]], ids=["default", "split"])
def test_1100_idle_connections_leave_runs_and_commands_working(layout, hacer_env, more_fds, tmp_path):
    """With systemd's default of 1 024 descriptors, one host's 1 100 idle connections take no part's."""
    env = {
        **hacer_env,
        "HACER_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",  # runserver's own broker
        "HACER_HTTP_PORT": str(free_port()),
    }
    port = int(env["HACER_HTTP_PORT"])
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "runserver.log", "wb")
    server = subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "runserver", *layout, "--emulate", "1"],
        env=child_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),  # noqa: PLW1509 - a limit only
    )
    held: list[socket.socket] = []
    try:
        wait_until(lambda: status(env).returncode == 0, 60, "every part online (manage.py status)")
        node = wait_until(lambda: requests.get(url + "/api/nodes", timeout=10).json()["node_list"], 30, "the node")[0]
        held = hold(1100, port)
        refused = sum(closed_by_server(sock, 10) for sock in held[-10:])
        assert refused == 10, "connections past the per-client limit are closed at once"
        answer = requests.post(url + f"/api/nodes/id/{node['id']}/set", data=json.dumps({"on": 1}), timeout=20)
        assert answer.status_code == 200 and answer.json()["results"][0]["ok"], answer.text
        done = subprocess.run(
            [sys.executable, str(PROJECT_DIR / "manage.py"), "run", "test", "while-held"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "test script running with ['while-held']" in done.stdout, done.stderr
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        server.wait(30)
        log.close()
    output = (tmp_path / "runserver.log").read_text()
    assert "Too many open files" not in output and "over the api's limits" in output, output[-3000:]
