"""The api as a part beside the others in one process (`runserver --together`): Flask-SocketIO's
threading mode on Werkzeug's threaded server, a thread per connection, no eventlet.

It costs the api's own modules and data only (the interpreter, paho and SQLAlchemy are the other
parts'), which is what fits the whole server in a small machine's memory (bench/README.md).
For many clients, `manage.py api` (eventlet) behind nginx serves them better (docs/deploy.md).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler

from api.app import create_app, served_host
from api.limits import ConnectionLimits
from hacer.models import Database
from hacer.settings import Settings

log = logging.getLogger("api")


class QuietRequests(WSGIRequestHandler):
    """No access log line per request (eventlet's server is told the same)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing."""


class LimitedServer(ThreadedWSGIServer):
    """Werkzeug's threaded server within the api's connection limits (api/limits.py)."""

    def __init__(self, host: str, port: int, app: Any, limits: ConnectionLimits) -> None:
        handler = type("IdleLimitedRequests", (QuietRequests,), {"timeout": limits.idle})  # a silent one ends
        super().__init__(host, port, app, handler=handler)
        self.limits = limits

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection within the limits (socketserver closes the others)."""
        return self.limits.admit(client_address[0])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve an admitted connection, then give its place back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.limits.release(client_address[0])


class ThreadedApi:
    """The api's app and bus, served from a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        Database(settings.database_url).init()
        self.app = create_app({"HACER_SETTINGS": settings, "ASYNC_MODE": "threading"})
        self.server: BaseWSGIServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect the bus and serve."""
        self.app.extensions["hacer"].bus.start()
        host = served_host(self.settings)
        settings = self.settings
        limits = ConnectionLimits(
            settings.http_max_connections, settings.http_max_per_client, settings.http_idle_timeout
        )
        self.server = LimitedServer(host, settings.http_port, self.app, limits)
        self.thread = threading.Thread(target=self.server.serve_forever, name="api-server", daemon=True)
        self.thread.start()
        log.info("api on http://%s:%d/ (threads)", host, self.settings.http_port)

    def stop(self) -> None:
        """Stop serving, then the bus."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.app.extensions["hacer"].bus.stop()
        log.info("api stopped")


def build_api(settings: Settings) -> ThreadedApi:
    """The api, built as the other parts are."""
    return ThreadedApi(settings)
