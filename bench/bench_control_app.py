"""The control app as a person meets it: first paint, time until it is live and usable, page weight.

    .venv/bin/python bench/bench_control_app.py            # 20 loads at each width
    .venv/bin/python bench/bench_control_app.py --loads 5

Runs `manage.py runserver --emulate 16` (SQLite, its own mosquitto, every part) on free ports,
then loads the control app in Debian's Chromium (driven by Playwright) in a fresh browser
context each time (nothing cached), at 390 px and at 1280 px. Chromium's own performance
timings are read: first contentful paint, DOM interactive, load, and "live" (the websocket
snapshot drawn: every node card shown, the point from which a person can use the page), and the
bytes transferred. The baseline, in the same run and browser: the api's `/api/health` JSON
(a page with no script, the server and browser floor).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, wait_for  # noqa: E402
from ops.broker import port_answers  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NODES = 16
TIMINGS = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  const bytes = [nav, ...performance.getEntriesByType("resource")].reduce((n, e) => n + (e.transferSize || 0), 0);
  return { fcp: paint ? paint.startTime : null, interactive: nav.domInteractive, load: nav.loadEventEnd, bytes };
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is missing: `./setup.sh --dev` installs it")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}
        env.update(
            HACER_MQTT_URL=f"mqtt://127.0.0.1:{free_port()}",
            HACER_HTTP_PORT=str(http_port),
            HACER_DISCOVERY_HOST="127.0.0.1",
            HACER_DISCOVERY_PORT=str(free_port(socket.SOCK_DGRAM)),
            HACER_NODE_PORT=str(free_port()),
            HACER_STATE_DIR=str(Path(folder) / "state"),
            HADB_PATH=str(Path(folder) / "hacer.db"),
        )
        server = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), "runserver", "--emulate", str(NODES)],
            env=env,
            stdout=open(Path(folder) / "runserver.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{http_port}"
        try:
            wait_for(lambda: port_answers("127.0.0.1", http_port), 60, "the api")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
                warm = browser.new_page()
                warm.goto(url + "/")  # the server's first request and the nodes' first beacons
                warm.wait_for_function(f"document.querySelectorAll('#nodes article').length >= {NODES}", timeout=60_000)
                warm.close()
                for width, height in ((390, 844), (1280, 900)):
                    base, page_loads = [], []
                    for _ in range(args.loads):
                        for target, results in ((url + "/api/health", base), (url + "/", page_loads)):
                            page = browser.new_context(viewport={"width": width, "height": height}).new_page()
                            started = time.perf_counter()
                            page.goto(target)
                            live = None
                            if target.endswith("/"):
                                page.wait_for_function(f"document.querySelectorAll('#nodes article').length >= {NODES}")
                                live = page.evaluate("() => performance.now()")
                            timings = page.evaluate(TIMINGS)
                            timings["live"] = live
                            timings["wall"] = (time.perf_counter() - started) * 1000
                            results.append(timings)
                            page.context.close()
                    report(width, base, page_loads)
                browser.close()
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)


def report(width: int, base: list[dict], page: list[dict]) -> None:
    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows if row[key] is not None)

    print(f"\n{width} px, {len(page)} loads each (median; fresh context, nothing cached)")
    print(f"{'':>24} {'control app':>12} {'/api/health':>12} {'ratio':>6}")
    for key, label in (("fcp", "first contentful paint"), ("interactive", "DOM interactive"), ("load", "load event")):
        ours, floor = median(page, key), median(base, key)
        print(f"{label:>24} {ours:>9.1f} ms {floor:>9.1f} ms {ours / floor:>6.1f}")
    print(f"{'live (every node shown)':>24} {median(page, 'live'):>9.1f} ms")
    print(f"{'transferred':>24} {median(page, 'bytes') / 1024:>9.1f} KB {median(base, 'bytes') / 1024:>9.1f} KB")


if __name__ == "__main__":
    main()
