"""A LAN host whose beacons claim another node's name or id, against the whole system and the 2015 scripts."""

from __future__ import annotations

import json
import socket

import pytest
from test_api import module_postgres_url, node_of, system, wait_run  # noqa: F401 - the whole-system fixtures

from hacer import runstates
from scripting import AmbiguousNode, Hub

from support import wait_until


def beacon(system, node_id: int, ip: str, **fields) -> None:
    body = {"id": node_id, "type": "toggle", **fields}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ip, 0))
        sock.sendto(json.dumps(body).encode(), ("127.0.0.1", int(system.env["HACER_DISCOVERY_PORT"])))


def node_json(system, node_id: int) -> dict:
    return wait_until(lambda: (a := system.get(f"/api/nodes/id/{node_id}")).status_code == 200 and a.json(), 20)


def impostor_port(system) -> socket.socket:
    """A TCP listener where the impostor would take commands: on its own loopback address."""
    listener = socket.create_server(("127.0.0.99", int(system.env["HACER_NODE_PORT"])))
    listener.settimeout(0)
    return listener


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_a_beacon_cannot_borrow_a_nodes_id_as_its_name(system):  # noqa: F811
    outlet = node_of(system, "toggle")
    impostor = outlet.id + 10_000
    listener = impostor_port(system)
    try:
        beacon(system, impostor, "127.0.0.99", name=str(outlet.id))
        assert node_json(system, impostor)["name"] == ""  # refused: digits read as an id
        answer = system.post("/api/scripts/exec/name/toggle", data=json.dumps({"params": [str(outlet.id), "1"]}))
        run = wait_run(system, answer.json()["log_thread_id"])
        entries = system.get(f"/api/logs/script/thread_id/{answer.json()['log_thread_id']}").json()["entry_list"]
        assert run["state"] == runstates.SUCCEEDED and outlet.values["on"] == 1, entries
        with pytest.raises(BlockingIOError):
            listener.accept()  # the impostor was never sent anything
        entries = system.get(f"/api/logs/script/thread_id/{answer.json()['log_thread_id']}").json()["entry_list"]
        said = [e["data"] for e in entries if e["entry_type"] == "output"]
        assert said == [f"node '{outlet.id}' is node {outlet.id} (toggle at {outlet.ip})"]
    finally:
        listener.close()


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_a_users_name_wins_over_a_beacons_and_an_id_is_no_name(system):  # noqa: F811
    outlet, light = node_of(system, "toggle"), node_of(system, "light_rgb")
    claimer = outlet.id + 20_000
    beacon(system, claimer, "127.0.0.98", name="hall")
    wait_until(lambda: node_json(system, claimer)["name"] == "hall", 20, "the beacon's free name taken")
    renamed = system.post(f"/api/nodes/id/{outlet.id}", data=json.dumps({"name": "hall"}))
    assert renamed.status_code == 200 and node_json(system, outlet.id)["name"] == "hall"
    assert node_json(system, claimer)["name"] == ""
    # A user's name is kept: another user's rename to it is refused, and so is another node's id.
    assert system.post(f"/api/nodes/id/{light.id}", data=json.dumps({"name": "hall"})).status_code == 409
    as_id = system.post(f"/api/nodes/id/{light.id}", data=json.dumps({"name": str(outlet.id)}))
    assert as_id.status_code == 400 and "node id" in as_id.json()["message"]
    beacon(system, claimer, "127.0.0.98", name="hall")  # claiming it again changes nothing
    answer = system.post("/api/scripts/exec/name/toggle", data=json.dumps({"params": ["hall", "0"]}))
    assert wait_run(system, answer.json()["log_thread_id"])["state"] == runstates.SUCCEEDED
    assert outlet.values["on"] == 0 and node_json(system, claimer)["name"] == ""


def test_a_lookup_that_could_mean_two_nodes_fails_rather_than_guess():
    from hacer.messages import NodeMeta

    hub = Hub()
    # A name of digits given before they were refused, and a node whose id it is.
    hub._meta, hub._presence = {5: NodeMeta(5, "7", "toggle"), 7: NodeMeta(7, "", "toggle")}, {}
    with pytest.raises(AmbiguousNode, match="node 5 or node 7"):
        hub.node("7")
    assert hub.node("5").id == 5
