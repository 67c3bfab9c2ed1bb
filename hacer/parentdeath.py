"""Dying with one's parent: a child process asks the kernel for SIGKILL when its parent ends.

Imports only os and sys (ctypes when used): scripts call it before their first line.
"""

import os
import sys

PARENT_ENV = "HACER_PARENT_PID"


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when `parent_pid` (our parent) dies; exit now if it already has (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # (not `signal`: its enum import alone costs 3 ms per script start)

    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def die_with_parent_from_env() -> None:
    """die_with_parent() when the parent named itself in HACER_PARENT_PID."""
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit():
        die_with_parent(int(parent))


def child_env(env: "dict[str, str] | None" = None) -> "dict[str, str]":
    """The environment for a child that must not outlive this process."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
