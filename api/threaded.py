"""The api as a part beside the others in one process (runserver's default layout): Flask-SocketIO's
threading mode on gunicorn's threaded worker, run from a thread of this process, no eventlet.

gunicorn's worker is the production server here: its HTTP/1.1 parser and limits (request line,
header count and size), keep-alive handling, a pool of threads and a cap on connections. This
module adds what the api promises in every server (api/limits.py): a limit per client address, an
idle timeout from the connection's first moment, and a bound on a chunked body's lines (gunicorn
reads them whole). gunicorn's arbiter is left out: it would be one more interpreter (about 10 MB),
and runserver's supervisor already restarts a process that dies.

Eventlet cannot serve here: it patches the standard library of the whole process, and the other
parts block in C (SQLite commits, fsync) where every green thread would wait on them.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from io import BytesIO
from typing import Any

from gunicorn.config import Config
from gunicorn.http.body import Body, ChunkedReader
from gunicorn.http.errors import (
    ConfigurationProblem,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import TConn, ThreadWorker

from api.app import create_app, served_host
from api.guard import MAX_LINE, LineTooLong
from api.limits import ConnectionLimits
from hacer.models import Database
from hacer.settings import Settings

log = logging.getLogger("api")


class BoundedChunks(ChunkedReader):
    """gunicorn's chunked-body reader with each chunk-size and trailer line bounded at MAX_LINE."""

    def get_data(self, unreader: Any, buf: BytesIO) -> None:
        """Read more of a line, unless what is buffered already has no line end within MAX_LINE."""
        if buf.tell() > MAX_LINE:  # only called while no line end is buffered
            raise LineTooLong(f"a line of the chunked body is longer than {MAX_LINE} bytes")
        super().get_data(unreader, buf)


class BoundedRequest(Request):
    def set_body_reader(self) -> None:
        super().set_body_reader()
        if isinstance(self.body.reader, ChunkedReader):  # type: ignore[has-type]  # gunicorn is untyped
            self.body = Body(BoundedChunks(self, self.unreader))


class BoundedRequests(RequestParser):
    mesg_class = BoundedRequest


class Connection(TConn):
    """A client's connection: idles out after `limits.idle`, gives its place in the limits back once closed."""

    def __init__(self, cfg: Config, sock: socket.socket, client: Any, server: Any, worker: LimitedWorker) -> None:
        super().__init__(cfg, sock, client, server)
        self.limits = worker.limits
        self.open = worker.open
        self.released = False
        self.open.add(self)
        self.set_timeout()  # one that never sends a byte is closed as an idle kept-alive one is

    def init(self) -> None:
        """Ready to be read in a thread of the pool: blocking, with the idle timeout."""
        if self.parser is None:  # type: ignore[has-type]
            self.parser = BoundedRequests(self.cfg, self.sock, self.client)
        super().init()
        self.sock.settimeout(self.limits.idle)  # a half-sent request holds a thread no longer than this

    def close(self) -> None:
        """Close, and give the connection's place back."""
        if not self.released:
            self.released = True
            self.limits.release(self.client[0])
            self.open.discard(self)
        super().close()


def linger(sock: socket.socket, seconds: float = 1.0, most: int = 1 << 20) -> None:
    """End the answer, then read a little of what the client still sends before the socket closes: closed
    with unread bytes, it would be reset, and a reset can take the answer from the client with it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds / 10)
        deadline, read = time.monotonic() + seconds, 0
        while read < most and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return
            read += len(data)
    except OSError:
        pass


class _GunicornLog:
    """gunicorn's logger interface on the api's logger, without an access log (the eventlet server has none)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(log, name)

    def access(self, *args: Any) -> None:
        """Nothing."""


# gunicorn's refusals that are not a plain 400 (the others are).
PARSE_ERRORS: dict[type[ParseException], tuple[int, str]] = {
    LimitRequestLine: (414, "URI Too Long"),
    LimitRequestHeaders: (431, "Request Header Fields Too Large"),
    UnsupportedTransferCoding: (501, "Not Implemented"),
}


