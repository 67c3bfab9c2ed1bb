"""The control app in headless Chromium (Debian's package, driven by Playwright) against the whole system."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from test_api import System, module_postgres_url, node_of, system  # noqa: F401 - the whole-system fixtures

from emulator.nodes import EmulatedNode
from hacer.settings import PROJECT_DIR

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


PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 900}


def artifacts() -> Path:
    """Where the tests leave screenshots for people to look at (not committed; HACER_TEST_ARTIFACTS)."""
    folder = Path(os.environ.get("HACER_TEST_ARTIFACTS") or PROJECT_DIR / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is missing: `./setup.sh --dev` installs it (as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    return browser.new_context(viewport=DESKTOP).new_page()


# The api on eventlet, and on threads as runserver serves it (api/threaded.py, api/fanout.py).
@pytest.mark.parametrize("system", ["sqlite", "sqlite-threaded-api"], indirect=True)
def test_node_appears_is_renamed_and_a_script_runs_live(system, page):  # noqa: F811
    from playwright.sync_api import expect

    from support import wait_until

    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    expect(page.locator("#bridge")).to_have_text("bridge online")

    newcomer = EmulatedNode(
        880000 + uuid.uuid4().int % 10000, "toggle", "127.0.0.120", port=int(system.env["HACER_NODE_PORT"])
    )
    system.emulator.send_beacon(newcomer)
    card = page.locator(f'#nodes article[data-id="{newcomer.id}"]')
    expect(card.locator(".presence")).to_have_text("online", timeout=10_000)
    expect(card.locator(".type")).to_have_text(f"toggle · {newcomer.id}")  # an unnamed node shows its id
    expect(page.locator("#run-node")).to_contain_text(f"{newcomer.id} (toggle)")  # and can be picked by it

    # The card shows as soon as the bridge announces the node; it can be renamed once the recorder
    # has it (before that the api answers 404, and the page says so).
    wait_until(lambda: system.get(f"/api/nodes/id/{newcomer.id}").status_code == 200, 10, "the node recorded")
    name = card.locator("input.name")
    name.fill("porch light")
    name.press("Enter")
    name.blur()
    # The rename made its way round: api, meta on the bus, the card redrawn under its new name.
    expect(page.locator(f'#nodes article[data-id="{newcomer.id}"][aria-label="porch light"]')).to_be_visible(
        timeout=10_000
    )
    assert system.get("/api/nodes/name/porch light").json()["id"] == newcomer.id

    page.select_option("#script", "test")
    page.fill("#params", "from-the-browser 42")
    page.click("#run-form button")
    expect(page.locator("#log")).to_contain_text("test script running with ['from-the-browser', '42']", timeout=10_000)
    expect(page.locator("#log")).to_contain_text("[exit_status] success")
    expect(page.locator("#runs tbody tr").first).to_contain_text("succeeded", timeout=10_000)
    page.screenshot(path=str(artifacts() / "control-app-run.png"))


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_the_page_keeps_working_through_an_api_and_a_broker_restart(system, page):  # noqa: F811
    import signal

    from playwright.sync_api import expect

    from ops.broker import port_answers

    from support import wait_until

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
    row = page.locator(f'#nodes article[data-id="{after.id}"] .presence.state-online')
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
    # Its traces: what triggered each fire and the run it made, the run's end arriving live.
    row.get_by_role("button", name="traces of each second").click()
    traces = page.locator("#trace-list li.trace")
    expect(traces.first.locator(".trigger")).to_contain_text("its time came", timeout=10_000)
    expect(traces.first.locator(".step")).to_contain_text("succeeded (exit 0)", timeout=20_000)
    traces.first.get_by_role("button", name="log").click()
    expect(page.locator("#traces")).not_to_be_visible()
    expect(page.locator("#log")).to_contain_text("[exit_status] success", timeout=10_000)
    row.get_by_role("button", name="on", exact=True).click()
    expect(row.get_by_role("button", name="off", exact=True)).to_be_visible(timeout=10_000)
    automation_id = int(row.get_attribute("data-id"))
    assert system.get(f"/api/automations/{automation_id}").json()["enabled"] is False
    page.on("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="delete").click()
    expect(page.locator("#automations tbody tr", has_text="each second")).to_have_count(0, timeout=10_000)
    assert system.get(f"/api/automations/{automation_id}").status_code == 404

    # A definition written past the api's checks (an older hacer, by hand): the scheduler marks it failed,
    # the api says why and the app shows it, in place of its next fire.
    from datetime import UTC, datetime

    from hacer.models import Automation, Database

    from support import wait_until

    end_of_time = {"kind": "at", "at": "9999-12-31T23:59", "tz": "America/Los_Angeles"}
    with Database(f"sqlite:///{system.env['HADB_PATH']}").session() as session:
        session.add(
            Automation(
                name="end of time",
                definition=json.dumps({"name": "end of time", "script": "test", "trigger": end_of_time}),
                changed_at=datetime.now(UTC).replace(tzinfo=None),
            )
        )
        session.commit()
    listed = wait_until(
        lambda: [a for a in system.get("/api/automations").json()["automations"] if a["failure"]], 20, "the failure"
    )
    assert listed[0]["name"] == "end of time" and "$.trigger.at" in listed[0]["failure"]
    page.reload()
    expect(page.locator("#automations tbody tr", has_text="end of time").locator("td.failed")).to_contain_text(
        "failed: bad automation", timeout=10_000
    )


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_each_node_type_has_its_control_and_a_chart_of_what_the_api_returns(system, browser, viewport):  # noqa: F811
    from playwright.sync_api import expect

    from support import wait_until

    page = browser.new_context(viewport=viewport).new_page()
    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    toggle, light, thermostat = (node_of(system, t) for t in ("toggle", "light_rgb", "thermostat"))
    card = {n.type: page.locator(f'#nodes article[data-id="{n.id}"]') for n in (toggle, light, thermostat)}

    # The outlet: a switch that a person flips, and that shows what the node says.
    switch = card["toggle"].get_by_role("switch")
    expect(switch).to_be_visible()
    before = switch.get_attribute("aria-checked") == "true"
    switch.focus()
    page.keyboard.press("Enter")  # keyboard-usable
    want = 0 if before else 1
    expect(card["toggle"].get_by_role("switch")).to_have_attribute(
        "aria-checked", str(not before).lower(), timeout=10_000
    )
    assert toggle.values["on"] == want

    # The light: its colour picked.
    card["light_rgb"].locator("input.color").evaluate(
        "(input) => { input.value = '#ff8000'; input.dispatchEvent(new Event('change')); }"
    )
    wait_until(lambda: light.values["color"] == 0xFF8000, 10, "the light's new colour")
    expect(card["light_rgb"].locator("input.color")).to_have_value("#ff8000")

    # The thermostat: its temperature as read, and a target set.
    thermostat.values["temperature"] = 23 if thermostat.values["temperature"] != 23 else 24
    expect(card["thermostat"].locator(".reading")).to_have_text(
        f"{thermostat.values['temperature']} °C", timeout=15_000
    )
    card["thermostat"].locator("input.target").fill("19")
    card["thermostat"].get_by_role("button", name="set target").click()
    wait_until(lambda: thermostat.values["target"] == 19, 10, "the thermostat's new target")

    # Its history: the chart holds exactly the points the API returns for the same range.
    card["thermostat"].get_by_role("button", name="history").click()
    dialog = page.locator("#history")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="hour").click()
    expect(dialog.get_by_role("button", name="hour")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#history-summary")).to_contain_text("readings", timeout=10_000)
    drawn = page.evaluate("() => ({xs: window.hacerChart.data[0], ys: window.hacerChart.data[1]})")
    answer = system.get(
        f"/api/nodes/id/{thermostat.id}/history",
        params={"key": "temperature", "since": drawn["xs"][0] if drawn["xs"] else time.time() - 3600},
    ).json()
    api_points = [(round(t, 3), v) for t, v in answer["points"]]
    shown = [(round(t, 3), v) for t, v in zip(drawn["xs"], drawn["ys"], strict=True)]
    # Drawn: the value in effect at the range's start (when there is one), the API's points, and
    # the last one held until now.
    start = 1 if answer["before"] else 0
    assert api_points and shown[start : start + len(api_points)] == api_points
    assert len(shown) == start + len(api_points) + 1 and shown[-1][1] == api_points[-1][1]
    assert page.locator("#availability span.state-online").count() >= 1
    page.screenshot(path=str(artifacts() / f"control-app-history-{viewport['width']}.png"))
    dialog.get_by_role("button", name="close").click()

    # Usable on a phone: nothing wider than the screen.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    page.screenshot(path=str(artifacts() / f"control-app-{viewport['width']}.png"), full_page=True)


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_on_a_phone_runs_and_automations_fit_with_their_buttons_in_reach(system, browser):  # noqa: F811
    from playwright.sync_api import expect

    later = datetime.now(UTC) + timedelta(hours=2)  # a window that excludes now: every due time held back
    definition = {
        "name": "phone check",
        "script": "test",
        "params": ["phone"],
        "trigger": {"kind": "every", "seconds": 1},
        "conditions": [
            {"kind": "time", "after": f"{later:%H}:00", "before": f"{later.hour + 1 if later.hour < 23 else 0:02d}:00"}
        ],
    }
    assert system.post("/api/automations", json=definition).status_code in (200, 201)
    assert system.post("/api/scripts/exec/name/test", json={"params": ["phone"]}).status_code == 200
    page = browser.new_context(viewport=PHONE).new_page()
    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    expect(page.locator("#automations tbody tr", has_text="phone check")).to_have_count(1, timeout=10_000)
    expect(page.locator("#runs tbody tr").first).to_be_visible(timeout=10_000)
    # Every button's box at one moment: live events re-render the runs table, so a button read
    # one at a time may be gone between the count and its box.
    boxes = page.eval_on_selector_all(
        "#runs tbody button, #automations tbody button",
        "(buttons) => buttons.map((b) => { const r = b.getBoundingClientRect(); return {x: r.x, width: r.width}; })",
    )
    assert len(boxes) >= 3  # a run's log, an automation's on and delete
    for box in boxes:
        assert box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    assert page.evaluate("() => [...document.querySelectorAll('.scroll')].every((s) => s.scrollWidth <= s.clientWidth)")
    # Each value says which column it is, as the header row is not shown.
    expect(page.locator("#automations tbody tr", has_text="phone check").locator("td").first).to_have_attribute(
        "data-label", "name"
    )
    page.screenshot(path=str(artifacts() / "control-app-tables-390.png"), full_page=True)
    page.locator("#automations tbody tr", has_text="phone check").get_by_role("button", name="traces").click()
    held = page.locator("#trace-list li.trace").first
    expect(held.locator(".held-back")).to_have_text("not run: a condition did not hold", timeout=10_000)
    expect(held.locator(".condition.not-held")).to_contain_text(f"time {later:%H}:00")
    seen = held.locator(".trigger").text_content()
    expect(held.locator(".trigger")).not_to_have_text(seen or "", timeout=10_000)  # the next second's, live
    page.screenshot(path=str(artifacts() / "control-app-traces-390.png"))
    box = page.locator("#traces").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_an_automation_is_built_in_the_form_previewed_corrected_and_saved(system, browser, viewport):  # noqa: F811
    import json

    from playwright.sync_api import expect

    page = browser.new_context(viewport=viewport).new_page()
    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    form = page.locator("#builder")
    name = f"built {viewport['width']}"
    form.get_by_label("name").fill(name)
    form.locator("select[name=script]").select_option("test")
    form.get_by_label("with").fill("built")
    # A time trigger: its next five fires before saving; a bad cron gets the api's message beside it.
    form.get_by_label("cron", exact=True).fill("61 * * * *")
    cron = form.get_by_label("cron", exact=True)
    expect(cron).to_have_attribute("aria-invalid", "true", timeout=10_000)
    expect(form.locator("#error-cron")).to_contain_text("Bad minute - at `$.trigger.cron`")
    assert cron.get_attribute("aria-errormessage") == "error-cron"
    cron.fill("*/5 * * * *")
    expect(form.locator("#builder-preview li")).to_have_count(5, timeout=10_000)
    expect(cron).not_to_have_attribute("aria-invalid", "true")
    # A node's value: the key picker offers the keys the chosen node has.
    form.locator("select[name=kind]").select_option("value")
    thermostat = form.locator("select[name=value-node] option", has_text="thermostat").get_attribute("value")
    form.locator("select[name=value-node]").select_option(thermostat)
    expect(form.locator("select[name=key] option", has_text="temperature")).to_have_count(1, timeout=10_000)
    form.locator("select[name=key]").select_option("temperature")
    form.locator("select[name=compare]").select_option("above")
    form.locator("input[name=threshold]").fill("25")
    form.locator("input[name=value-for]").fill("300")
    expect(page.locator("#automation-definition")).to_have_value(re.compile('"above":25,"for":300'), timeout=10_000)
    expect(form.locator("#builder-preview")).to_contain_text("no set times", timeout=10_000)
    made = json.loads(page.locator("#automation-definition").input_value())
    assert made["trigger"] == {"kind": "value", "node": int(thermostat), "key": "temperature", "above": 25, "for": 300}
    # A node's presence, held 10 minutes: the node picker has the live nodes; the JSON shows what it makes.
    form.locator("select[name=kind]").select_option("presence")
    node = form.locator("select[name=presence-node]")
    expect(node.locator("option")).not_to_have_count(0, timeout=10_000)
    node.select_option(index=0)
    form.locator("select[name=becomes]").select_option("offline")
    form.locator("input[name=presence-for]").fill("600")
    expect(page.locator("#automation-definition")).to_have_value(
        re.compile('"becomes":"offline","for":600'), timeout=10_000
    )
    expect(form.locator("#builder-preview")).to_contain_text("no set times", timeout=10_000)
    made = json.loads(page.locator("#automation-definition").input_value())
    assert made["trigger"] == {"kind": "presence", "node": int(node.input_value()), "becomes": "offline", "for": 600}
    assert made["script"] == "test" and made["params"] == ["built"] and made["name"] == name
    form.get_by_role("button", name="Save").click()
    row = page.locator("#automations tbody tr", has_text=name)
    expect(row).to_have_count(1, timeout=10_000)
    saved = [a for a in system.get("/api/automations").json()["automations"] if a["name"] == name]
    assert saved[0]["definition"]["trigger"]["for"] == 600
    assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    page.screenshot(path=str(artifacts() / f"control-app-builder-{viewport['width']}.png"), full_page=True)
    requests.delete(f"{system.url}/api/automations/{saved[0]['id']}", timeout=10)


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_an_automation_with_steps_is_built_from_pickers_corrected_and_saved(system, browser, viewport):  # noqa: F811
    import json

    from playwright.sync_api import expect

    page = browser.new_context(viewport=viewport).new_page()
    page.goto(system.url + "/")
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    form = page.locator("#builder")
    name = f"stepped {viewport['width']}"
    form.get_by_label("name").fill(name)
    form.locator("select[name=kind]").select_option("every")
    form.locator("select[name=then]").select_option("steps")
    # The first step: set the toggle's `on`, the node from the live node list.
    toggle = form.locator("select[name=step0-node] option", has_text="toggle").first.get_attribute("value")
    form.locator("select[name=step0-node]").select_option(toggle)
    form.locator("input[name=step0-key]").fill("on")  # a key the node has not been read for yet
    form.locator("input[name=step0-value]").fill("1")
    # A wait of 0 s: the api's message goes beside that step's field; corrected, it is previewed.
    form.get_by_role("button", name="add a step").click()
    seconds = form.locator("input[name=step1-seconds]")
    seconds.fill("0")
    expect(seconds).to_have_attribute("aria-invalid", "true", timeout=10_000)
    expect(form.locator("#error-step1-seconds")).to_contain_text("at `$.steps[1].wait`")
    seconds.fill("300")
    expect(form.locator("#builder-preview li")).to_have_count(5, timeout=10_000)
    expect(seconds).not_to_have_attribute("aria-invalid", "true")
    # A run, then a wait for the thermostat's temperature: the step's fields follow its kind.
    form.get_by_role("button", name="add a step").click()
    form.locator("select[name=step2-kind]").select_option("run")
    form.locator("select[name=step2-script]").select_option("test")
    form.locator("input[name=step2-params]").fill("porch")
    form.get_by_role("button", name="add a step").click()
    form.locator("select[name=step3-kind]").select_option("wait_for")
    expect(form.locator("input[name=step3-seconds]")).to_be_hidden()
    thermostat = form.locator("select[name=step3-node] option", has_text="thermostat").first.get_attribute("value")
    form.locator("select[name=step3-node]").select_option(thermostat)
    expect(form.locator("#step3-keys option[value=temperature]")).to_have_count(1, timeout=10_000)  # as read
    form.locator("input[name=step3-key]").fill("temperature")
    form.locator("select[name=step3-compare]").select_option("below")
    form.locator("input[name=step3-value]").fill("18")
    # And a wait for the toggle to be offline: the node picker stays, the key gives way to the state.
    form.get_by_role("button", name="add a step").click()
    form.locator("select[name=step4-kind]").select_option("wait_presence")
    expect(form.locator("input[name=step4-key]")).to_be_hidden()
    form.locator("select[name=step4-node]").select_option(toggle)
    form.locator("select[name=step4-state]").select_option("offline")
    form.locator("input[name=step4-timeout]").fill("60")
    expect(page.locator("#automation-definition")).to_have_value(re.compile('"timeout":60}}]'), timeout=10_000)
    made = json.loads(page.locator("#automation-definition").input_value())
    assert made["steps"] == [
        {"set": {"node": int(toggle), "on": 1}},
        {"wait": 300},
        {"run": {"script": "test", "params": ["porch"]}},
        {
            "wait_for": {
                "condition": {"kind": "value", "node": int(thermostat), "key": "temperature", "below": 18},
                "timeout": 600,
            }
        },
        {"wait_for": {"condition": {"kind": "presence", "node": int(toggle), "state": "offline"}, "timeout": 60}},
    ]
    assert "script" not in made
    assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    form.get_by_role("button", name="Save").click()
    expect(page.locator("#automations tbody tr", has_text=name)).to_have_count(1, timeout=10_000)
    saved = [a for a in system.get("/api/automations").json()["automations"] if a["name"] == name]
    kinds = [list(step) for step in saved[0]["definition"]["steps"]]
    assert kinds == [["set"], ["wait"], ["run"], ["wait_for"], ["wait_for"]]
    # Taken after the save: a full-page screenshot just before it once left the Save button's click nowhere.
    page.screenshot(path=str(artifacts() / f"control-app-steps-{viewport['width']}.png"), full_page=True)
    requests.delete(f"{system.url}/api/automations/{saved[0]['id']}", timeout=10)
