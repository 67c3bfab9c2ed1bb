"""The command relay: carries set/get commands to nodes over TCP and reports every outcome.

One asyncio loop (its own thread) holds one connection and one queue per node, because the
ESP8266 firmware serves at most four clients and answers one request at a time; a slow or dead
node only delays its own queue. Every command ends in exactly one CommandResult: a reply, a
timeout, a refused connection, an undecodable reply, a full queue or an unknown node.

The bridge's own reads (polls) share the node's connection, so they never take one of its four
clients, and wait behind every command queued: a command waits at most for one poll exchange.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from hacer.messages import CommandResult, bus_time
from hacer.nodewire import Reply, ReplyDecoder, Value, WireError, encode_get, encode_set

log = logging.getLogger(__name__)

QUEUE_LIMIT = 256
IDLE_CLOSE_SECONDS = 5.0
# A raw error text has no end marker: it ends when the node pauses this long.
RAW_ERROR_PAUSE = 0.05


@dataclass(frozen=True)
class Command:
    """One node command and where its answer goes."""

    node_id: int
    op: Literal["set", "get"]
    key: str
    value: Value | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    poll: bool = False  # the bridge's own read of a value, not a client's command

    @property
    def correlation_text(self) -> str | None:
        """The MQTT 5 correlation data as the result's `correlation` text."""
        return correlation_text(self.correlation)


def correlation_text(correlation: bytes | None) -> str | None:
    """Return MQTT 5 correlation data as a result's `correlation` text."""
    return None if correlation is None else correlation.decode(errors="backslashreplace")


Resolver = Callable[[int], "tuple[str, int] | None"]
ResultSink = Callable[[CommandResult, Command], None]


