"""The api app factory: REST under /api, websockets relaying the bus, the control app at /.

`create_app(config)` builds everything and starts nothing: `api.main` (or a test) starts the
bus after the app exists, so a reloader or a test client never opens a second connection.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from flask import Flask, send_from_directory
from flask.typing import ResponseReturnValue
from flask_socketio import SocketIO

from api.errors import register_error_handlers
from api.guard import RequestGuard, default_host_names
from api.live import LiveView
from api.offhub import eventlet_runner, move_off_hub
from api.services import Services
from hacer.bus import Bus, Message
from hacer.models import CommitSync, Database
from hacer.nodecommands import NodeCommandClient
from hacer.scriptdir import ScriptDir
from hacer.settings import PROJECT_DIR, Settings
from hacer.topics import Topics

log = logging.getLogger("api")

MAX_BODY_BYTES = 64 * 1024


def served_host(settings: Settings) -> str:
    """The address the api may serve on, said in the log when it is not the one asked for."""
    host = settings.served_http_host
    if host != settings.http_host:
        log.warning("HACER_API_TOKEN is not set: serving on 127.0.0.1 only, not %s", settings.http_host)
    elif not settings.api_token:
        log.info("no HACER_API_TOKEN: the api serves 127.0.0.1 only and asks no token")
    return host


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the api app. Config keys: HACER_SETTINGS (a Settings), HACER_BUS (a bus to use
    instead of a new one), ASYNC_MODE (eventlet by default), and any Flask setting."""
    config = dict(config or {})
    settings: Settings = config.pop("HACER_SETTINGS", None) or Settings.from_env()
    topics = Topics(settings.topic_prefix)
    bus = config.pop("HACER_BUS", None) or Bus(
        settings.mqtt_url,
        topics,
        client_id=f"hacer-api-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}",
        presence_topic=topics.build("api_state"),
    )
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    app.config.update(config)
    api_state = topics.build("api_state")

    def still_online(message: Message) -> None:
        # Every api process shares this topic, each with its last will: when one goes, the
        # others say again that the api is online (not their own words: no_local).
        if message.payload == b"offline" and bus.connected:
            bus.publish(api_state, b"online", retain=True, block=False)

    bus.subscribe(api_state, still_online, no_local=True)
    live = LiveView(bus, topics)
    live.subscribe()
    commands = NodeCommandClient(bus, topics)
    commands.subscribe()
    database = Database(settings.database_url, settings.database_timeout)
    async_mode = app.config.get("ASYNC_MODE", "eventlet")
    sync: Callable[[], None] = CommitSync(database.engine)
    if async_mode == "eventlet" and database.engine.dialect.name == "sqlite":
        # psycopg already waits cooperatively under eventlet (measured); sqlite3 blocks the hub.
        off_hub = eventlet_runner()
        move_off_hub(database.engine, off_hub)
        sync = partial(off_hub, sync)
    app.extensions["hacer"] = Services(
        settings, topics, bus, live, commands, database.session, ScriptDir(settings.scripts_dir), sync
    )

    from api import automations  # noqa: F401 - its routes join the api blueprint
    from api.rest import api, check_token

    app.register_blueprint(api)
    register_error_handlers(app)

    from api import events

    # The app's own server (app.extensions["socketio"]), so two apps in one process stay apart.
    # No CORS handling in Socket.IO: RequestGuard checks every websocket connect's Origin.
    socketio = SocketIO(app, async_mode=async_mode, cors_allowed_origins=[])
    if async_mode == "threading":
        from api.fanout import write_directly

        write_directly(socketio)
    events.attach(socketio, live, settings.api_token)
    # Outermost, around Socket.IO's middleware too.
    app.wsgi_app = RequestGuard(  # type: ignore[method-assign]
        app.wsgi_app,
        max_body=MAX_BODY_BYTES,
        allowed_hosts=default_host_names() | set(settings.allowed_hosts),
        allowed_origins=settings.allowed_origins,
    )

    scraped: list[Any] = []  # the registry, made at the first scrape: prometheus_client costs 10 MB

    @app.get("/metrics")
    def metrics() -> ResponseReturnValue:
        check_token()
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from api.metrics import HacerCollector

        if not scraped:
            scraped.append(CollectorRegistry(auto_describe=False))
            scraped[0].register(HacerCollector(live, database.session, lambda: len(socketio.server.eio.sockets)))
        return generate_latest(scraped[0]), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    @app.get("/")
    def control_app() -> ResponseReturnValue:
        return send_from_directory(app.static_folder or "static", "index.html")

    @app.get("/vendor/<path:name>")
    def vendor(name: str) -> ResponseReturnValue:
        # The Socket.IO browser client and uPlot, installed from the npm registry by setup.sh (package.json).
        package = "uplot" if name.startswith("uPlot.") else "socket.io-client"
        return send_from_directory(PROJECT_DIR / "node_modules" / package / "dist", name)

    return app
