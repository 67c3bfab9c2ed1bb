"""Every example command of the README and docs/ runs, as written, against `runserver --emulate 4`.

Only the addresses change: the broker's and the api's ports are this test's (`-p` added to
mosquitto_pub/sub, the port in curl's URL), and `manage.py` gets the server's environment.
docs/deploy.md's commands set up a machine (apt, systemd): tests/system/test_deploy.py covers those.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from hacer.settings import PROJECT_DIR
from ops.broker import port_answers

from support import free_port, wait_until

DOCUMENTS = ("README.md", "docs/automations.md", "docs/topics.md")
PROGRAMS = ("mosquitto_pub", "mosquitto_sub", "mosquitto_rr", "curl", ".venv/bin/python")


def example_commands(text: str) -> list[str]:
    """The commands of a document's indented blocks, continuation lines joined, comments kept."""
    commands: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not line.startswith("    ") and not pending:
            continue
        part = line.strip()
        pending = f"{pending} {part}" if pending else part
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote open: the definition goes on on the next line
            continue
        if pending.startswith(PROGRAMS):
            commands.append(pending)
        pending = ""
    return commands


def localised(command: str, mqtt_port: int, http_port: int) -> list[str]:
    """The command's words, with this test's ports."""
    words = shlex.split(command, comments=True)
    if words[0] in ("mosquitto_pub", "mosquitto_sub", "mosquitto_rr"):
        words[1:1] = ["-p", str(mqtt_port)]
        if words[0] == "mosquitto_sub":
            words[1:1] = ["-W", "2"]  # it would wait for ever: 2 s, then exit 27 (nothing came)
        if words[0] == "mosquitto_rr":
            words[1:1] = ["-W", "30"]  # a reply must come: no reply within 30 s exits 27, a failure
    elif words[0] == "curl":
        words = [word.replace("127.0.0.1:5000", f"127.0.0.1:{http_port}") for word in words]
    return words


def test_example_commands_are_found():
    found = {path: example_commands((PROJECT_DIR / path).read_text()) for path in DOCUMENTS}
    assert len(found["README.md"]) >= 8 and len(found["docs/automations.md"]) >= 8
    assert len(found["docs/topics.md"]) >= 25


@pytest.fixture
def server(spawn, hacer_env, broker):
    hacer_env["HACER_HTTP_PORT"] = str(free_port())
    hacer_env["HACER_POLL"] = ""  # the defaults: 1002's temperature is read
    hacer_env["HACER_LATITUDE"], hacer_env["HACER_LONGITUDE"] = "40.4", "-3.7"  # as docs/automations.md asks
    spawn(["runserver", "--emulate", "4"], hacer_env)
    url = f"http://127.0.0.1:{hacer_env['HACER_HTTP_PORT']}"
    wait_until(lambda: port_answers("127.0.0.1", int(hacer_env["HACER_HTTP_PORT"])), 60, "the api")
    wait_until(
        lambda: (
            len(requests.get(f"{url}/api/nodes", timeout=5).json()["node_list"]) == 4
            and requests.get(f"{url}/api/health", timeout=5).status_code == 200
        ),
        60,
        "the four emulated nodes and a healthy api",
    )
    return hacer_env, broker.port, int(hacer_env["HACER_HTTP_PORT"]), url


def run_example(command: str, env: dict[str, str], mqtt_port: int, http_port: int) -> subprocess.CompletedProcess:
    words = localised(command, mqtt_port, http_port)
    return subprocess.run(words, env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_example_command_runs_against_a_running_server(server, document):
    env, mqtt_port, http_port, url = server
    failures = []
    commands = example_commands((PROJECT_DIR / document).read_text())
    # Each mosquitto_sub listens its 2 s: all at once, beside the other commands (run in order).
    watching = [command for command in commands if command.startswith("mosquitto_sub")]
    with ThreadPoolExecutor(max(1, len(watching))) as pool:
        watched = [pool.submit(run_example, command, env, mqtt_port, http_port) for command in watching]
        ran = [
            (command, run_example(command, env, mqtt_port, http_port))
            for command in commands
            if command not in watching
        ]
        ran += [(command, future.result()) for command, future in zip(watching, watched, strict=True)]
    for command, outcome in ran:
        allowed = (0, 27) if command.startswith("mosquitto_sub") else (0,)  # 27: nothing within -W
        if outcome.returncode not in allowed:
            failures.append(f"{command}\n  exit {outcome.returncode}: {outcome.stdout[-300:]} {outcome.stderr[-300:]}")
        if command.startswith("curl") and "-X POST" in command:
            assert json.loads(outcome.stdout)["status"] == "ok", outcome.stdout
        if command.startswith("mosquitto_rr"):  # the reply: the node's answer to the request
            reply = json.loads(outcome.stdout)
            assert (reply["node_id"], reply["op"], reply["key"]) == (1234567, "get", "on"), outcome.stdout
    assert not failures, "\n".join(failures)
    if document == "README.md":
        # What they did: the outlet switched (the last toggle asked for 1), runs succeeded.
        runs = requests.get(f"{url}/api/runs", timeout=10).json()["runs"]
        wait_until(
            lambda: all(r["state"] == "succeeded" for r in requests.get(f"{url}/api/runs", timeout=10).json()["runs"]),
            30,
            "the README's runs to succeed",
        )
        assert {r["script"] for r in runs} >= {"gettemp", "toggle"}


def test_the_example_helpers_read_what_they_should():
    commands = example_commands("text\n\n    mosquitto_pub -t 'a' \\\n      -m 'b'   # why\n    ls\n")
    assert commands == ["mosquitto_pub -t 'a'  -m 'b'   # why"]
    assert localised(commands[0], 11, 22) == ["mosquitto_pub", "-p", "11", "-t", "a", "-m", "b"]
    assert localised("curl -s 127.0.0.1:5000/api/nodes", 11, 22) == ["curl", "-s", "127.0.0.1:22/api/nodes"]
    assert Path(PROJECT_DIR / ".venv/bin/python").exists()
