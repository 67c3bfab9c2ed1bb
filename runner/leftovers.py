"""What a run leaves behind: processes outside its process group, found and ended.

A script's children share its process group, which cancel and the time limit end. A child that
calls setsid (a daemon, `nohup ... &` in a shell) leaves the group and may keep the run's output
pipe open, holding the run `running` and its slot past any deadline. Such leftovers are found by
the run id in their environment (every descendant inherits it) or by holding the run's pipe.
"""

from __future__ import annotations

import os
import signal

PROC = "/proc"


def run_processes(run_id: str, pipe_inode: int | None) -> list[int]:
    """Return the pids carrying `run_id` or holding the pipe, other than this process and its children."""
    marker = f"HACER_RUN_ID={run_id}".encode()
    pipe = f"pipe:[{pipe_inode}]"
    me = os.getpid()
    found = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"{PROC}/{entry.name}/stat", "rb") as stat:
                if int(stat.read().rsplit(b")", 1)[1].split()[1]) == me:
                    continue  # the runner's own child: a run's script, or one between fork and exec
            with open(f"{PROC}/{entry.name}/environ", "rb") as environ:
                if marker in environ.read().split(b"\0"):
                    found.append(int(entry.name))
                    continue
            if pipe_inode is not None and any(
                os.readlink(fd.path) == pipe for fd in os.scandir(f"{PROC}/{entry.name}/fd")
            ):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def end_leftovers(run_id: str, pipe_inode: int | None) -> list[int]:
    """SIGKILL every process `run_processes` finds, with its process group; return their pids."""
    pids = run_processes(run_id, pipe_inode)
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
