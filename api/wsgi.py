"""Production entry point for gunicorn with the eventlet worker (see api/gunicorn.conf.py):

    gunicorn -c api/gunicorn.conf.py api.wsgi:app

gunicorn's eventlet worker patches the standard library before it imports this module. One
worker per process (Socket.IO needs each client to stay on one process); scale out with more
processes behind nginx (ip_hash). The recorder is a part of its own: `manage.py recorder`.
"""

from api.app import create_app

app = create_app()
