"""The runner's fork server: one interpreter that imports what scripts use once, then forks a
fresh process for each run.

Started by the runner as `python runner/forkserver.py <fd>` with the scripts' environment; it
dies with the runner, and its children with it. It never runs a script itself, so every run
starts from the same untouched interpreter: no run can see another's state. It keeps one child
forked ahead (the spare: its own process group, dying with the server) and gives the runner a
socket to it, so the runner hands a run straight to the spare (one hop) instead of starting an
interpreter (12 ms bare, 250 ms with the bus imported) or waiting for a fork (1-2 ms with these
imports); the next spare is forked once the run is on its way. Forked processes share the
imported pages copy-on-write.

On the SOCK_SEQPACKET socket at <fd>, one message each:
    server -> runner   b"spare <pid>" with the spare's socket (SCM_RIGHTS): the runner sends the
                       run's hand-off (scripting/child.py) and output pipe on it while the
                       run's claim is being synced to disk, then b"go" once it is; the spare
                       becomes the run and compiles the script meanwhile, and without the go
                       (the socket closed) exits having run none of it;
                       b"exited <pid> <returncode>" for every child that ended (a run's, or an
                       unused spare's), returncode as subprocess's
    runner -> server   b"used <pid>": the spare has a run, fork the next (after a quiet moment);
                       b"fork": the runner needs a spare now
A run's process has the pipe as stdout and stderr and /dev/null as stdin, and carries its
launch token in its initial environment block, where /proc/<pid>/environ of its descendants
shows it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import socket
import sys

from hacer.parentdeath import die_with_parent, die_with_parent_from_env
from scripting import child as scriptmain

PLACEHOLDER = "0" * scriptmain.LAUNCH_TOKEN_LENGTH  # the launch token, written over per run
# Seconds of quiet after a run is handed over before the next spare is forked: the fork's 1-2 ms
# of CPU would otherwise compete with the run just started and the runner publishing it (2 cores).
SPARE_AFTER = 0.01


def main() -> None:
    """Serve the runner on the socket whose fd is argv[1] until it closes."""
    die_with_parent_from_env()
    runner = socket.socket(fileno=int(sys.argv[1]))
    runner.set_inheritable(False)
    # What scripts import (2015's hasapi, the node commands and the bus): imported once here.
    import hacer.bus  # noqa: F401
    import hacer.nodecommands  # noqa: F401
    import hasapi  # noqa: F401

    gc.freeze()  # a collection in a child would write to every object, copying the shared pages

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    placeholder = _placeholder()
    spare = _offer_spare(runner, placeholder)  # the pid of the spare the runner holds; 0: none
    while True:
        ready, _, _ = select.select([runner, wake_read], [], [], None if spare else SPARE_AFTER)
        if not ready and not spare:
            spare = _offer_spare(runner, placeholder)
        if wake_read in ready:
            while True:
                try:
                    os.read(wake_read, 4096)
                except BlockingIOError:
                    break
            if spare in _reap(runner):
                spare = 0  # it died unused (killed by someone): a new one after a quiet moment
        if runner in ready:
            message = runner.recv(64)
            if not message:
                return  # the runner is gone (its runs and the spare die with this process)
            if message == b"used %d" % spare:
                spare = 0
            elif message == b"fork" and not spare:
                spare = _offer_spare(runner, placeholder)


def _reap(runner: socket.socket) -> list[int]:
    """Report the children that exited; return their pids."""
    gone: list[int] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return gone
        if pid == 0:
            return gone
        gone.append(pid)
        runner.send(b"exited %d %d" % (pid, os.waitstatus_to_exitcode(status)))


def _offer_spare(runner: socket.socket, placeholder: int) -> int:
    """Fork a spare and give the runner its socket; return its pid."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _spare(theirs, runner, server, placeholder)
    theirs.close()
    try:
        os.setpgid(pid, pid)  # here too (as shells do): the group exists before the runner may signal it
    except OSError:  # the child did it first
        pass
    socket.send_fds(runner, [b"spare %d" % pid], [ours.fileno()])
    ours.close()
    return pid


def _spare(channel: socket.socket, runner: socket.socket, server: int, placeholder: int) -> None:
    """Wait for a run, become it and run its script; never return into the server's loop."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        runner.close()
        keep = channel.fileno()
        os.closerange(3, keep)  # whatever else the server had open: none of the run's business
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        os.setpgid(0, 0)
        die_with_parent(server)
        body, fds, _, _ = socket.recv_fds(channel, scriptmain.HANDOFF_LIMIT, 1)
        if not body or len(fds) != 1:
            os._exit(0)  # the runner let this spare go
        run_id, token, script, params = scriptmain.decode_handoff(body)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(fds[0])
        _mark_environment(placeholder, token)
        scriptmain.become(run_id, script, params)
    except BaseException as exc:  # noqa: BLE001 - nothing of the server's loop may run in a child
        os.write(2, f"hacer: the run could not start: {type(exc).__name__}: {exc}\n".encode())
        os._exit(1)

    def wait_for_go() -> None:
        try:
            word = channel.recv(8)
        except OSError:
            word = b""
        channel.close()  # none of the script's business
        if word != b"go":
            os._exit(0)  # the run's claim did not reach the disk: nothing of it runs

    try:
        scriptmain.run_to_the_end(script, wait_for_go)  # ends the process itself
    except BaseException as exc:  # noqa: BLE001 - never back into the server's loop
        os.write(2, f"hacer: the run failed to end: {type(exc).__name__}: {exc}\n".encode())
    os._exit(1)


def _placeholder() -> int:
    """The address of the launch token's placeholder in the initial environment (0: none); a fork keeps it."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    address = libc.getenv(scriptmain.LAUNCH_ENV.encode())
    return address if address and ctypes.string_at(address) == PLACEHOLDER.encode() else 0


def _mark_environment(placeholder: int, token: str) -> None:
    """Write the run's launch token over the placeholder in this process's initial environment."""
    if placeholder:
        ctypes.memmove(placeholder, token.encode(), len(PLACEHOLDER))
    os.environ[scriptmain.LAUNCH_ENV] = token


if __name__ == "__main__":
    main()
