"""The UDP beacon listener: receives datagrams, decodes them, counts and drops bad ones.

One thread does recvfrom → decode → tracker, with no queue in between, so a burst waits in
the kernel's receive buffer (sized large) rather than in Python memory. Kernel drops are read
from the socket's own line in /proc/net/udp.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from hacer.nodewire import Beacon, BeaconError, decode_beacon

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 128 * 1024 * 1024
# Read more than the 1024 bytes a beacon may have, so an oversized datagram is seen as such.
READ_BYTES = 2048

# Returns why a beacon was refused (a drop counter reason), or None when it was taken.
BeaconSink = Callable[[Beacon, str, float], "str | None"]


class DropCounter:
    """Counts dropped datagrams by reason and logs them at most once per `log_every` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, log_every: float = 10.0) -> None:
        self.counts: Counter[str] = Counter()
        self._clock = clock
        self._log_every = log_every
        self._last_log = -log_every
        self._unlogged = 0

    def drop(self, reason: str, sender: str, detail: str) -> None:
        """Count one dropped datagram; log it unless a line was written recently."""
        self.counts[reason] += 1
        self._unlogged += 1
        now = self._clock()
        if now - self._last_log >= self._log_every:
            log.warning(
                "dropped %d bad datagram(s); latest from %s: %s: %s (totals %s)",
                self._unlogged,
                sender,
                reason,
                detail,
                dict(self.counts),
            )
            self._last_log = now
            self._unlogged = 0


class BeaconListener:
    """Listens on UDP (host, port) and hands every valid beacon to `sink(beacon, ip, now)`."""

    def __init__(
        self,
        host: str,
        port: int,
        sink: BeaconSink,
        clock: Callable[[], float] = time.time,
        drops: DropCounter | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.datagrams = 0
        self.accepted = 0
        self.drops = drops or DropCounter()
        self._sink = sink
        self._clock = clock
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def bind(self) -> None:
        """Bind the socket; datagrams wait in the kernel's buffer until start()."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_receive_buffer(sock)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock

    def start(self) -> None:
        """Start receiving (binding first if bind() was not called)."""
        if self._sock is None:
            self.bind()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="beacon-listener", daemon=True)
        self._thread.start()
        log.info("listening for beacons on udp %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop receiving and close the socket."""
        sock, thread = self._sock, self._thread
        if sock is None:
            return
        if thread is None:
            sock.close()
            self._sock = None
            return
        self._stopping = True
        # A blocked recvfrom on UDP cannot be interrupted by close(); wake it with a datagram.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        thread.join(5)
        sock.close()
        self._sock = self._thread = None

    def kernel_drops(self) -> int:
        """Return the datagrams the kernel dropped for this socket (receive buffer full)."""
        if self._sock is None:
            return 0
        return socket_drops(self._sock)

    def _run(self) -> None:
        assert self._sock is not None
        recvfrom = self._sock.recvfrom
        clock, sink, decode = self._clock, self._sink, decode_beacon
        while True:
            try:
                data, (ip, _port) = recvfrom(READ_BYTES)
            except OSError:
                if self._stopping:
                    return
                log.exception("beacon socket failed; still listening")
                continue
            if self._stopping:
                return
            self.datagrams += 1
            try:
                beacon = decode(data)
            except BeaconError as exc:
                self.drops.drop(exc.reason, ip, str(exc))
                continue
            try:
                refused = sink(beacon, ip, clock())
            except Exception:  # a bug in the tracker must not end the listener
                self.drops.drop("internal_error", ip, "see the traceback above")
                log.exception("beacon from %s could not be handled", ip)
                continue
            if refused:
                self.drops.drop(refused, ip, f"new node {beacon.id} refused")
            else:
                self.accepted += 1


def _grow_receive_buffer(sock: socket.socket) -> None:
    """Ask for a 128 MiB receive buffer (root may exceed net.core.rmem_max with FORCE)."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
    if force is not None and os.geteuid() == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, RECEIVE_BUFFER_BYTES)
            return
        except OSError:
            pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < RECEIVE_BUFFER_BYTES:
        log.warning("udp receive buffer is %d bytes (raise net.core.rmem_max for bursts)", granted)


def socket_drops(sock: socket.socket) -> int:
    """Read this UDP socket's drop counter from /proc/net/udp (0 where that is unavailable)."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    try:
        with open("/proc/net/udp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if len(fields) > 12 and fields[9] == inode:
                    return int(fields[-1])
    except OSError:
        pass
    return 0
