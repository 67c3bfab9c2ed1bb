"""`python -m api` (what `manage.py api` runs): the api on eventlet's server."""

import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # known: see docs/dependencies.md
import eventlet  # noqa: E402

eventlet.monkey_patch()  # before anything imports socket or threading

from api.main import main  # noqa: E402

main()
