"""Takes the README's picture of the control app: `runserver --emulate 4` on free ports, in Chromium.

    .venv/bin/python docs/screenshot.py      # writes docs/images/control-app.png (1280 px wide)

Everything runs from a temporary folder with its own broker; nothing of an installed server is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, wait_for  # noqa: E402
from hacer.parentdeath import child_env  # noqa: E402
from hacer.settings import PROJECT_DIR  # noqa: E402
from ops.broker import port_answers  # noqa: E402

PICTURE = PROJECT_DIR / "docs" / "images" / "control-app.png"
NAMES = {"toggle": "hall lamp", "light_rgb": "desk light", "thermostat": "living room", "sensor_temp": "balcony"}


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        http, mqtt = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HACER_", "HADB_"))}
        env.update(
            HACER_MQTT_URL=f"mqtt://127.0.0.1:{mqtt}",
            HACER_HTTP_PORT=str(http),
            HACER_DISCOVERY_PORT=str(free_port()),
            HACER_NODE_PORT=str(free_port()),
            HACER_STATE_DIR=f"{work}/state",
            HADB_PATH=f"{work}/hacer.db",
        )
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--emulate", "4"],
            cwd=PROJECT_DIR,
            env=child_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{http}"
        try:
            wait_for(lambda: port_answers("127.0.0.1", http), 60, "the api")
            wait_for(lambda: len(requests.get(f"{url}/api/nodes", timeout=5).json()["node_list"]) == 4, 60, "the nodes")
            nodes = requests.get(f"{url}/api/nodes", timeout=5).json()["node_list"]
            for node in nodes:
                name = NAMES.get(node["type"], f"node {node['id']}")
                requests.post(f"{url}/api/nodes/id/{node['id']}", json={"name": name}, timeout=5).raise_for_status()
            for script, params in (("gettemp", ["living room"]), ("toggle", ["hall lamp", "1"])):
                answer = requests.post(f"{url}/api/scripts/exec/name/{script}", json={"params": params}, timeout=5)
                answer.raise_for_status()

            def runs_ended() -> bool:
                runs = requests.get(f"{url}/api/runs", timeout=5).json()["runs"]
                return len(runs) == 2 and all(run["state"] == "succeeded" for run in runs)

            wait_for(runs_ended, 30, "the runs to end")
            shoot(url)
        finally:
            server.terminate()
            server.wait(30)
    print(f"wrote {PICTURE}")


def shoot(url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(url + "/")
        expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
        expect(page.locator("#nodes article")).to_have_count(4, timeout=10_000)
        page.locator("#runs tbody tr", has_text="gettemp").get_by_role("button", name="log").click()
        expect(page.locator("#log")).not_to_be_empty(timeout=10_000)
        PICTURE.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(PICTURE))
        browser.close()


if __name__ == "__main__":
    main()
