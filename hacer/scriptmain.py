"""Runs one script for the runner: `python hacer/scriptmain.py <script.py> <params...>`.

The script runs as `__main__` with the usual argv; an exception it does not catch becomes an
`exception` entry ("<type>: <message>") after its traceback, and the exit code is 1 then, or
when the script's `with NodeConnection()` block failed.
"""

from __future__ import annotations

import os
import sys

# Run as a file (not -m, which costs runpy), so the project folder comes from PYTHONPATH.
from hacer import scripting
from hacer.parentdeath import die_with_parent_from_env


def main() -> None:
    """Run the script named by argv[1]."""
    # The runner names itself, so no script outlives it. Done here rather than in a preexec_fn,
    # which would make every spawn a full fork of the runner (4.4 ms measured, against 0.1 ms).
    die_with_parent_from_env()
    path = os.path.abspath(sys.argv[1])
    sys.argv = [path, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(path)
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the run's log must say it
        import traceback

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
