"""The guard: the headline figures, each against a baseline run in the same run, compared with
bench/baseline.json. Run it before a change to a hot path lands (about 5 minutes here):

    .venv/bin/python bench/guard.py             # exits 1 when a figure regressed past its tolerance
    .venv/bin/python bench/guard.py --update    # write bench/baseline.json (on purpose, in its own commit)

Each figure is a ratio to something measured in the same run on the same machine, so a busier or
slower machine moves both sides: bridge ingest / a bare recvfrom loop; a run's first output / a
bare interpreter start; beacon -> websocket event p99 at 200 clients / the same beacon at a plain
MQTT subscriber; recorder entries/s / what mosquitto_sub receives; the whole server's PSS (1 000
nodes) / a bare interpreter's; and, against their goals (nothing runs beside them to compare),
disk writes an hour idle with 20 nodes and per run of five lines. The server runs on a fresh
venv of requirements.txt, as a user installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_api, bench_bridge, bench_disk, bench_live, bench_memory, bench_runner  # noqa: E402
from bench.common import free_port, percentile  # noqa: E402
from hacer.topics import Topics  # noqa: E402
from ops.broker import BrokerProcess  # noqa: E402

BASELINE = Path(__file__).resolve().parent / "baseline.json"


@dataclass
class Figure:
    """One guarded figure: its value, whether more is better, how far it may move, and what it means."""

    name: str
    value: float
    higher_is_better: bool
    tolerance: float  # a fraction of the baseline's value
    unit: str
    meaning: str


def ingest(work: Path) -> Figure:
    bare, _ = bench_bridge.bare_loop(100_000, 5_000)
    broker = BrokerProcess(work / "broker-ingest", [free_port()])
    broker.start()
    try:
        rate, _, _ = bench_bridge.bridge_ingest(broker, 100_000, 5_000)
    finally:
        broker.stop()
    meaning = f"{rate:,.0f} beacons/s, bare {bare:,.0f}"
    return Figure("bridge_ingest_vs_bare_loop", rate / bare, True, 0.25, "x", meaning)


def first_output(work: Path, samples: int = 100) -> Figure:
    work = work / "runner"
    scripts = work / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "first.py").write_text("print('hi')\n")
    broker = BrokerProcess(work / "broker", [free_port()])
    broker.start()
    runner_id = f"guard-{uuid.uuid4().hex[:6]}"
    env = bench_runner.runner_env(broker.url, scripts, work, runner_id)
    hacer = bench_runner.Hacer(broker.url, runner_id)
    runner = bench_runner.manage("runner", env, work / "runner.log")
    try:
        if not hacer.online.wait(30):
            raise RuntimeError("the runner did not come online")
        for _ in range(3):
            hacer.run("first")
        outputs = [hacer.run("first")[1] for _ in range(samples)]
    finally:
        runner.terminate()
        runner.wait(15)
        hacer.bus.stop()
        broker.stop()
    bare = statistics.median(bench_runner.bare_start(samples))
    output = statistics.median(outputs)
    return Figure(
        "first_output_vs_bare_start",
        output / bare,
        False,
        0.25,
        "x",
        f"request -> first output p50 {output:.1f} ms (p99 {percentile(outputs, 0.99):.1f}), bare start {bare:.1f} ms",
    )


def live(work: Path) -> Figure:
    with bench_live.LiveServer(work / "live", 1000) as server:
        figures = bench_live.scenario(server.url, server.broker, server.discovery_port, 200, 4, 1.0)
    return Figure(
        "websocket_p99_vs_mqtt_p50",
        figures.p99_ms / figures.mqtt_p50_ms,
        False,
        0.6,  # the noisiest: 800 client connections and 4 pollers on the same 2 cores
        "x",
        f"beacon -> event at 200 clients p99 {figures.p99_ms:.1f} ms (goal < 20), "
        f"MQTT p50 {figures.mqtt_p50_ms:.2f} ms, {figures.events_per_node:.2f} events a new node, "
        f"clients' CPU {figures.client_cpu_s:.2f} s",
    )


def recorder(work: Path, count: int = 20_000) -> Figure:
    rates = []
    topics = Topics("hacer")
    for measure in (bench_api.mosquitto_sub_rate, bench_api.feed_a_recorder):
        broker = BrokerProcess(work / f"broker-{measure.__name__}", [free_port()])
        broker.start()
        try:
            rates.append(measure(broker, work / measure.__name__, topics, count))
        finally:
            broker.stop()
    bare, (rate, lost) = rates
    if lost:
        raise RuntimeError(f"the recorder lost {lost} entries")
    meaning = f"{rate:,.0f} entries/s, mosquitto_sub {bare:,.0f}"
    return Figure("recorder_vs_mosquitto_sub", rate / bare, True, 0.25, "x", meaning)


def memory(python: str) -> Figure:
    by_part, bare_kb = bench_memory.server_pss(python, 1000, 10.0)
    total = bench_memory.server_total_kb(by_part)
    return Figure(
        "server_pss_vs_bare_interpreter",
        total / bare_kb,
        False,
        0.1,
        "x",
        f"runserver with 1 000 nodes {total / 1024:.1f} MB PSS (goal <= 120), "
        f"a bare interpreter {bare_kb / 1024:.1f} MB",
    )


def disk(python: str) -> list[Figure]:
    figures = bench_disk.measure(python, 20, 10.0, 60.0, 20)
    return [
        Figure(
            "idle_writes_mb_per_hour",
            figures.idle_mb_per_hour,
            False,
            0.3,
            "MB/h",
            f"idle with 20 nodes (goal <= {bench_disk.IDLE_GOAL_MB_H:.0f}): "
            + ", ".join(f"{part} {rate:.1f}" for part, rate in sorted(figures.idle_by_part.items()) if rate >= 0.05),
        ),
        Figure(
            "writes_per_run_kb",
            figures.kb_per_run,
            False,
            0.3,
            "KB",
            f"a run of five lines (goal <= {bench_disk.RUN_GOAL_KB:.0f}); the database keeps "
            f"{figures.database_kb_per_run:.2f} KB of it",
        ),
    ]


def regressed(figure: Figure, baseline: dict[str, float]) -> bool:
    """Whether `figure` moved the wrong way past its tolerance."""
    before = baseline.get(figure.name)
    if before is None:
        return False
    if figure.higher_is_better:
        return figure.value < before * (1 - figure.tolerance)
    return figure.value > before * (1 + figure.tolerance)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write the figures to bench/baseline.json")
    args = parser.parse_args()
    began = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="hacer-guard-") as tmp:
        work = Path(tmp)
        python = bench_memory.user_install(work / "venv")
        steps: list[Callable[[], Figure | list[Figure]]] = [
            lambda: ingest(work),
            lambda: first_output(work),
            lambda: live(work),
            lambda: recorder(work),
            lambda: memory(python),
            lambda: disk(python),
        ]
        for step in steps:
            outcome = step()
            for figure in outcome if isinstance(outcome, list) else [outcome]:
                figures.append(figure)
                print(f"{figure.name:<34} {figure.value:9.2f} {figure.unit:<5} {figure.meaning}", flush=True)
    saved = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"figures": {}}
    failed = [f for f in figures if regressed(f, saved["figures"])]
    print(f"{len(figures)} figures in {time.monotonic() - began:.0f} s on {machine()}, {date.today()}")
    if args.update:
        BASELINE.write_text(
            json.dumps(
                {
                    "date": date.today().isoformat(),
                    "machine": machine(),
                    "figures": {f.name: round(f.value, 3) for f in figures},
                    "tolerance": {f.name: f.tolerance for f in figures},
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {BASELINE}")
        return
    for figure in failed:
        before = saved["figures"][figure.name]
        print(f"REGRESSED {figure.name}: {figure.value:.2f} against {before:.2f} (tolerance {figure.tolerance:.0%})")
    if not saved["figures"]:
        print("no baseline yet: run with --update")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
