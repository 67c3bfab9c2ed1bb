"""A power cut as the disk sees it: of what the api wrote, only what it had synced is kept.

A SIGKILL leaves the page cache, so it cannot show this. Here the api runs under strace, which
records every write and sync of its files; the database is then rebuilt from a copy taken before
the api started, with only the writes a later sync of the same file covered: the disk after a
power cut at the moment the api was killed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from hacer.models import Database
from hacer.parentdeath import child_env
from hacer.settings import PROJECT_DIR
from ops.broker import port_answers

from support import free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

WRITE = re.compile(r'^(\d+) +pwrite64\(\d+<([^>]*)>, "((?:\\x[0-9a-f]{2})*)", (\d+), (\d+)')
SYNC = re.compile(r"^(\d+) +(?:fdatasync|fsync)\(\d+<([^>]*)>(.*)$")
RESUMED_SYNC = re.compile(r"^(\d+) +<\.\.\. (?:fdatasync|fsync) resumed>\) += 0")


def synced_disk(trace: Path, before: dict[Path, Path]) -> None:
    """Apply to each copy in `before` (file -> copy) the writes that a later sync of the file covered."""
    pending: dict[str, list[tuple[int, bytes]]] = {}
    unfinished_sync: dict[str, str] = {}  # thread -> file of a sync not returned yet
    copies = {str(path): copy for path, copy in before.items()}

    def unhex(text: str) -> bytes:  # strace -xx writes every byte as \xNN, paths too
        return bytes.fromhex(text.replace("\\x", ""))

    def synced(name: str) -> None:
        if name not in copies:
            return
        copy = copies[name]
        with open(copy, "r+b" if copy.exists() else "w+b") as out:
            for offset, data in pending.pop(name, []):
                out.seek(offset)
                out.write(data)

    for line in trace.read_text().splitlines():
        if match := WRITE.match(line):
            _, name, hexdata, _, offset = match.groups()
            pending.setdefault(unhex(name).decode(), []).append((int(offset), unhex(hexdata)))
        elif match := SYNC.match(line):
            thread, name, rest = match.groups()
            if "unfinished" in rest:
                unfinished_sync[thread] = unhex(name).decode()
            elif rest.startswith(") = 0"):
                synced(unhex(name).decode())
        elif (match := RESUMED_SYNC.match(line)) and match.group(1) in unfinished_sync:
            synced(unfinished_sync.pop(match.group(1)))


def test_a_run_the_api_answered_for_is_in_the_database_after_a_power_cut(broker, tmp_path):
    database = tmp_path / "hacer.db"
    initial = Database(f"sqlite:///{database}")
    initial.init()
    initial.engine.dispose()  # the last connection's close moves the WAL into the database file
    os.sync()
    disk = tmp_path / "disk"
    disk.mkdir()
    shutil.copy(database, disk / database.name)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "lamp.py").write_text("print('on')\n")
    port = free_port()
    trace = tmp_path / "api.strace"
    env = child_env(
        {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))},
            "HADB_PATH": str(database),
            "HACER_MQTT_URL": broker.url,
            "HACER_HTTP_PORT": str(port),
            "HACER_SCRIPTS_DIR": str(tmp_path / "scripts"),
            "HACER_STATE_DIR": str(tmp_path / "state"),
        }
    )
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-xx", "-s", "1000000", "-e", "trace=pwrite64,fdatasync,fsync", "-o", str(trace)]
        + [sys.executable, "-m", "api"],
        env=env,
        cwd=PROJECT_DIR,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "api.log", "wb"),  # noqa: SIM115 - lives as long as the child
    )
    try:
        wait_until(lambda: port_answers("127.0.0.1", port), 60, "the api under strace")
        run_id = uuid.uuid4().hex
        answer = requests.post(
            f"http://127.0.0.1:{port}/api/scripts/exec/name/lamp", json={"params": [], "run_id": run_id}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        api_pid = int(Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()[0])
        os.kill(api_pid, signal.SIGKILL)  # the power goes: strace writes out what it saw and ends
        assert tracer.wait(30) is not None
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(10)
    synced_disk(trace, {database: disk / database.name, Path(f"{database}-wal"): disk / f"{database.name}-wal"})
    with sqlite3.connect(disk / database.name) as after_the_cut:
        found = after_the_cut.execute("SELECT script, state FROM run WHERE run_id = ?", (run_id,)).fetchall()
    assert found == [("lamp", "queued")]
