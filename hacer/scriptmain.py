"""Runs one script for the runner: `python -m hacer.scriptmain <script.py> <params...>`.

The script runs as `__main__` with the usual argv; an exception it does not catch becomes an
`exception` entry ("<type>: <message>") after its traceback, and the exit code is 1 then, or
when the script's `with NodeConnection()` block failed.
"""
from __future__ import annotations

import os
import runpy
import sys
import traceback

from hacer import scripting


def main() -> None:
    """Run the script named by argv[1]."""
    path = sys.argv[1]
    sys.argv = [path, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the run's log must say it
        traceback.print_exc()
        sys.stderr.flush()
        scripting.emit("exception", f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    finally:
        scripting.close()
    if scripting.failed():
        sys.exit(1)


if __name__ == "__main__":
    main()
