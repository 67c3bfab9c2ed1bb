"""Emulated 2015 nodes: beacons over UDP and the TCP command protocol, as the firmware does.

Each node has its own loopback address (127.0.0.2, 127.0.0.3, ...), beacons from it and serves
its TCP port there, so the bridge talks to it exactly as to a real node. Everything runs in one
asyncio loop in its own thread. Beacons only ever go to the configured target (127.0.0.1 by
default): the emulator never broadcasts.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
import threading
from dataclasses import dataclass, field

from hacer.nodewire import Beacon, Value, WireError, decode_request, encode_reply

log = logging.getLogger(__name__)

MAX_CLIENTS = 4  # what the ESP8266 firmware serves at once

INITIAL_VALUES: dict[str, dict[str, Value]] = {
    "toggle": {"on": 0},
    "light_rgb": {"color": 0xFFFFFF, "name": ""},
    "sensor_temp": {"temperature": 21, "name": ""},
    "thermostat": {"temperature": 21, "target": 20, "name": ""},
    "other": {},
}
READ_ONLY = {"temperature"}
# The thermometer firmware of 2015 sent error text raw, without a length prefix.
RAW_ERROR_TYPES = {"sensor_temp", "thermostat"}


@dataclass
class EmulatedNode:
    """One emulated node and its behaviour switches."""

    id: int
    type: str
    ip: str
    port: int = 7777
    interval: float = 60.0
    announce_interval: bool = False  # send the newer optional `interval` field
    silent: bool = False  # stops beaconing
    mute: bool = False  # accepts connections, never answers
    split_replies: bool = False  # send each reply in two writes, 20 ms apart
    drift: bool = False  # a read temperature moves a degree now and then, within 15..28 °C, as a room's does
    values: dict[str, Value] = field(default_factory=dict)
    requests: int = 0

    def __post_init__(self) -> None:
        if not self.values:
            self.values = dict(INITIAL_VALUES.get(self.type, {}))

    def beacon(self) -> bytes:
        """Return this node's beacon datagram."""
        return Beacon(self.id, self.type, interval=self.interval if self.announce_interval else None).to_payload()

    def answer(self, op: str, key: str, value: Value | None) -> bytes:
        """Return the firmware's reply to one command."""
        raw = self.type in RAW_ERROR_TYPES
        if key not in self.values:
            return encode_reply(False, "Key Not Found", raw)
        if op == "get":
            if self.drift and key == "temperature":
                self.values[key] = min(28, max(15, int(self.values[key]) + random.choice((-1, 0, 0, 1))))
            return encode_reply(True, self.values[key])
        if key in READ_ONLY:
            return encode_reply(False, "Key Is Read Only", raw)
        if key == "on":
            if value not in (0, 1):
                return encode_reply(False, "Invalid Value", raw)
            self.values[key] = value
            return encode_reply(True, value)  # the outlet firmware echoes its new state
        assert value is not None
        self.values[key] = value
        return encode_reply(True, "Key Set Success")


class Emulator:
    """Runs emulated nodes (TCP servers and beacons) in a background asyncio loop."""

    def __init__(self, nodes: list[EmulatedNode], target: tuple[str, int], serve_tcp: bool = True) -> None:
        self.nodes = nodes
        self.target = target
        self.serve_tcp = serve_tcp
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: dict[asyncio.Task[object], asyncio.StreamWriter] = {}
        self._clients: dict[int, int] = {}
        self._sock: socket.socket | None = None
        self._wake: dict[int, asyncio.Event] = {}

    def start(self) -> None:
        """Start serving and beaconing; returns when every TCP server listens."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, name="emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        """Stop every node."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop = self._thread = None

    def beacon_now(self, node: EmulatedNode) -> None:
        """Make `node` send a beacon at once (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake[node.id].set)

    def send_beacon(self, node: EmulatedNode) -> None:
        """Send one beacon of `node` from its own address, synchronously."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((node.ip, 0))
            sock.sendto(node.beacon(), self.target)

    async def _open(self) -> None:
        for node in self.nodes:
            if self.serve_tcp:
                server = await asyncio.start_server(
                    functools.partial(self._serve, node), node.ip, node.port, reuse_address=True
                )
                self._servers.append(server)
            self._wake[node.id] = asyncio.Event()
            self._tasks.append(asyncio.get_running_loop().create_task(self._beacon_loop(node)))

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        # Closing ends a connection's handler normally; cancelling it would log from asyncio.
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*self._tasks, *self._connections, return_exceptions=True)

    async def _beacon_loop(self, node: EmulatedNode) -> None:
        # Bound to the node's address, so the bridge sees it as the datagram's source.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((node.ip, 0))
        sock.setblocking(False)
        wake = self._wake[node.id]
        # Nodes start at random phases, as real ones do after a power cut.
        try:
            while True:
                if not node.silent:
                    try:
                        sock.sendto(node.beacon(), self.target)
                    except OSError as exc:
                        log.warning("node %s could not beacon: %s", node.id, exc)
                try:
                    await asyncio.wait_for(wake.wait(), node.interval)
                except TimeoutError:
                    pass
                wake.clear()
        finally:
            sock.close()

    async def _serve(self, node: EmulatedNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.get(node.id, 0) >= MAX_CLIENTS:
            writer.close()  # the firmware refuses a fifth client
            return
        self._clients[node.id] = self._clients.get(node.id, 0) + 1
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        buffer = b""
        try:
            while True:
                data = await reader.read(1024)
                if not data:
                    return
                buffer += data
                while True:
                    try:
                        request = decode_request(buffer)
                    except WireError:
                        writer.write(encode_reply(False, "Invalid Command"))
                        buffer = b""
                        break
                    if request is None:
                        break
                    op, key, value, used = request
                    buffer = buffer[used:]
                    node.requests += 1
                    if node.mute:
                        continue
                    reply = node.answer(op, key, value)
                    if node.split_replies and len(reply) > 2:
                        writer.write(reply[:2])
                        await writer.drain()
                        await asyncio.sleep(0.02)
                        writer.write(reply[2:])
                    else:
                        writer.write(reply)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.pop(task, None)
            self._clients[node.id] -= 1
            writer.close()


def make_nodes(
    count: int,
    types: list[str],
    first_ip: str = "127.0.0.2",
    base_id: int = 1000,
    port: int = 7777,
    interval: float = 60.0,
    announce_interval: bool = False,
    one_address: bool = False,
) -> list[EmulatedNode]:
    """Make `count` nodes cycling through `types`, each on its own loopback address."""
    start = ipaddress.IPv4Address(first_ip)
    nodes = []
    for index in range(count):
        ip = start if one_address else start + index
        if not ip.is_loopback:
            raise ValueError(f"{ip} is not a loopback address: emulated nodes stay on 127/8")
        nodes.append(
            EmulatedNode(base_id + index, types[index % len(types)], str(ip), port, interval, announce_interval)
        )
    return nodes


def beacon_flood(
    target: tuple[str, int], ids: range, rounds: int, source_ip: str = "127.0.0.2", shuffle: bool = True
) -> int:
    """Send beacons for many ids from one address (beacon-only mode); return datagrams sent."""
    payloads = [Beacon(i, "toggle").to_payload() for i in ids]
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source_ip, 0))
        for _ in range(rounds):
            if shuffle:
                random.shuffle(payloads)
            for payload in payloads:
                sock.sendto(payload, target)
                sent += 1
    return sent
