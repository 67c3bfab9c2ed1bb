"""Dying with one's parent, and keeping one's orphans: a child process asks the kernel for SIGKILL
when its parent ends; a run's process adopts what its descendants leave, so it can end them.

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


def adopt_orphans() -> None:
    """Be the process a descendant is given to when its parent dies, instead of init (Linux only).

    A process that calls setsid and clears its environment (`env -i setsid ...`) then still has
    this one as its parent, whatever its session, group or environment.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def children_of(parent: int, candidates: "list[int] | None" = None) -> "list[int]":
    """The pids among `candidates` (default: every process) whose parent is `parent`."""
    if candidates is None:
        try:  # the kernel's own list, where it keeps one (CONFIG_PROC_CHILDREN)
            children: list[int] = []
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as listed:
                    children.extend(int(child) for child in listed.read().split())
            return children
        except OSError:
            candidates = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    found = []
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                if int(stat.read().rsplit(b")", 1)[1].split()[1]) == parent:
                    found.append(pid)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def end_children() -> None:
    """SIGKILL what this process's children are (with their process groups) until none is left, reaping each.

    For a run's process at its end: having adopted its orphans, every process the script left
    running is a child here, or a child's descendant (given here once the child is gone).
    """
    for _ in range(100):
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # none: the usual case, at the cost of one system call
        for pid in children_of(os.getpid()):
            kill_with_group(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def kill_with_group(pid: int, signum: int = 9) -> None:
    """Signal a process, and its process group unless that is this process's own (SIGKILL by default)."""
    try:
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, signum)
        os.kill(pid, signum)
    except OSError:  # gone meanwhile
        pass


def die_with_parent_from_env() -> None:
    """die_with_parent() when the parent named itself in HACER_PARENT_PID."""
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit():
        die_with_parent(int(parent))


def child_env(env: "dict[str, str] | None" = None) -> "dict[str, str]":
    """The environment for a child that must not outlive this process."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
