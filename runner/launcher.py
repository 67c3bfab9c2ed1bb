"""Starting script processes for the runner: forked by the fork server, or started cold.

A run is handed to the fork server's spare (runner/forkserver.py) when there is one: the
script's first line then comes about a millisecond after the hand-off instead of after an
interpreter's start and imports. When there is none to be had (the server is still importing,
or died and waits to be started again) the script is started as its own interpreter, as before
the fork server existed. Either way the process is the leader of its own process group, its
output one pipe, its environment the scripts' own plus the run id and a launch token that
runner/leftovers.py looks for.

PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not the process: only
threads that live as long as the runner (its workers, and the one that calls start()) may
start the fork server.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from hacer.parentdeath import PARENT_ENV
from hacer.settings import PROJECT_DIR
from runner.leftovers import Birth, birth
from scripting import child as scriptmain

log = logging.getLogger(__name__)

SCRIPT_MAIN = PROJECT_DIR / "scripting" / "child.py"
FORK_SERVER = PROJECT_DIR / "runner" / "forkserver.py"
REPLY_TIMEOUT = 10.0  # seconds the fork server has to offer a spare asked for (it takes 1-2 ms)
READY_TIMEOUT = 10.0  # seconds the runner's start waits for the fork server's imports (0.3 s here)
RESTART_AFTER = 10.0  # seconds between starts of a fork server that keeps dying


class ScriptProcess(Protocol):
    """What the runner uses of a script's process (a subprocess.Popen has it)."""

    pid: int
    stdout: IO[bytes] | None
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Launched(NamedTuple):
    """A started script: its process, its launch token, and the moment (runner/leftovers.py)."""

    process: ScriptProcess
    token: str
    birth: Birth


