"""gunicorn settings for the api: eventlet worker, one per process; the bus starts in the worker."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gunicorn reads this before its chdir

from hacer.settings import Settings  # noqa: E402 - needs the path above

settings = Settings.from_env()
worker_class = "eventlet"
workers = 1
# Connections at most (api/limits.py): behind nginx every connection is nginx's, so no per-client limit here.
worker_connections = settings.http_max_connections
keepalive = int(settings.http_idle_timeout)
# Websocket connections never end by themselves: waiting the default 30 s for them on every
# stop only delays it.
graceful_timeout = 5
# As `manage.py api` does: without HACER_API_TOKEN, loopback only.
bind = f"{settings.served_http_host}:{settings.http_port}"
if settings.served_http_host != settings.http_host:
    print(f"HACER_API_TOKEN is not set: serving on 127.0.0.1 only, not {settings.http_host}", file=sys.stderr)


def post_worker_init(worker):  # noqa: ANN001 - gunicorn's hook signature
    """Connect to the broker in the worker (never at import, never in the master)."""
    worker.wsgi.extensions["hacer"].bus.start()


def worker_exit(server, worker):  # noqa: ANN001
    """Leave the bus: the api's retained state says offline."""
    worker.wsgi.extensions["hacer"].bus.stop()
