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
from typing import NamedTuple

from hacer.parentdeath import children_of, kill_with_group
from scripting.child import LAUNCH_ENV, RUN_ID_ENV

PROC = "/proc"
RESERVED_PIDS = 300  # where the kernel's pid counter starts again after pid_max


class Birth(NamedTuple):
    """Where the kernel's pid counter and fork count stood when a run was launched."""

    last_pid: int
    forks: int


def birth() -> Birth:
    """Mark now: the processes created from here on are found from it without reading the others."""
    try:
        return Birth(int(_read(f"{PROC}/sys/kernel/ns_last_pid")), _forks())
    except (OSError, ValueError):
        return Birth(-1, 0)


def run_processes(run_id: str, token: str, since: Birth, pipe_inode: int | None) -> list[int]:
    """Return the pids carrying `run_id` or `token` or holding the pipe, other than this process and its children.

    Only processes created since the run's launch can be its descendants. Linux hands out pids
    in cyclic order, so those are the pids after the one last handed out at the launch, up to the
    one last handed out now, unless the counter went all the way round meanwhile (told by the
    fork count): the others are not read at all (the scan runs after every run).
    """
    markers = {f"{RUN_ID_ENV}={run_id}".encode(), f"{LAUNCH_ENV}={token}".encode()}
    pipe = f"pipe:[{pipe_inode}]"
    me = os.getpid()
    found = []
    for pid in _created_since(since):
        if pid == me:
            continue
        try:
            if int(_read(f"{PROC}/{pid}/stat").rsplit(b")", 1)[1].split()[1]) == me:
                continue  # the runner's own child: a run's script, or one between fork and exec
            if not markers.isdisjoint(_read(f"{PROC}/{pid}/environ").split(b"\0")):
                found.append(pid)
                continue
            if pipe_inode is not None and any(os.readlink(fd.path) == pipe for fd in os.scandir(f"{PROC}/{pid}/fd")):
                found.append(pid)
        except (OSError, IndexError, ValueError):  # gone meanwhile, or another user's
            continue
    return found


def _created_since(since: Birth) -> list[int]:
    pids = [int(name) for name in os.listdir(PROC) if name.isdigit()]
    now = birth()
    try:
        pid_max = int(_read(f"{PROC}/sys/kernel/pid_max"))
    except (OSError, ValueError):
        return pids
    if since.last_pid < 0 or now.last_pid < 0 or now.forks - since.forks >= pid_max - RESERVED_PIDS:
        return pids  # the counter may have gone round: every process is a candidate
    if now.last_pid >= since.last_pid:
        return [pid for pid in pids if since.last_pid < pid <= now.last_pid]
    return [pid for pid in pids if pid > since.last_pid or RESERVED_PIDS <= pid <= now.last_pid]


def _forks() -> int:
    """Processes and threads created since boot (/proc/stat `processes`)."""
    for line in _read(f"{PROC}/stat").splitlines():
        if line.startswith(b"processes "):
            return int(line.split()[1])
    raise ValueError("no `processes` line in /proc/stat")


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


def end_leftovers(run_id: str, token: str, since: Birth, pipe_inode: int | None) -> list[int]:
    """SIGKILL every process `run_processes` finds, with its process group; return their pids."""
    pids = run_processes(run_id, token, since, pipe_inode)
    for pid in pids:
        kill_with_group(pid)  # a leftover may have joined the runner's group: not that one
    return pids


def adopted(run_pid: int) -> list[int]:
    """The processes a live run's process adopted (hacer/parentdeath.py): those that left its process group."""
    escaped = []
    for pid in children_of(run_pid):
        try:
            if os.getpgid(pid) != run_pid:
                escaped.append(pid)
        except OSError:  # gone meanwhile
            continue
    return escaped