class LimitedWorker(ThreadWorker):
    """gunicorn's threaded worker serving `app` on `listener` within `limits`, from a thread of its own."""

    def __init__(self, app: Any, listener: socket.socket, limits: ConnectionLimits) -> None:
        cfg = Config()
        # A websocket holds a thread as long as it is open: as many threads as connections.
        for name, value in {
            "threads": limits.total,
            "worker_connections": limits.total,
            "keepalive": max(1, round(limits.idle)),
            "graceful_timeout": 5,
        }.items():
            cfg.set(name, value)
        super().__init__(0, os.getppid(), [listener], None, limits.idle, cfg, _GunicornLog())
        self.wsgi = app
        self.limits = limits
        # New connections wait in the keep-alive queue too (accept()), so every connection may.
        self.max_keepalived = limits.total
        self.tpool = ThreadPoolExecutor(limits.total, thread_name_prefix="api")
        self.poller = selectors.DefaultSelector()
        self._lock = threading.RLock()
        self.open: set[Connection] = set()

    def accept(self, server: Any, listener: socket.socket) -> None:
        """Take a connection within the limits (closing the others at once) and wait for its first byte."""
        try:
            sock, client = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        if not self.limits.admit(client[0]):
            sock.close()
            return
        conn = Connection(self.cfg, sock, client, server, self)
        self.nr_conns += 1
        with self._lock:
            self._keep.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn: Connection, client: Any) -> None:
        """Hand a connection that has something to read to the pool, unless its idle time has just ended it."""
        with self._lock:
            self.poller.unregister(client)
            try:
                self._keep.remove(conn)
            except ValueError:
                return
        self.enqueue_req(conn)

    def handle_request(self, req: Any, conn: Connection) -> bool:
        """Serve a request; keep its connection only if the app read the whole body (a refused upload is not
        read to its end: the connection is closed)."""
        keep: bool = super().handle_request(req, conn)
        reader = req.body.reader
        if getattr(reader, "length", 0) == 0 and getattr(reader, "parser", None) is None:
            return keep
        linger(conn.sock)
        return False

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """A request gunicorn could not read answered as JSON, as every api error is (gunicorn writes a
        page of HTML), and a request line past its limit as 414, as eventlet's server answers it."""
        if not isinstance(exc, ParseException) or isinstance(exc, ConfigurationProblem):
            super().handle_error(req, client, addr, exc)  # a server error: gunicorn logs it
            return
        status, reason = PARSE_ERRORS.get(type(exc), (400, "Bad Request"))
        log.warning("refused a request from %s: %s", (addr or ("?",))[0], exc)
        body = json.dumps({"error": reason.lower(), "message": f"{reason}: {exc}"}).encode()
        head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        try:
            client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            return  # the client went: nothing to tell it
        linger(client)  # the rest of a line too long is unread: closed at once, the answer would be reset

    def notify(self) -> None:
        """Nothing: there is no arbiter to tell (gunicorn's touches a file each second)."""

    def is_parent_alive(self) -> bool:
        """Always: this server lives as long as its process (hacer.parentdeath ends that with its parent)."""
        return True

    def stop(self) -> None:
        """Stop accepting, and end every open connection (websockets would otherwise hold their threads)."""
        self.alive = False
        for conn in list(self.open):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ThreadedApi:
    """The api's app and bus, served from a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        Database(settings.database_url).init()
        self.app = create_app({"HACER_SETTINGS": settings, "ASYNC_MODE": "threading"})
        self.worker: LimitedWorker | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect the bus and serve."""
        settings = self.settings
        host = served_host(settings)
        limits = ConnectionLimits(
            settings.http_max_connections, settings.http_max_per_client, settings.http_idle_timeout
        )
        # Bound before the bus says the api is online: from then on its port takes connections.
        listener = socket.create_server((host, settings.http_port), backlog=2048)
        self.app.extensions["hacer"].bus.start()
        self.worker = LimitedWorker(self.app, listener, limits)
        self.thread = threading.Thread(target=self.worker.run, name="api-server", daemon=True)
        self.thread.start()
        log.info("api on http://%s:%d/ (gunicorn's threaded worker)", host, settings.http_port)

    def stop(self) -> None:
        """Stop serving, then the bus."""
        if self.worker is not None and self.thread is not None:
            self.worker.stop()
            self.thread.join(self.worker.cfg.graceful_timeout + 5)
        self.app.extensions["hacer"].bus.stop()
        log.info("api stopped")


def build_api(settings: Settings) -> ThreadedApi:
    """The api, built as the other parts are."""
    return ThreadedApi(settings)
