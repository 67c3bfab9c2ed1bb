"""The whole server's memory as a user runs it: `runserver` with 1 000 nodes beaconing, at rest.

    .venv/bin/python bench/bench_memory.py          # 1 000 emulated nodes, 20 s at rest
    .venv/bin/python bench/bench_memory.py --split  # each part a process of its own

Starts `manage.py runserver --emulate N`, with the Python packages a user has (a venv of
requirements.txt alone, made for the run, as `setup.sh` without `--dev` makes it: test-only
packages change what a library imports, e.g. python-socketio loads redis and kombu when present),
in a folder of its own (its own mosquitto on free
ports, SQLite), waits until the bridge counts N nodes online, lets it rest, then reads the
proportional set size (PSS: shared pages divided among the processes sharing them) of every
process runserver started, by part. The emulator and mosquitto are not hacer's and are shown
apart. Baseline in the same run: a bare interpreter (`python -c` sleeping). Goal: the server's
parts at most 120 MB together (a Raspberry Pi 3 has 1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, one_core_prefix, wait_for  # noqa: E402
from hacer.bus import Bus  # noqa: E402
from hacer.topics import Topics  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
GOAL_MB = 120.0


def pss_kb(pid: int) -> int:
    """A process's PSS in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def part_of(pid: int) -> str:
    """The part a process is: runserver names the parts it forks `hacer-<part>`."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if name.startswith("hacer-"):
        return name.removeprefix("hacer-")
    if "mosquitto" in words[0]:
        return "mosquitto (not hacer's)"
    if any(word.endswith("forkserver.py") for word in words):  # its spare too: forked, it keeps the command line
        return "runner's fork server"
    if "emulate" in words:
        return "emulate"
    return "api" if words[1:3] == ["-m", "api"] else " ".join(words)[:40]  # the api execs `python -m api`


class RunServer:
    """`manage.py runserver --emulate N` in `work` (its own mosquitto on free ports, SQLite), N nodes online."""

    def __init__(
        self,
        work: Path,
        python: str,
        nodes: int,
        *options: str,
        env: dict[str, str] | None = None,
        one_core: bool = False,
    ) -> None:
        self.work, self.python, self.nodes, self.options, self.one_core = work, python, nodes, options, one_core
        self.mqtt = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))},
            "HACER_MQTT_URL": f"mqtt://127.0.0.1:{self.mqtt}",
            "HACER_HTTP_PORT": str(free_port()),
            "HACER_DISCOVERY_HOST": "127.0.0.1",
            "HACER_DISCOVERY_PORT": str(free_port()),
            "HACER_STATE_DIR": str(work / "state"),
            "HADB_PATH": str(work / "hacer.db"),
            **(env or {}),
        }

    def __enter__(self) -> RunServer:
        self.server = subprocess.Popen(
            [
                *one_core_prefix(self.one_core),  # the whole tree, emulated nodes too
                self.python,
                str(PROJECT / "manage.py"),
                "runserver",
                "--emulate",
                str(self.nodes),
                *self.options,
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "runserver.log", "wb"),  # noqa: SIM115 - lives as long as the child
        )
        online = {"n": 0}

        def on_stats(message) -> None:  # noqa: ANN001
            online["n"] = json.loads(message.payload).get("nodes_online", 0)

        try:
            wait_for(lambda: _answers(self.mqtt), 30, "the broker")
            watcher = Bus(f"mqtt://127.0.0.1:{self.mqtt}", Topics(), f"bench-watch-{os.getpid()}")
            watcher.subscribe("hacer/bridge/stats", on_stats)
            watcher.start()
            wait_for(lambda: online["n"] >= self.nodes, 600, f"{self.nodes} nodes online")
            watcher.stop()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.send_signal(signal.SIGINT)
        self.server.wait(60)

    def processes(self) -> list[int]:
        """runserver and every process below it."""
        return [self.server.pid, *descendants(self.server.pid)]


OUTSIDE = {"mosquitto (not hacer's)", "emulate"}


def server_pss(
    python: str, nodes: int, rest: float, *options: str, env: dict[str, str] | None = None, one_core: bool = False
) -> tuple[dict[str, list[int]], int]:
    """PSS in KiB of runserver's processes by part, `rest` s after `nodes` came online; and a bare interpreter's."""
    with tempfile.TemporaryDirectory() as work:
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            with RunServer(Path(work), python, nodes, *options, env=env, one_core=one_core) as server:
                time.sleep(rest)  # at rest: what the server holds, not what start-up briefly took
                by_part: dict[str, list[int]] = {}
                for pid in descendants(server.server.pid):
                    by_part.setdefault(part_of(pid), []).append(pss_kb(pid))
                by_part["runserver"] = [pss_kb(server.server.pid)]
                bare_kb = pss_kb(bare.pid)
        finally:
            bare.kill()
    return by_part, bare_kb


def server_total_kb(by_part: dict[str, list[int]]) -> int:
    """hacer's own processes, without mosquitto and the emulator."""
    return sum(sum(sizes) for part, sizes in by_part.items() if part not in OUTSIDE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rest", type=float, default=20.0, help="seconds at rest before reading (20)")
    parser.add_argument("--split", action="store_true", help="runserver --split: each part a process of its own")
    parser.add_argument("--no-fork-server", action="store_true", help="HACER_RUNNER_FORK_SERVER=0")
    parser.add_argument("--python", help="run the server with this interpreter instead of a fresh user's venv")
    parser.add_argument("--one-core", action="store_true", help="the whole server pinned to core 0 (taskset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as venv:
        python = args.python or user_install(Path(venv) / "venv")
        by_part, bare_kb = server_pss(
            python,
            args.nodes,
            args.rest,
            *(["--split"] if args.split else []),
            env={"HACER_RUNNER_FORK_SERVER": "0" if args.no_fork_server else "1"},
            one_core=args.one_core,
        )
    total = server_total_kb(by_part)
    how = ("runserver --split" if args.split else "runserver") + (", no fork server" if args.no_fork_server else "")
    print(f"{how} with {args.nodes} nodes online, {args.rest:.0f} s at rest: PSS by part")
    for part, sizes in sorted(by_part.items(), key=lambda item: -sum(item[1])):
        mark = "  (not counted)" if part in OUTSIDE else ""
        print(f"  {part:<24} {sum(sizes) / 1024:6.1f} MB  ({len(sizes)} process(es)){mark}")
    print(f"  {'the server, total':<24} {total / 1024:6.1f} MB  (goal <= {GOAL_MB:.0f} MB)")
    print(f"  a bare interpreter: {bare_kb / 1024:.1f} MB; the server is {total / bare_kb:.1f} bare interpreters")


def user_install(venv: Path) -> str:
    """A venv with requirements.txt's packages only; its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(PROJECT / "requirements.txt")],
        check=True,
    )
    return python


def _answers(port: int) -> bool:
    from ops.broker import port_answers

    return port_answers("127.0.0.1", port)


if __name__ == "__main__":
    main()
