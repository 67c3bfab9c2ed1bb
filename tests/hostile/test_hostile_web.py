"""A web page of another site, in Chromium, against `runserver`'s own broker: no way onto the bus."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from test_control_app import CHROMIUM, CHROMIUM_FLAGS

from hacer.bus import Bus
from hacer.topics import Topics
from ops.broker import CONFIG_DIR, BrokerProcess, port_answers

from support import Watcher, wait_until

FOREIGN_PAGE = "http://evil.example/"
# The page opens MQTT over websockets to each port, connects and publishes a run request.
PROBE = """async (ports) => {
  const bytes = (s) => Array.from(new TextEncoder().encode(s));
  const str = (s) => [0, s.length, ...bytes(s)];
  const connect = [0x10, 14, ...str("MQTT"), 4, 2, 0, 60, ...str("ev")];
  const topic = str("hacer/runs/request"), body = bytes('{"script": "test", "params": ["from a foreign page"]}');
  const publish = [0x30, topic.length + body.length, ...topic, ...body];
  const probe = (port) => new Promise((done) => {
    let opened = false;
    const ws = new WebSocket(`ws://127.0.0.1:${port}/`, ["mqtt"]);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { opened = true; ws.send(new Uint8Array(connect)); };
    ws.onmessage = () => { ws.send(new Uint8Array(publish)); ws.send(new Uint8Array([0xe0, 0])); };
    ws.onclose = () => done({port, opened});
  });
  return Promise.all(ports.map(probe));
}"""


@pytest.fixture
def browser():
    """Chromium without its Local Network Access checks, as older browsers and Firefox are, and as
    Chromium is once the user allows the site: that check is the browser's, not hacer's protection."""
    if CHROMIUM is None:
        pytest.fail("chromium is missing: `./setup.sh --dev` installs it (as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_FLAGS, "--disable-features=LocalNetworkAccessChecks"]
        )
        yield launched
        launched.close()


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket process `pid` listens on, as `ss -ltnp` shows them."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # kernel order per word
                found.append((socket.inet_ntop(family, words), int(port, 16)))
    return found


def mosquitto_of(state_dir: str) -> int:
    """The pid of the mosquitto runserver started with its files in `state_dir`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command[0].endswith(b"mosquitto") and any(state_dir.encode() in word for word in command):
                return int(entry.name)
    raise AssertionError("runserver's mosquitto is not running")


def probe(browser, ports: list[int]) -> list[dict]:
    page = browser.new_page()
    page.route(FOREIGN_PAGE, lambda route: route.fulfill(body="<html><body>a page of another site</body></html>"))
    page.goto(FOREIGN_PAGE)
    try:
        return page.evaluate(PROBE, ports)
    finally:
        page.close()


def test_a_page_of_another_site_cannot_reach_runservers_broker(spawn, hacer_env, browser):
    from bench.common import free_port

    mqtt_port, http_port = free_port(), free_port()
    env = {**hacer_env, "HACER_MQTT_URL": f"mqtt://127.0.0.1:{mqtt_port}", "HACER_HTTP_PORT": str(http_port)}
    spawn(["runserver"], env)
    wait_until(lambda: port_answers("127.0.0.1", http_port), 30, "runserver's api")
    listeners = listening_sockets(mosquitto_of(env["HACER_STATE_DIR"]))
    assert listeners == [("127.0.0.1", mqtt_port)], f"the broker listens on {listeners}"

    bus = Bus(env["HACER_MQTT_URL"], Topics(), "web-probe-watch")
    bus.start()
    try:
        bus.wait_connected(10)
        requests_seen = Watcher(bus, Topics().build("run_request"))
        bus.sync()
        tried = [mqtt_port, http_port, 9001, 8080]  # 9001: where the broker's websockets used to listen
        results = probe(browser, tried)
        assert [r["opened"] for r in results] == [False] * len(tried), results
        bus.sync()  # anything the page published would be here by now
        assert requests_seen.messages == []
    finally:
        bus.stop()


def test_the_probe_does_reach_a_broker_with_a_websockets_listener(browser, tmp_path):
    """The instrument of the test above works: with a websockets listener, the same page runs a request."""
    from bench.common import free_port

    ws_port = free_port()
    template = tmp_path / "with-websockets.conf"
    template.write_text((CONFIG_DIR / "dev.conf").read_text() + "\nlistener 9001\nprotocol websockets\n")
    broker = BrokerProcess(tmp_path / "broker", [free_port(), ws_port], template=template)
    broker.start()
    bus = Bus(broker.url, Topics(), "web-probe-control")
    bus.start()
    try:
        bus.wait_connected(10)
        requests_seen = Watcher(bus, Topics().build("run_request"))
        bus.sync()
        assert probe(browser, [ws_port]) == [{"port": ws_port, "opened": True}]
        requests_seen.wait_for(lambda m: b"from a foreign page" in m.payload)
    finally:
        bus.stop()
        broker.stop()
