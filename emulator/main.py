"""`python manage.py emulate`: run emulated nodes until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from emulator.nodes import Emulator, beacon_flood, make_nodes
from hacer.nodewire import NODE_TYPES
from hacer.settings import Settings

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Parse the emulator's options and run it."""
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="manage.py emulate", description=__doc__)
    parser.add_argument("--count", type=int, default=4, help="number of nodes (default 4)")
    parser.add_argument(
        "--types",
        default="toggle,light_rgb,thermostat,sensor_temp",
        help=f"comma-separated types, cycled ({', '.join(NODE_TYPES)})",
    )
    parser.add_argument("--interval", type=float, default=60.0, help="beacon interval in seconds")
    parser.add_argument(
        "--announce-interval", action="store_true", help="send the optional `interval` field (newer firmware)"
    )
    parser.add_argument("--first-ip", default="127.0.0.2", help="address of the first node (127/8)")
    parser.add_argument("--base-id", type=int, default=1000, help="chip id of the first node")
    parser.add_argument(
        "--target", default=f"127.0.0.1:{settings.discovery_port}", help="where beacons go (host:port, loopback)"
    )
    parser.add_argument("--port", type=int, default=settings.node_port, help="TCP port of every node")
    parser.add_argument("--silent", default="", help="comma-separated ids that never beacon")
    parser.add_argument("--mute", default="", help="comma-separated ids that never answer commands")
    parser.add_argument(
        "--flap", type=float, default=0.0, help="every FLAP seconds, the first node goes silent or comes back"
    )
    parser.add_argument(
        "--drift", action="store_true", help="temperatures move a degree now and then, as a room's do (for demos)"
    )
    parser.add_argument(
        "--beacon-only", action="store_true", help="no TCP servers: all ids beacon from --first-ip (for large counts)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())

    if args.beacon_only:
        ids = range(args.base_id, args.base_id + args.count)
        log.info("beacon-only: %d ids from %s every %s s", args.count, args.first_ip, args.interval)
        while not done.is_set():
            beacon_flood(target, ids, 1, args.first_ip, shuffle=False)
            done.wait(args.interval)
        return

    nodes = make_nodes(args.count, types, args.first_ip, args.base_id, args.port, args.interval, args.announce_interval)
    silent = {int(i) for i in args.silent.split(",") if i}
    mute = {int(i) for i in args.mute.split(",") if i}
    for node in nodes:
        node.silent = node.id in silent
        node.mute = node.id in mute
        node.drift = args.drift
    emulator = Emulator(nodes, target)
    emulator.start()
    for node in nodes:
        log.info("node %d (%s) at %s:%d", node.id, node.type, node.ip, node.port)
    while not done.wait(args.flap or None):
        nodes[0].silent = not nodes[0].silent
        log.info("node %d is %s", nodes[0].id, "silent" if nodes[0].silent else "beaconing")
        if not nodes[0].silent:
            emulator.beacon_now(nodes[0])
    emulator.stop()
