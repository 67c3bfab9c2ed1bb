"""gunicorn settings for the api: eventlet worker, one per process; the bus starts in the worker."""
import os

worker_class = "eventlet"
workers = 1
# Websocket connections never end by themselves: waiting the default 30 s for them on every
# stop only delays it.
graceful_timeout = 5
bind = f"{os.environ.get('HACER_HTTP_HOST', '127.0.0.1')}:{os.environ.get('HACER_HTTP_PORT', '5000')}"


def post_worker_init(worker):  # noqa: ANN001 - gunicorn's hook signature
    """Connect to the broker in the worker (never at import, never in the master)."""
    worker.wsgi.extensions["hacer"].bus.start()


def worker_exit(server, worker):  # noqa: ANN001
    """Leave the bus: the api's retained state says offline."""
    worker.wsgi.extensions["hacer"].bus.stop()