class ForkedProcess:
    """A run forked by the fork server: its exit status comes from the server."""

    def __init__(self, pid: int, channel: socket.socket | None = None) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = None
        self.returncode: int | None = None
        self._exited = threading.Event()
        self._channel = channel  # to the spare, until it is told go or let go

    def go(self) -> None:
        """Let the script run; a spare killed meanwhile (a cancel) is not told, its exit says so."""
        self._release(b"go")

    def let_go(self) -> None:
        """Tell the spare the run is not to run: it exits having run none of it."""
        self._release(b"")

    def _release(self, word: bytes) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        try:
            if word:
                channel.send(word)
        except OSError:
            pass
        finally:
            channel.close()

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit code; raise subprocess.TimeoutExpired after `timeout` seconds."""
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def exited(self, returncode: int) -> None:
        """Record the exit code (from the fork server's reader)."""
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set()


class _Spare(NamedTuple):
    """A process the fork server forked ahead, the socket to hand it a run on, and its run's token and birth.

    Both are made when the spare comes, off a run's way (reading /proc/stat for the birth took 0.2
    ms): the spare runs nothing of a run before its hand-off, so the processes a run creates are
    all born after its spare came.
    """

    pid: int
    channel: socket.socket
    token: str
    birth: Birth


class Launcher:
    """See the module docstring. `env` is the scripts' environment; does nothing until start()."""

    def __init__(
        self, python: str, env: Mapping[str, str], fork_server: bool = True, restart_after: float = RESTART_AFTER
    ) -> None:
        self.python = python
        self.env = {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT_DIR), PARENT_ENV: str(os.getpid())}
        self.use_fork_server = fork_server
        self.restart_after = restart_after
        self.forked = 0
        self.cold = 0
        self._lock = threading.Lock()  # guards the fields below
        self._spare_came = threading.Condition(self._lock)
        self._server: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._spare: _Spare | None = None
        self._ready = False  # the server has offered a spare: its imports are done
        self._forked: dict[int, ForkedProcess] = {}
        self._started_at = 0.0

    def start(self, wait: float = READY_TIMEOUT) -> None:
        """Start the fork server and wait up to `wait` seconds for its first spare; runs start cold until then."""
        if not self.use_fork_server:
            return
        with self._lock:
            self._start_server()
            if not self._spare_came.wait_for(lambda: self._spare is not None, wait):
                log.warning("the fork server is not ready after %g s: runs start cold until it is", wait)

    @property
    def ready(self) -> bool:
        """Tell whether the fork server has offered a spare (its imports are done)."""
        return self._ready

    def stop(self) -> None:
        """Stop the fork server; runs it forked die with it."""
        with self._lock:
            server, channel, spare = self._server, self._channel, self._spare
            self._server = self._channel = self._spare = None
        for open_socket in (channel, spare and spare.channel):
            if open_socket is not None:
                open_socket.close()
        if server is not None:
            server.kill()
            server.wait()

    def prepare(self, run_id: str, script: Path, params: tuple[str, ...]) -> Launched | None:
        """Hand a run to the fork server's spare, which gets the script ready and waits for go().

        None when there is no spare to be had (then launch() starts it cold).
        """
        return self._fork(run_id, script, params) if self.use_fork_server else None

    @staticmethod
    def go(process: ScriptProcess) -> None:
        """Let a prepared run's script run."""
        if isinstance(process, ForkedProcess):
            process.go()

    @staticmethod
    def let_go(process: ScriptProcess) -> None:
        """End a prepared run before any of its script runs, and close its output."""
        if isinstance(process, ForkedProcess):
            process.let_go()
        if process.stdout is not None:
            process.stdout.close()

    def launch(self, run_id: str, script: Path, params: tuple[str, ...]) -> Launched:
        """Start a run's script now."""
        prepared = self.prepare(run_id, script, params)
        if prepared is not None:
            self.go(prepared.process)
            return prepared
        token, moment = uuid.uuid4().hex, birth()
        self.cold += 1
        process = subprocess.Popen(
            [self.python, str(SCRIPT_MAIN), str(script), *params],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**self.env, scriptmain.RUN_ID_ENV: run_id, scriptmain.LAUNCH_ENV: token},
            cwd=script.parent,
            process_group=0,
            close_fds=True,
        )
        return Launched(process, token, moment)

    # --- the fork server --------------------------------------------------------------------

    def _fork(self, run_id: str, script: Path, params: tuple[str, ...]) -> Launched | None:
        """Hand a run to the fork server's spare; None when there is none to be had."""
        with self._lock:
            spare = self._take_spare()
            if spare is None:
                return None
            try:
                handoff = scriptmain.encode_handoff(run_id, spare.token, str(script), params)
            except scriptmain.HandoffError:
                self._spare = spare  # this run starts cold; the spare waits for the next
                return None
            process = self._forked[spare.pid] = ForkedProcess(spare.pid, spare.channel)  # before its exit can be told
        read_end, write_end = os.pipe()
        try:
            socket.send_fds(spare.channel, [handoff], [write_end])
        except OSError as exc:  # it died unused just now
            log.warning("handing run %s to the spare %d failed (%s): it starts cold", run_id, spare.pid, exc)
            with self._lock:
                self._forked.pop(spare.pid, None)
            process.let_go()
            os.close(read_end)
            return None
        finally:
            os.close(write_end)
        process.stdout = os.fdopen(read_end, "rb", buffering=0)
        self._tell_server(b"used %d" % spare.pid)
        self.forked += 1
        return Launched(process, spare.token, spare.birth)

    def _take_spare(self) -> _Spare | None:
        """The spare, asked for and waited on if none is here (call with the lock held)."""
        if self._server is None or self._server.poll() is not None:
            if time.monotonic() - self._started_at >= self.restart_after:
                exit_code = self._server.poll() if self._server else None
                log.warning("the fork server is gone (exit code %s): starting it again", exit_code)
                self._start_server()
            return None  # this run starts cold rather than wait for the new server's imports
        if not self._ready:
            return None  # still importing
        if self._spare is None and self._ask_for_spare():
            self._spare_came.wait_for(lambda: self._spare is not None, REPLY_TIMEOUT)
        spare, self._spare = self._spare, None
        return spare

    def _ask_for_spare(self) -> bool:
        try:
            assert self._channel is not None
            self._channel.send(b"fork")
            return True
        except OSError:
            return False

    def _tell_server(self, message: bytes) -> None:
        channel = self._channel
        try:
            if channel is not None:
                channel.send(message)
        except OSError as exc:  # gone: the next launch finds out and starts another
            log.warning("the fork server did not take %r: %s", message, exc)

    def _start_server(self) -> None:
        """Start (again) the fork server; call with the lock held."""
        if self._channel is not None:
            self._channel.close()
        if self._server is not None and self._server.poll() is None:
            self._server.kill()
            self._server.wait()
        self._started_at = time.monotonic()
        self._ready = False
        if self._spare is not None:
            self._spare.channel.close()
            self._spare = None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**self.env, scriptmain.LAUNCH_ENV: "0" * scriptmain.LAUNCH_TOKEN_LENGTH}
        try:
            self._server = subprocess.Popen(
                [self.python, str(FORK_SERVER), str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=PROJECT_DIR,
                process_group=0,
                pass_fds=[theirs.fileno()],
            )
        except OSError as exc:
            log.error("the fork server could not start (%s): scripts start cold", exc)
            mine.close()
            self._server = self._channel = None
            return
        finally:
            theirs.close()
        self._channel = mine
        threading.Thread(target=self._read, args=(mine,), name="runner-forkserver-reader", daemon=True).start()

    def _read(self, channel: socket.socket) -> None:
        """Take the server's spares and exit statuses, until it closes."""
        mine: set[int] = set()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 64, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                break
            kind, *fields = message.decode(errors="replace").split()
            try:
                if kind == "spare" and len(fds) == 1:
                    pid = int(fields[0])
                    spare_channel = socket.socket(fileno=fds.pop())
                    spare_channel.set_inheritable(False)
                    spare = _Spare(pid, spare_channel, uuid.uuid4().hex, birth())  # not under the lock a start takes
                    with self._lock:
                        if channel is not self._channel:  # a server given up on: its spare dies with it
                            spare_channel.close()
                            continue
                        if self._spare is not None:
                            self._spare.channel.close()
                        self._spare = spare
                        self._ready = True
                        self._spare_came.notify_all()
                    mine.add(pid)
                elif kind == "exited":
                    self._exited(int(fields[0]), int(fields[1]))
                    mine.discard(int(fields[0]))
                else:
                    raise ValueError(message)
            except (ValueError, IndexError):
                log.error("the fork server said %r", message[:100])
            finally:
                for fd in fds:
                    os.close(fd)
        # The server is gone, and its runs with it (they die with it): their exits are not coming.
        for pid in mine:
            self._exited(pid, -signal.SIGKILL)

    def _exited(self, pid: int, returncode: int) -> None:
        with self._lock:
            if self._spare is not None and self._spare.pid == pid:
                self._spare.channel.close()
                self._spare = None
            process = self._forked.pop(pid, None)
        if process is not None:
            process.exited(returncode)
