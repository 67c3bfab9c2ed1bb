"""The api process's main(): settings, the app, the bus, eventlet's server."""

from __future__ import annotations

import gc
import logging
import signal
import socket

import eventlet
import eventlet.event
import eventlet.wsgi

from api.app import create_app, served_host
from api.limits import ConnectionLimits, limited_pool
from hacer.lifecycle import name_process
from hacer.logs import setup_logging
from hacer.models import Database
from hacer.settings import Settings, without_password

log = logging.getLogger("api")


def main() -> None:
    """Serve until interrupted."""
    settings = Settings.from_env()
    setup_logging(settings, "api")
    name_process("hacer-api")  # `python -m api`, exec'd by manage.py: named as the other parts are
    Database(settings.database_url).init()
    host = served_host(settings)
    app = create_app({"HACER_SETTINGS": settings})
    services = app.extensions["hacer"]
    # Bound before the bus says the api is online: from then on its port takes connections.
    address = socket.getaddrinfo(host, settings.http_port, type=socket.SOCK_STREAM)[0]
    listener = eventlet.listen(address[4], address[0])
    services.bus.start()
    # Everything built so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise added ~50 ms to every other 10 000-node listing (measured).
    gc.freeze()
    # The server runs in a green thread; a signal only wakes the main one, which then stops it.
    # (Raising KeyboardInterrupt from the handler would hit whichever green thread was running.)
    stop = eventlet.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.ready() or stop.send())
    log.info("api on http://%s:%d/ (broker %s)", host, settings.http_port, without_password(settings.mqtt_url))
    limits = ConnectionLimits(settings.http_max_connections, settings.http_max_per_client, settings.http_idle_timeout)
    server = eventlet.spawn(  # as Flask-SocketIO's run() serves with eventlet, on the listener bound above
        eventlet.wsgi.server,
        listener,
        app,
        log_output=False,
        custom_pool=limited_pool(limits),
        socket_timeout=limits.idle,  # a connection that sends nothing for this long is closed
        keepalive=limits.idle,
    )
    try:
        stop.wait()
    finally:
        server.kill()
        services.bus.stop()
        log.info("api stopped")
