"""The api process's main(): settings, the app, the bus, eventlet's server."""

from __future__ import annotations

import gc
import logging
import signal

import eventlet
import eventlet.event

from api.app import create_app
from hacer.logs import setup_logging
from hacer.models import Database
from hacer.settings import Settings

log = logging.getLogger("api")


def main() -> None:
    """Serve until interrupted."""
    settings = Settings.from_env()
    setup_logging(settings, "api")
    Database(settings.database_url).init()
    host = settings.served_http_host
    if host != settings.http_host:
        log.warning("HACER_API_TOKEN is not set: serving on 127.0.0.1 only, not %s", settings.http_host)
    elif not settings.api_token:
        log.info("no HACER_API_TOKEN: the api serves 127.0.0.1 only and asks no token")
    app = create_app({"HACER_SETTINGS": settings})
    services = app.extensions["hacer"]
    services.bus.start()
    # Everything built so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise added ~50 ms to every other 10 000-node listing (measured).
    gc.freeze()
    # The server runs in a green thread; a signal only wakes the main one, which then stops it.
    # (Raising KeyboardInterrupt from the handler would hit whichever green thread was running.)
    stop = eventlet.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.ready() or stop.send())
    log.info("api on http://%s:%d/ (broker %s)", host, settings.http_port, settings.mqtt_url)
    socketio = app.extensions["socketio"]
    server = eventlet.spawn(socketio.run, app, host=host, port=settings.http_port, log_output=False)
    try:
        stop.wait()
    finally:
        server.kill()
        services.bus.stop()
        log.info("api stopped")
