"""How many connections the api holds: in all, per client address, and for how long one may idle.

A connection costs a file descriptor and a green thread (eventlet) or a thread (gunicorn's threaded worker), and
every part of a `runserver` (one process) shares its descriptors: 1 100 idle connections
once left the runner, the bridge and the recorder with none ("Too many open files"). So the api
takes at most `total` connections, at most `per_client` from one address (one host cannot take
them all), and a connection that sends nothing for `idle` seconds is closed (a half-sent request
holds nothing for long). A connection past a limit is closed at once, and counted.
"""

from __future__ import annotations

import logging
import resource
import threading
from typing import Any

log = logging.getLogger(__name__)

RESERVED_FDS = 256  # descriptors kept for the rest of the process: database, broker, nodes, scripts' pipes


class ConnectionLimits:
    """Counts open connections by client address and admits one only within the limits."""

    def __init__(self, total: int, per_client: int, idle: float) -> None:
        self.total = max(1, min(total, usable_fds() - RESERVED_FDS))
        self.per_client = per_client
        self.idle = idle
        self.refused = 0
        self._open: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def admit(self, address: str) -> bool:
        """Take a connection from `address` if the limits allow; release() it when it closes."""
        with self._lock:
            if self._count >= self.total or self._open.get(address, 0) >= self.per_client:
                self.refused += 1
                refused = self.refused
            else:
                self._open[address] = self._open.get(address, 0) + 1
                self._count += 1
                return True
        if refused in (1, 10, 100) or refused % 1000 == 0:  # a flood is logged, not every connection of it
            log.warning("refused a connection from %s: over the api's limits (%d refused so far)", address, refused)
        return False

    def release(self, address: str) -> None:
        """Give back a connection admit() took."""
        with self._lock:
            self._count -= 1
            left = self._open.get(address, 0) - 1
            if left > 0:
                self._open[address] = left
            else:
                self._open.pop(address, None)


def usable_fds() -> int:
    """The process's descriptor limit, raised to its hard limit first (systemd's soft default is 1 024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def limited_pool(limits: ConnectionLimits) -> Any:
    """An eventlet GreenPool for eventlet.wsgi.server that closes connections past `limits`."""
    import eventlet

    class LimitedPool(eventlet.GreenPool):
        def spawn(self, function: Any, connection: list[Any]) -> Any:
            address = connection[0][0]
            if not limits.admit(address):
                return eventlet.spawn(lambda: None)  # eventlet.wsgi closes the socket when it ends
            thread = super().spawn(function, connection)
            thread.link(lambda _: limits.release(address))
            return thread

    return LimitedPool(limits.total + 1)
