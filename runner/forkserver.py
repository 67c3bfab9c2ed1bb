"""The runner's fork server: one interpreter that imports what scripts use once, then forks a
fresh process for each run.

Started by the runner as `python runner/forkserver.py <fd>` with the scripts' environment; it
dies with the runner, and its children with it. It never runs a script itself, so every run
starts from the same untouched interpreter: no run can see another's state. It keeps one child
forked ahead (the spare: its own process group, dying with the server, waiting on a socket of
its own), so a run costs two socket hops instead of an interpreter's start (12 ms bare, 250 ms
with the bus imported) or even a fork (1-2 ms with these imports); the next spare is forked
once the run is on its way. Forked processes share the imported pages copy-on-write.

On the SOCK_SEQPACKET socket at <fd>, one message each:
    runner -> server   a hand-off (hacer/scriptmain.py) with the run's output pipe (SCM_RIGHTS)
    server -> runner   b"ready" once its imports are done; then for each hand-off b"started
                       <token> <pid>" or b"refused - <why>", and for each started
                       run b"exited <pid> <returncode>" (returncode as subprocess's)
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
from typing import NamedTuple

from hacer import scriptmain
from hacer.parentdeath import die_with_parent, die_with_parent_from_env

PLACEHOLDER = "0" * scriptmain.LAUNCH_TOKEN_LENGTH  # the launch token, written over per run
# Seconds of quiet after a hand-off before the next spare is forked: the fork's 1-2 ms of CPU
# would otherwise compete with the run just started and the runner publishing it (2 cores).
SPARE_AFTER = 0.01


class Spare(NamedTuple):
    """A child forked ahead, waiting for its run on `channel`."""

    pid: int
    channel: socket.socket


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
    inherited = (runner,)  # Python objects a spare closes first (its other fds are closed by number)
    placeholder = _placeholder()
    runs: set[int] = set()
    spare: Spare | None = _fork_spare(inherited, placeholder)
    runner.send(b"ready")
    while True:
        ready, _, _ = select.select([runner, wake_read], [], [], None if spare else SPARE_AFTER)
        if not ready and spare is None:
            spare = _fork_spare(inherited, placeholder)
        if wake_read in ready:
            while True:
                try:
                    os.read(wake_read, 4096)
                except BlockingIOError:
                    break
            if _reap(runner, runs, spare.pid if spare else 0) and spare:
                spare.channel.close()
                spare = None  # the spare died (killed by someone): a new one
        if runner in ready:
            spare = spare or _fork_spare(inherited, placeholder)  # before the hand-off's pipe is here to inherit
            body, fds, _, _ = socket.recv_fds(runner, scriptmain.HANDOFF_LIMIT, 1)
            if not body:
                return  # the runner is gone (its runs and the spare die with this process)
            try:
                token = _check(body, fds)
            except scriptmain.HandoffError as exc:
                runner.send(b"refused - " + str(exc).encode()[:200])
                for fd in fds:
                    os.close(fd)
                continue
            if _hand_over(runner, spare, token, body, fds[0]):
                runs.add(spare.pid)
            spare = None


def _check(body: bytes, fds: list[int]) -> str:
    """Return a hand-off's launch token; raise HandoffError when it is not one."""
    _, token, _, _ = scriptmain.decode_handoff(body)
    if len(fds) != 1:
        raise scriptmain.HandoffError(f"a hand-off needs one pipe, not {len(fds)}")
    return token


def _hand_over(runner: socket.socket, spare: Spare, token: str, body: bytes, output: int) -> bool:
    """Pass a run to the spare; return whether it was passed.

    The runner is answered first: its next steps then run beside the script's start, not after it.
    """
    runner.send(b"started %s %d" % (token.encode(), spare.pid))
    try:
        socket.send_fds(spare.channel, [body], [output])
        return True
    except OSError as exc:  # the spare died this very moment: the run ends here, saying why
        os.write(output, f"hacer: the run's process was gone before it started ({exc})\n".encode())
        runner.send(b"exited %d %d" % (spare.pid, 255))
        return False
    finally:
        os.close(output)
        spare.channel.close()


def _reap(runner: socket.socket, runs: set[int], spare: int) -> bool:
    """Report the runs that exited; return whether the spare did."""
    spare_gone = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return spare_gone
        if pid == 0:
            return spare_gone
        spare_gone |= pid == spare
        if pid in runs:
            runs.discard(pid)
            runner.send(b"exited %d %d" % (pid, os.waitstatus_to_exitcode(status)))


def _fork_spare(inherited: tuple[socket.socket, ...], placeholder: int) -> Spare:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _spare(theirs, inherited, server, placeholder)
    theirs.close()
    try:
        os.setpgid(pid, pid)  # here too (as shells do): the group exists before the runner may signal it
    except OSError:  # the child did it first
        pass
    return Spare(pid, ours)


def _spare(channel: socket.socket, inherited: tuple[socket.socket, ...], server: int, placeholder: int) -> None:
    """Wait for a run, become it and run its script; never return into the server's loop."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        inherited[0].close()
        keep = channel.fileno()
        os.closerange(3, keep)  # whatever else the server had open: none of the run's business
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        os.setpgid(0, 0)
        die_with_parent(server)
        body, fds, _, _ = socket.recv_fds(channel, scriptmain.HANDOFF_LIMIT, 1)
        if not body or len(fds) != 1:
            os._exit(0)  # the server let this spare go
        channel.close()
        run_id, token, script, params = scriptmain.decode_handoff(body)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(fds[0])
        _mark_environment(placeholder, token)
        scriptmain.become(run_id, script, params)
    except BaseException as exc:  # noqa: BLE001 - nothing of the server's loop may run in a child
        os.write(2, f"hacer: the run could not start: {type(exc).__name__}: {exc}\n".encode())
        os._exit(1)
    scriptmain.run_to_the_end(script)


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