class CommandRelay:
    """Per-node queues and connections in one asyncio loop; see the module docstring."""

    def __init__(
        self, resolve: Resolver, on_result: ResultSink, timeout: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._resolve = resolve
        self._on_result = on_result
        self._timeout = timeout
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._channels: dict[int, _NodeChannel] = {}
        self._order = itertools.count()
        self.counts: Counter[str] = Counter()
        self.poll_counts: Counter[str] = Counter()

    def start(self) -> None:
        """Start the relay's event loop thread."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.call_soon(ready.set)
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="command-relay", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        """Close every connection and stop the loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            channels = list(self._channels.values())
            for channel in channels:
                await channel.close()
            await asyncio.gather(*(c.worker for c in channels if c.worker), return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(5)
        self._loop = self._thread = None

    def submit(self, command: Command) -> None:
        """Queue a command (from any thread); its result is reported whatever happens."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("command relay is not started")
        loop.call_soon_threadsafe(self._enqueue, command)

    def poll(self, polls: list[tuple[int, tuple[str, ...]]], over: float = 0.0) -> None:
        """Read each (node, keys) behind its commands, unless a poll of it is still queued; spread over `over` seconds.

        Due together, a second's polls (hundreds, with many nodes) went into the loop at once, and
        a command that came then waited behind them all: the commands' p99 was 1.4x polling off.
        """
        loop = self._loop
        if loop is not None and polls:
            loop.call_soon_threadsafe(self._spread_polls, polls, over)

    # --- inside the loop --------------------------------------------------------------------

    def _channel(self, node_id: int) -> _NodeChannel:
        channel = self._channels.get(node_id)
        if channel is None or channel.closed:
            channel = _NodeChannel(self, node_id)
            self._channels[node_id] = channel
        return channel

    def _enqueue(self, command: Command) -> None:
        address = self._resolve(command.node_id)
        if address is None:
            self._report(command, ok=False, error="unknown node", reason="unknown_node")
            return
        channel = self._channel(command.node_id)
        if channel.queue.qsize() - channel.polls_queued >= QUEUE_LIMIT:
            self._report(
                command, ok=False, error=f"more than {QUEUE_LIMIT} commands queued for this node", reason="busy"
            )
            return
        channel.queue.put_nowait((0, next(self._order), command))
        channel.ensure_worker()

    def _spread_polls(self, polls: list[tuple[int, tuple[str, ...]]], over: float) -> None:
        loop = asyncio.get_running_loop()
        step = over / len(polls)
        for index, (node_id, keys) in enumerate(polls):
            loop.call_later(index * step, self._enqueue_poll, node_id, keys)

    def _enqueue_poll(self, node_id: int, keys: tuple[str, ...]) -> None:
        if self._resolve(node_id) is None:
            return
        channel = self._channel(node_id)
        if channel.polls_queued:
            self.poll_counts["skipped"] += 1  # the node is slower than its polling interval
            return
        for key in keys:
            channel.queue.put_nowait((1, next(self._order), Command(node_id, "get", key, poll=True)))
            channel.polls_queued += 1
        channel.ensure_worker()

    def _report(
        self,
        command: Command,
        ok: bool,
        value: Value | None = None,
        raw: str = "",
        error: str | None = None,
        reason: str | None = None,
    ) -> None:
        (self.poll_counts if command.poll else self.counts)["ok" if ok else "failed"] += 1
        result = CommandResult(
            command.node_id,
            command.op,
            command.key,
            ok,
            value,
            raw,
            error,
            command.correlation_text,
            bus_time(self._clock()),
            reason,
        )
        try:
            self._on_result(result, command)
        except Exception:
            log.exception("result of %s %s on node %s could not be published", command.op, command.key, command.node_id)


class _NodeChannel:
    """The queue and the connection of one node."""

    def __init__(self, relay: CommandRelay, node_id: int) -> None:
        self.relay = relay
        self.node_id = node_id
        # (0, order, command) for commands, (1, order, poll) for polls: commands first.
        self.queue: asyncio.PriorityQueue[tuple[int, int, Command]] = asyncio.PriorityQueue()
        self.polls_queued = 0
        self.closed = False
        self.worker: asyncio.Task[None] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._address: tuple[str, int] | None = None
        self._decoder = ReplyDecoder()

    def ensure_worker(self) -> None:
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def close(self) -> None:
        self.closed = True
        if self.worker is not None:
            self.worker.cancel()
        await self._disconnect()

    async def _disconnect(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        self._decoder = ReplyDecoder()
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _work(self) -> None:
        relay = self.relay
        while True:
            try:
                _, _, command = await asyncio.wait_for(self.queue.get(), IDLE_CLOSE_SECONDS)
            except TimeoutError:
                if self.queue.empty():
                    # Closed before the wait for the socket: a command arriving meanwhile gets a new
                    # channel instead of a queue nobody reads any more.
                    self.closed = True
                    if relay._channels.get(self.node_id) is self:
                        del relay._channels[self.node_id]
                    await self._disconnect()
                    return
                continue
            if command.poll:
                self.polls_queued -= 1
            try:
                await self._execute(command)
            except Exception as exc:  # never let one command end the node's queue
                log.exception("command %s %s on node %s failed", command.op, command.key, self.node_id)
                relay._report(command, ok=False, error=f"internal error: {exc}", reason="bad_request")
                await self._disconnect()

    async def _execute(self, command: Command) -> None:
        relay = self.relay
        try:
            if command.op == "set" and command.value is not None:
                request = encode_set(command.key, command.value)
            else:
                request = encode_get(command.key)
        except WireError as exc:
            relay._report(command, ok=False, error=str(exc), reason="bad_request")
            return
        address = relay._resolve(self.node_id)
        if address is None:
            relay._report(command, ok=False, error="unknown node", reason="unknown_node")
            return
        if address != self._address:  # the node moved: the old connection is useless
            await self._disconnect()
            self._address = address
        loop = asyncio.get_running_loop()
        deadline = loop.time() + relay._timeout
        for attempt in (1, 2):
            reused = self._writer is not None
            try:
                reply = await self._exchange(address, request, deadline)
            except TimeoutError:
                await self._disconnect()
                relay._report(command, ok=False, error=f"no reply within {relay._timeout:g} s", reason="timeout")
                return
            except WireError as exc:
                await self._disconnect()
                relay._report(
                    command, ok=False, raw=str(exc)[:200], error=f"undecodable reply: {exc}", reason="bad_reply"
                )
                return
            except (ConnectionError, OSError) as exc:
                await self._disconnect()
                # A kept connection may have been closed by the node while idle: retry once.
                if reused and attempt == 1 and loop.time() < deadline:
                    continue
                relay._report(
                    command,
                    ok=False,
                    error=f"cannot reach {address[0]}:{address[1]}: {exc.strerror or exc.__class__.__name__}",
                    reason="unreachable",
                )
                return
            value = command.value if reply.ok and command.op == "set" else reply.value
            relay._report(
                command,
                ok=reply.ok,
                value=value,
                raw=reply.raw,
                error=None if reply.ok else str(reply.value),
                reason=None if reply.ok else "node_error",
            )
            return

    async def _exchange(self, address: tuple[str, int], request: bytes, deadline: float) -> Reply:
        """Send one request and read its reply, every wait bounded by `deadline` (loop time).

        Each step has its own bounded wait rather than one wait_for around the whole exchange:
        on Python 3.11 an outer wait_for can lose its timeout while an inner one is pending.
        """
        loop = asyncio.get_running_loop()

        def left() -> float:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return remaining

        if self._writer is None:
            self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(*address), left())
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        await asyncio.wait_for(self._writer.drain(), left())
        decoder = self._decoder
        while True:
            if decoder.raw_error_pending:
                pause = min(RAW_ERROR_PAUSE, left())
                try:
                    data = await asyncio.wait_for(self._reader.read(4096), pause)
                except TimeoutError:
                    if pause < RAW_ERROR_PAUSE:
                        raise
                    reply = decoder.finish()
                    if reply is not None:
                        return reply
                    continue
            else:
                data = await asyncio.wait_for(self._reader.read(4096), left())
            if not data:
                if decoder.pending:
                    reply = decoder.finish()
                    if reply is not None:
                        await self._disconnect()
                        return reply
                raise ConnectionResetError("node closed the connection")
            reply = decoder.feed(data)
            if reply is not None:
                return reply
