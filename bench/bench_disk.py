"""Disk writes as an SD card sees them: `runserver` idle with emulated nodes, then per run.

    .venv/bin/python bench/bench_disk.py                 # 20 nodes, 60 s idle, 20 runs
    .venv/bin/python bench/bench_disk.py --nodes 1000 --idle 120

Starts `manage.py runserver --emulate N` in a folder of its own (bench/bench_memory.py's
RunServer), waits until the N nodes are online and a warm-up has passed, then reads `write_bytes`
of `/proc/<pid>/io` (what a process sent, or dirtied for, the storage layer) of every process in
the tree: over an idle stretch, by part, as MB an hour; then over runs of a script printing five
lines, requested over MQTT one at a time, as KB a run (less the idle rate over the same time).
Baseline in the same run: the bytes a run keeps in the database (its row and log entries). A
script's own process writes nothing itself; processes that end between two readings are not
counted. Goals (issue 28): <= 5 MB an hour idle with 20 nodes, <= 20 KB written per run.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_memory import RunServer, part_of, user_install  # noqa: E402
from bench.bench_runner import Hacer  # noqa: E402

IDLE_GOAL_MB_H, RUN_GOAL_KB = 5.0, 20.0
FIVE_LINES = "for line in range(5):\n    print('line', line)\n"


@dataclass
class DiskFigures:
    """One measurement's outcome."""

    nodes: int
    idle_mb_per_hour: float
    idle_by_part: dict[str, float]  # MB an hour
    kb_per_run: float
    run_by_part: dict[str, float]  # KB a run, less each part's idle rate
    database_kb_per_run: float


def written(pids: list[int]) -> dict[int, int]:
    """write_bytes of each process still there."""
    found = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    found[pid] = int(line.split()[1])
        except OSError:
            pass
    return found


def delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    """What each process wrote between two readings (a new process: all it wrote)."""
    return {pid: count - before.get(pid, 0) for pid, count in after.items()}


def database_bytes_per_run(path: Path, runs: int) -> float:
    """What the runs' rows and log entries hold: their text, and 8 bytes for each number and time."""
    with sqlite3.connect(path) as connection:
        run_bytes = connection.execute(
            "SELECT sum(length(run_id) + length(script) + length(params) + length(state) + length(runner)"
            " + length(requested_by) + length(request) + 6 * 8) FROM run"
        ).fetchone()[0]
        log_bytes = connection.execute(
            "SELECT sum(length(script_name) + length(params) + length(data) + 5 * 8) FROM script_log_entry"
        ).fetchone()[0]
    return ((run_bytes or 0) + (log_bytes or 0)) / runs


def measure(python: str, nodes: int, warm: float, idle: float, runs: int, one_core: bool = False) -> DiskFigures:
    """Idle, then `runs` runs of a five-line script, in one runserver."""
    with tempfile.TemporaryDirectory(prefix="hacer-bench-disk-") as tmp:
        work = Path(tmp)
        scripts = work / "scripts"
        scripts.mkdir()
        (scripts / "five.py").write_text(FIVE_LINES)
        with RunServer(work, python, nodes, env={"HACER_SCRIPTS_DIR": str(scripts)}, one_core=one_core) as server:
            time.sleep(warm)  # start-up's writes (schema, the first snapshot) are not idle's
            before, start = written(server.processes()), time.monotonic()
            time.sleep(idle)
            idle_writes, elapsed = delta(before, written(server.processes())), time.monotonic() - start
            by_part: dict[str, float] = {}
            names = {pid: part_of(pid) for pid in idle_writes}
            for pid, count in idle_writes.items():
                by_part[names[pid]] = by_part.get(names[pid], 0.0) + count / elapsed * 3600 / 1e6
            hacer = Hacer(server.env["HACER_MQTT_URL"], None)
            hacer.run("five")  # the runner's fork server and the recorder's first run are start-up
            before, start = written(server.processes()), time.monotonic()
            for _ in range(runs):
                hacer.run("five")
            time.sleep(3.0)  # the recorder's commit and mosquitto's save after the last exit
            run_writes, elapsed = delta(before, written(server.processes())), time.monotonic() - start
            hacer.bus.stop()
        idle_rate = sum(by_part.values()) * 1e6 / 3600  # bytes a second
        per_run = max(0.0, sum(run_writes.values()) - idle_rate * elapsed) / runs
        run_by_part: dict[str, float] = {}
        for pid, count in run_writes.items():
            part = names.get(pid) or part_of(pid)
            run_by_part[part] = run_by_part.get(part, 0.0) + count / runs / 1024
        for part, rate in by_part.items():
            run_by_part[part] = max(0.0, run_by_part.get(part, 0.0) - rate * 1e6 / 3600 * elapsed / runs / 1024)
        return DiskFigures(
            nodes=nodes,
            idle_mb_per_hour=sum(by_part.values()),
            idle_by_part=by_part,
            kb_per_run=per_run / 1024,
            run_by_part=run_by_part,
            database_kb_per_run=database_bytes_per_run(work / "hacer.db", runs + 1) / 1024,
        )


def report(figures: DiskFigures) -> None:
    print(f"runserver with {figures.nodes} emulated nodes, idle: {figures.idle_mb_per_hour:.1f} MB an hour written")
    print(f"   (goal <= {IDLE_GOAL_MB_H:.0f} MB an hour with 20 nodes)")
    for part, rate in sorted(figures.idle_by_part.items(), key=lambda item: -item[1]):
        if rate >= 0.05:
            print(f"   {part:<28} {rate:8.1f} MB/h")
    print(
        f"a run of five lines: {figures.kb_per_run:.1f} KB written (goal <= {RUN_GOAL_KB:.0f} KB); the database "
        f"keeps {figures.database_kb_per_run:.2f} KB of it: {figures.kb_per_run / figures.database_kb_per_run:.0f}x"
    )
    for part, size in sorted(figures.run_by_part.items(), key=lambda item: -item[1]):
        if size >= 0.05:
            print(f"   {part:<28} {size:8.1f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--warm", type=float, default=20.0, help="seconds after the nodes are online (20)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measured (60)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--python", help="run the server with this interpreter instead of a fresh user's venv")
    parser.add_argument("--one-core", action="store_true", help="the whole server pinned to core 0 (taskset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as venv:
        python = args.python or user_install(Path(venv) / "venv")
        report(measure(python, args.nodes, args.warm, args.idle, args.runs, args.one_core))


if __name__ == "__main__":
    main()
