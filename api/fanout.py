"""Websocket packets in the threaded api, written by the thread that sends them.

Engine.IO's threading mode queues every packet for a writer thread of the client's: one event
to 200 browsers woke 200 threads, which then queued for the interpreter one by one (beacon ->
event p99 60 ms at 200 clients, against 17 ms written here; bench/README.md, live events). Here
a packet is framed and written at once, without waiting, by whichever thread sends it; what the
client's socket cannot take yet waits in the client's buffer, in order, and the client's writer
thread, woken, writes it out (blocking, within the api's idle timeout). A client whose buffer
passes MAX_PENDING_BYTES is too slow to follow and is disconnected (it catches up when it
reconnects: the events are numbered).

It replaces two things of python-engineio's (pinned in requirements.txt; tests/system/test_api.py's
live-event tests run through it): the server's websocket class, and each such client socket's
`send`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from engineio import packet
from engineio.async_drivers._websocket_wsgi import SimpleWebSocketWSGI
from simple_websocket import ConnectionClosed
from wsproto.events import BytesMessage, TextMessage
from wsproto.utilities import LocalProtocolError

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 1 << 20
WAKE = packet.Packet(packet.NOOP)  # queued to wake the client's writer; never sent
WAKE_ENCODED = WAKE.encode()


class DirectWebSocket(SimpleWebSocketWSGI):
    """engineio's threading websocket, whose client socket's packets are written by their senders."""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.lock = threading.Lock()
        self.pending = bytearray()
        self.held: list[packet.Packet] = []  # sent before the upgrade's handshake ended: framed after it
        self.active = False
        self.flushing = False
        self.engine_socket = self.app.__self__  # whose _websocket_handler self.app is
        with self.lock:
            queue = self.engine_socket.queue
            while not queue.empty():  # what polling had not taken yet goes first (None: it closes)
                queued = queue.get_nowait()
                if queued is None:
                    queue.put(None)
                    break
                self.held.append(queued)
            self.engine_socket.send = self.send_packet
        return super().__call__(environ, start_response)

    def send_packet(self, pkt: packet.Packet) -> None:
        """Frame `pkt` and write what the socket takes now; the rest is left to the client's writer."""
        if not self.engine_socket.check_ping_timeout():
            return
        with self.lock:
            if not self.active:
                self.held.append(pkt)
            elif self.ws.connected:
                self.pending += self._frame(pkt.encode())
                self._write_some()

    def wait(self) -> Any:
        """The next message from the client; the first wait after the handshake starts direct writing."""
        if not self.active and self.engine_socket.upgraded and not self.engine_socket.upgrading:
            with self.lock:
                if self.ws.sock.gettimeout() is None:  # non-blocking underneath, so os.write never waits
                    self.ws.sock.settimeout(self.engine_socket.server.ping_interval + 5)
                self.active = True
                for held in self.held:
                    self.pending += self._frame(held.encode())
                self.held.clear()
                self._write_some()
        return super().wait()

    def send(self, message: Any) -> None:
        """engineio's own writes: the handshake's probe answer, and its writer's wake-ups: what is left, waiting."""
        with self.lock:
            if message != WAKE_ENCODED:  # the wake-up, or the no-op that ends a poll: nothing to tell a websocket
                self.pending += self._frame(message)  # (before the handshake's end, what is held is not here)
            self.flushing = True  # senders only add to pending meanwhile: frames never interleave
        try:
            while True:
                with self.lock:
                    data = bytes(self.pending)
                    self.pending.clear()
                    if not data:
                        self.flushing = False
                        return
                self.ws.sock.sendall(data)  # waits, within the socket's (idle) timeout
        except OSError:
            with self.lock:
                self.pending.clear()
            raise OSError("the websocket client did not take its events") from None

    def close(self) -> None:
        """Close, between two writes; a client already gone (reset, timed out, its own close frame sent)
        has nothing left to be told, which is not an error of the api's."""
        with self.lock:
            try:
                super().close()
            except (OSError, LocalProtocolError, ConnectionClosed) as exc:
                log.debug("websocket client %s gone before its close: %r", self.engine_socket.sid, exc)

    def _frame(self, message: str | bytes) -> bytes:
        event = BytesMessage(data=message) if isinstance(message, bytes) else TextMessage(data=message)
        frame: bytes = self.ws.ws.send(event)
        return frame

    def _write_some(self) -> None:
        """Write what the socket takes without waiting (held: self.lock)."""
        if not self.pending or self.flushing:
            self._bound()
            return
        try:
            written = os.write(self.ws.sock.fileno(), self.pending)
        except BlockingIOError:
            written = 0
        except OSError:  # gone: its reader ends the connection
            self.pending.clear()
            return
        del self.pending[:written]
        if self.pending and self._bound():
            self.flushing = True  # the writer has it now: senders only add to pending, one wake-up
            self.engine_socket.queue.put(WAKE)

    def _bound(self) -> bool:
        """False, and the client disconnected, if it is MAX_PENDING_BYTES behind (held: self.lock)."""
        if len(self.pending) > MAX_PENDING_BYTES:
            log.warning(
                "websocket client %s is %d bytes behind: disconnecting it", self.engine_socket.sid, len(self.pending)
            )
            self.pending.clear()
            try:
                self.ws.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True


def write_directly(socketio: Any) -> None:
    """Make the threaded api's websocket clients' packets written by their senders (module docstring)."""
    socketio.server.eio._async["websocket"] = DirectWebSocket
