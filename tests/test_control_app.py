"""The control app in headless Chromium (Debian's package, driven by Playwright) against the whole system."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from test_api import System, module_postgres_url, system  # noqa: F401 - the whole-system fixtures

from emulator.nodes import EmulatedNode

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


@pytest.fixture
def page(tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is missing: `./setup.sh --dev` installs it (as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context()
        yield context.new_page()
        browser.close()


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_node_appears_is_renamed_and_a_script_runs_live(system, page):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    expect(page.locator("#bridge")).to_have_text("bridge online")

    newcomer = EmulatedNode(
        880000 + uuid.uuid4().int % 10000, "toggle", "127.0.0.120", port=int(system.env["HACER_NODE_PORT"])
    )
    system.emulator.send_beacon(newcomer)
    row = page.locator(f'#nodes tr[data-id="{newcomer.id}"]')
    expect(row.locator("td.state-online")).to_have_text("online", timeout=10_000)

    name = row.locator("input.name")
    name.fill("porch light")
    name.press("Enter")
    name.blur()
    expect(page.locator(f'#nodes tr[data-id="{newcomer.id}"] input.name')).to_have_value("porch light")
    assert system.get("/api/nodes/name/porch light").json()["id"] == newcomer.id

    page.select_option("#script", "test")
    page.fill("#params", "from-the-browser 42")
    page.click("#run-form button")
    expect(page.locator("#log")).to_contain_text("test script running with ['from-the-browser', '42']", timeout=10_000)
    expect(page.locator("#log")).to_contain_text("[exit_status] success")
    expect(page.locator("#runs tbody tr").first).to_contain_text("succeeded", timeout=10_000)
    page.screenshot(path=str(system.work / "control-app.png"))


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_the_page_keeps_working_through_an_api_and_a_broker_restart(system, page):  # noqa: F811
    import signal

    from playwright.sync_api import expect

    from hacer.broker import port_answers

    from conftest import wait_until

    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)

    api = system.processes.pop("api")
    api.send_signal(signal.SIGTERM)
    api.wait(15)
    expect(page.locator("#connection")).to_have_text("reconnecting…", timeout=10_000)
    system.start_part("api")
    wait_until(lambda: port_answers("127.0.0.1", int(system.env["HACER_HTTP_PORT"])), 20, "the api again")
    expect(page.locator("#connection")).to_have_text("live", timeout=20_000)

    system.broker.restart()
    after = EmulatedNode(
        890000 + uuid.uuid4().int % 10000, "light_rgb", "127.0.0.121", port=int(system.env["HACER_NODE_PORT"])
    )
    # the bridge, the api and the page are all back once a new node's presence reaches the page
    row = page.locator(f'#nodes tr[data-id="{after.id}"] td.state-online')
    last_beacon = [0.0]

    def shown() -> int:
        if time.monotonic() - last_beacon[0] > 0.5:  # a beacon every half second, as a node retries
            system.emulator.send_beacon(after)
            last_beacon[0] = time.monotonic()
        return row.count()

    wait_until(shown, 30, "the node on the page")
    expect(row).to_have_text("online")


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_an_automation_is_added_fires_live_and_is_switched_off_and_deleted(system, page):  # noqa: F811
    import json

    from playwright.sync_api import expect

    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    bad = {"name": "bad", "script": "test", "trigger": {"kind": "cron", "cron": "61 * * * *"}}
    page.fill("#automation-definition", json.dumps(bad))
    page.click("#automation-form button")
    expect(page.locator("#automation-error")).to_contain_text("$.trigger.cron")
    every = {"name": "each second", "script": "test", "params": ["auto"], "trigger": {"kind": "every", "seconds": 1}}
    page.fill("#automation-definition", json.dumps(every))
    page.click("#automation-form button")
    row = page.locator("#automations tbody tr", has_text="each second")
    expect(row).to_contain_text("every 1 s", timeout=10_000)
    expect(row.locator("td.last-fire")).not_to_have_text("", timeout=15_000)  # the scheduler's fire, live
    row.get_by_role("button", name="on").click()
    expect(row.get_by_role("button", name="off")).to_be_visible(timeout=10_000)
    automation_id = int(row.get_attribute("data-id"))
    assert system.get(f"/api/automations/{automation_id}").json()["enabled"] is False
    page.on("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="delete").click()
    expect(page.locator("#automations tbody tr", has_text="each second")).to_have_count(0, timeout=10_000)
    assert system.get(f"/api/automations/{automation_id}").status_code == 404
