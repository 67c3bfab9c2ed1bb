"""The api process: REST under /api, websockets relaying the bus, the control app at /.

The factory is `api.app.create_app`; this package's own module stays empty so `python -m api`
can let eventlet patch the standard library before anything else is imported.
"""
