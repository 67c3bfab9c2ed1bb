"""Runner benchmarks, each printed against a baseline measured in the same run.

    .venv/bin/python bench/bench_runner.py            # about a minute
    .venv/bin/python bench/bench_runner.py --quick

1. dispatch: run request published -> `launch` entry seen, and -> the script's first output
   line seen by a subscriber, against a bare `python -c pass` start (and a bare child's first
   stdout line) on the same machine. Goal: first output within 1.3x the bare start + 10 ms.
2. log throughput: a script printing 200 000 lines -> every line seen in order by a
   subscriber; lines per second (goal >= 20 000/s) and the runner's memory (goal: flat, < 100 MB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, percentile  # noqa: E402
from hacer.broker import BrokerProcess  # noqa: E402
from hacer.bus import Bus, Message  # noqa: E402
from hacer.messages import LogEntry, RunnerState, RunRequest  # noqa: E402
from hacer.topics import Topics  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent


def bare_start(samples: int) -> tuple[list[float], list[float]]:
    """`python -c pass` to exit, and a bare child's first stdout line, in ms."""
    exits, first_lines = [], []
    for _ in range(samples):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        exits.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", "print('hi', flush=True)"], stdout=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.readline()
        first_lines.append((time.perf_counter() - started) * 1000)
        child.wait()
    return exits, first_lines


class LogWatch:
    """Collects log entries of runs as they arrive, with arrival times."""

    def __init__(self) -> None:
        self.entries: dict[str, list[tuple[float, LogEntry]]] = {}
        self.changed = threading.Condition()

    def __call__(self, message: Message) -> None:
        entry = LogEntry.from_payload(message.payload)
        with self.changed:
            self.entries.setdefault(entry.run_id, []).append((time.perf_counter(), entry))
            self.changed.notify_all()

    def wait(self, run_id: str, predicate, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for arrived, entry in self.entries.get(run_id, []):
                    if predicate(entry):
                        return arrived
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"run {run_id}: entry not seen within {timeout} s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples = 20 if args.quick else 60
    lines = 50_000 if args.quick else 200_000

    with tempfile.TemporaryDirectory(prefix="hacer-bench-") as tmp:
        work = Path(tmp)
        scripts = work / "scripts"
        scripts.mkdir()
        (scripts / "first.py").write_text("print('hi')\n")
        (scripts / "spam.py").write_text(
            "import sys\nw = sys.stdout.write\nfor i in range(int(sys.argv[1])):\n    w(f'line {i}\\n')\n"
        )
        broker = BrokerProcess(work / "broker", [free_port(), free_port()])
        broker.start()
        topics = Topics("hacer")
        runner_id = f"bench-{uuid.uuid4().hex[:6]}"
        env = {
            **os.environ,
            "HACER_MQTT_URL": broker.url,
            "HACER_SCRIPTS_DIR": str(scripts),
            "HADB_PATH": str(work / "hacer.db"),
            "HACER_RUNNER_ID": runner_id,
            "HACER_STATE_DIR": str(work / "state"),
        }
        watch = LogWatch()
        online = threading.Event()
        bus = Bus(broker.url, topics, "bench-runner-client")
        bus.subscribe(topics.filter("run_log"), watch)
        bus.subscribe(
            topics.build("runner_state", runner_id),
            lambda m: RunnerState.from_payload(m.payload).state == "online" and online.set(),
        )
        bus.start()
        bus.wait_connected(10)
        with open(work / "runner.log", "ab") as runner_log:
            runner = subprocess.Popen(
                [sys.executable, str(PROJECT / "manage.py"), "runner"],
                env=env,
                stdout=runner_log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT,
            )
        try:
            online.wait(20)

            def request(script: str, params: tuple[str, ...] = ()) -> tuple[str, float]:
                run_id = uuid.uuid4().hex
                sent = time.perf_counter()
                bus.publish(topics.build("run_request"), RunRequest(script, params, run_id, "bench").to_payload())
                return run_id, sent

            print(f"1. dispatch, {samples} runs of a script that prints one line")
            exits, bare_first = bare_start(samples)
            to_launch, to_output = [], []
            for _ in range(samples):
                run_id, sent = request("first")
                to_launch.append((watch.wait(run_id, lambda e: e.entry_type == "launch") - sent) * 1000)
                to_output.append((watch.wait(run_id, lambda e: e.entry_type == "output") - sent) * 1000)
                watch.wait(run_id, lambda e: e.entry_type == "exit_status")
            bare = statistics.median(exits)
            print(f"   bare `python -c pass`:            p50 {bare:6.1f} ms  p99 {percentile(exits, 0.99):6.1f} ms")
            print(f"   bare child's first stdout line:   p50 {statistics.median(bare_first):6.1f} ms")
            print(
                f"   request -> launch entry:          p50 {statistics.median(to_launch):6.1f} ms  "
                f"p99 {percentile(to_launch, 0.99):6.1f} ms"
            )
            print(
                f"   request -> first output line:     p50 {statistics.median(to_output):6.1f} ms  "
                f"p99 {percentile(to_output, 0.99):6.1f} ms"
            )
            goal = 1.3 * bare + 10
            print(
                f"   ratio first output / bare start: {statistics.median(to_output) / bare:.2f}   "
                f"(goal p50 <= 1.3 x {bare:.1f} + 10 = {goal:.1f} ms)"
            )

            print(f"2. log throughput, one script printing {lines} lines")
            idle = rss_mb(runner.pid)
            peak = idle
            run_id, sent = request("spam", (str(lines),))
            done = threading.Event()

            def sample_memory() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_mb(runner.pid))
                    done.wait(0.05)

            sampler = threading.Thread(target=sample_memory)
            sampler.start()
            finished = watch.wait(run_id, lambda e: e.entry_type == "exit_status", timeout=300)
            done.set()
            sampler.join()
            first = watch.wait(run_id, lambda e: e.entry_type == "output")
            seen = [line for _, e in watch.entries[run_id] if e.entry_type == "output" for line in e.data.split("\n")]
            entries = [e for _, e in watch.entries[run_id]]
            in_order = seen == [f"line {i}" for i in range(lines)]
            gapless = [e.seq for e in entries] == list(range(1, len(entries) + 1))
            rate = len(seen) / (finished - first)
            print(f"   {len(seen)} lines in {len(entries)} entries, in order: {in_order}, seq without gaps: {gapless}")
            print(f"   {rate:,.0f} lines/s from first output to exit status (goal >= 20 000/s)")
            print(f"   runner memory: idle {idle:.1f} MB, peak {peak:.1f} MB (goal flat, < 100 MB)")
        finally:
            runner.terminate()
            runner.wait()
            bus.stop()
            broker.stop()


if __name__ == "__main__":
    main()
