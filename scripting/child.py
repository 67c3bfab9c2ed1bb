"""Runs one script for the runner, and owns the hand-off format that names a run.

Two ways in, one outcome. The runner's fork server (runner/forkserver.py) forks a process per
run and makes it the run's with `become()`; without the fork server the runner starts
`python scripting/child.py <script.py> <params...>` with the run id in the environment. Either
way the script runs as `__main__` with the usual argv; an exception it does not catch becomes an
`exception` entry ("<type>: <message>") after its traceback, and the exit code is 1 then, or when
the script's `with NodeConnection()` block failed.
"""

from __future__ import annotations

import os
import sys

# Run as a file (not -m, which costs runpy), so the project folder comes from PYTHONPATH.
import scripting
from hacer.parentdeath import adopt_orphans, die_with_parent_from_env, end_children

TYPE_CHECKING = False  # typing's import alone would cost a cold script 20 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    Ready = Callable[[], None]

RUN_ID_ENV = "HACER_RUN_ID"
# A token per script process, in the environment it starts with: /proc/<pid>/environ of its
# descendants names it even when they fork without exec (a forked run learns its run id late).
LAUNCH_ENV = "HACER_LAUNCH"
LAUNCH_TOKEN_LENGTH = 32
# Bytes: one SOCK_SEQPACKET message at Linux's default socket buffer (208 KiB), and room for the
# largest request (32 parameters of 1024 characters, 4 bytes each at most, and a script's path).
HANDOFF_LIMIT = 192 * 1024


class HandoffError(ValueError):
    """The bytes are not a hand-off."""


def encode_handoff(run_id: str, token: str, script: str, params: tuple[str, ...] | list[str]) -> bytes:
    """Encode a run for the fork server: NUL-separated run id, launch token, script path, params."""
    fields = [run_id, token, script, *params]
    if any("\0" in field for field in fields):
        raise HandoffError("a hand-off field contains NUL")
    body = "\0".join(fields).encode()
    if len(body) > HANDOFF_LIMIT:
        raise HandoffError(f"a hand-off of {len(body)} bytes is over {HANDOFF_LIMIT}")
    return body


def decode_handoff(body: bytes) -> tuple[str, str, str, list[str]]:
    """Return run id, launch token, script path and params of a hand-off."""
    try:
        run_id, token, script, *params = body.decode().split("\0")
    except (UnicodeDecodeError, ValueError):
        raise HandoffError(f"not a hand-off: {body[:40]!r}") from None
    if len(token) != LAUNCH_TOKEN_LENGTH or not token.isalnum() or not os.path.isabs(script):
        raise HandoffError(f"not a hand-off: {body[:40]!r}")
    return run_id, token, script, params


def become(run_id: str, script: str, params: list[str]) -> None:
    """Make this (forked) process the run's: stdin, environment, folder, argv and sys.path[0]."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ[RUN_ID_ENV] = run_id
    adopt_orphans()
    os.chdir(os.path.dirname(script))
    sys.argv = [script, *params]
    sys.path[0] = os.path.dirname(script)


def run_script(path: str, namespace: dict[str, object] | None = None, ready: Ready | None = None) -> None:
    """Run the script at `path` as __main__ (in `namespace`); raise SystemExit with the run's outcome.

    `ready` is called once the script is compiled (or failed to), before any of its code runs.
    """
    if namespace is None:
        namespace = {}
    namespace.update({"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    try:
        try:
            with open(path, "rb") as source:  # a SyntaxError is the script's failure too
                code = compile(source.read(), path, "exec")
        finally:
            if ready is not None:
                ready()
        exec(code, namespace)
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


def run_to_the_end(path: str, ready: Ready | None = None) -> NoReturn:
    """Run the script at `path` (`ready` as for run_script) and end the process as the interpreter's exit would.

    Only the interpreter's teardown of its modules is left out: in a forked run it writes to
    every object shared with the fork server, copying all its pages (25 MB, several ms of CPU
    beside the next run). What a script can notice of an exit is kept, in the interpreter's
    order: its threads are waited for, its atexit hooks run, its own objects are freed (a file
    it left open is flushed and closed), stdout and stderr are flushed. As multiprocessing's
    children end.
    """
    namespace: dict[str, object] = {}
    try:
        run_script(path, namespace, ready)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit
        import gc

        atexit._run_exitfuncs()
        namespace.clear()
        gc.collect()
    except BaseException as exc:  # noqa: BLE001 - the run's outcome stands
        os.write(2, f"hacer: {type(exc).__name__} at exit: {exc}\n".encode())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    end_children()  # what the script left running ends with its run, wherever it hid (see main)
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    sys.stderr.write(f"{exc.code}\n")  # as the interpreter does with sys.exit("message")
    return 1


def main() -> None:
    """Run the script named by argv[1]."""
    # The runner names itself, so no script outlives it. Done here rather than in a preexec_fn,
    # which would make every spawn a full fork of the runner (4.4 ms measured, against 0.1 ms).
    die_with_parent_from_env()
    adopt_orphans()  # a descendant the script leaves is given to this process, not to init
    path = os.path.abspath(sys.argv[1])
    sys.argv = [path, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(path)
    run_to_the_end(path)


if __name__ == "__main__":
    main()
