"""What a run leaves behind: processes outside its process group, found and ended.

A script's children share its process group, which cancel and the time limit end. A child that
calls setsid (a daemon, `nohup ... &` in a shell) leaves the group and may keep the run's output
pipe open, holding the run `running` and its slot past any deadline. Such leftovers are found by
the run id or the run's launch token in their environment (every descendant inherits them; a
forked run's token is in the environment block it started with, see runner/forkserver.py) or
by holding the run's pipe.
"""

from __future__ import annotations

import os
import signal

from hacer.scriptmain import LAUNCH_ENV, RUN_ID_ENV

PROC = "/proc"


def start_ticks(pid: int) -> int:
    """When a process started, in clock ticks since boot (0 when it cannot be read)."""
    try:
        return int(_stat(str(pid))[19])
    except (OSError, IndexError, ValueError):
        return 0


def run_processes(run_id: str, token: str, started: int, pipe_inode: int | None) -> list[int]:
    """Return the pids carrying `run_id` or `token` or holding the pipe, other than this process and its children.

    Only processes started since `started` (the script's start, in clock ticks) can be the run's
    descendants: the others are passed over after one read each (the scan runs after every run).
    """
    markers = {f"{RUN_ID_ENV}={run_id}".encode(), f"{LAUNCH_ENV}={token}".encode()}
    pipe = f"pipe:[{pipe_inode}]"
    me = os.getpid()
    found = []
    for name in os.listdir(PROC):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            stat = _stat(name)
            if int(stat[1]) == me or int(stat[19]) < started:
                continue  # the runner's own child (a run's script, or one between fork and exec), or older than the run
            if not markers.isdisjoint(_read(f"{PROC}/{name}/environ").split(b"\0")):
                found.append(int(name))
                continue
            if pipe_inode is not None and any(os.readlink(fd.path) == pipe for fd in os.scandir(f"{PROC}/{name}/fd")):
                found.append(int(name))
        except (OSError, IndexError, ValueError):  # gone meanwhile, or another user's
            continue
    return found


def _stat(pid: str) -> list[bytes]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, ... (starttime is [19])."""
    return _read(f"{PROC}/{pid}/stat").rsplit(b")", 1)[1].split()


def _read(path: str) -> bytes:
    # os.open and os.read: a third of open()'s cost, which counts when every process is read.
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def end_leftovers(run_id: str, token: str, started: int, pipe_inode: int | None) -> list[int]:
    """SIGKILL every process `run_processes` finds, with its process group; return their pids."""
    pids = run_processes(run_id, token, started, pipe_inode)
    own_group = os.getpgrp()
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != own_group:  # a leftover may have joined the runner's group: not that one
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            pass
    return pids
