"""runserver's supervisor: the server's parts as its children, their output prefixed, each restarted when it dies.

The supervisor can import once what the parts use (paho, SQLAlchemy, msgspec, hacer's core), then
fork each part from itself: those modules' pages stay shared copy-on-write as far as the parts
leave them unwritten (bench/bench_memory.py). A part that needs a fresh interpreter execs one.
Forking is only safe in a single-threaded process, so one loop does everything: it starts, reads,
reaps and stops the children.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import selectors
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from hacer.lifecycle import name_process
from hacer.parentdeath import PARENT_ENV, adopt_orphans, children_of, die_with_parent, kill_with_group
from hacer.settings import PROJECT_DIR

log = logging.getLogger("hacer.supervisor")

# What every non-web part imports: loaded before the first fork, shared by those forked after.
COMMON_MODULES = ("hacer.bus", "hacer.models", "hacer.messages", "hacer.topics", "hacer.runstates", "hacer.logs")
RESTART_AFTER = 1.0  # seconds between a part's death and its next start
READY_WITHIN = 10.0  # seconds a part with a readiness check gets before the parts after it start
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass
class Part:
    """A child to keep running: `main` runs in the forked process and should not return until told to stop."""

    name: str
    main: Callable[[], None]
    # Checked after the part's first start, before the next parts start (the broker: its port answers).
    ready: Callable[[], bool] | None = None
    stops_last: bool = False  # stopped once the others have (the broker: they say `offline` through it)
    pid: int = 0
    output: int = -1
    pending: bytes = b""
    exited_at: float = -RESTART_AFTER


def preload(modules: tuple[str, ...] = COMMON_MODULES) -> None:
    """Import `modules` and keep their objects out of the collector, so that children share their pages."""
    for module in modules:
        importlib.import_module(module)
    gc.collect()
    # A collection writes to every object it scans: frozen ones stay untouched in every child.
    gc.freeze()


def exec_manage(*command: str) -> Callable[[], None]:
    """A part's main that replaces the forked child with `manage.py <command>` (a fresh interpreter)."""

    def main() -> None:
        os.execv(sys.executable, [sys.executable, str(PROJECT_DIR / "manage.py"), *command])

    return main


class Supervisor:
    """Keeps `parts` running as forked children until `stop()`; their lines go to stderr, prefixed."""

    def __init__(self, parts: list[Part], prefixed: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.parts = parts
        self.prefixed = prefixed
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.wakeup_read, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_write, False)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ)

    def stop(self, *_: object) -> None:
        """Ask run() to stop the children and return (safe from a signal handler)."""
        self.stopping = True
        try:
            os.write(self.wakeup_write, b"\0")
        except BlockingIOError:
            pass

    def run(self) -> None:
        """Start the parts, restart any that dies, until stop(); then stop them (SIGTERM, SIGKILL after 15 s).

        What a part leaves when it dies (a SIGKILLed runner's scripts and their children) is given to
        this process, not to init, and ended here: nothing but the parts is this process's child.
        """
        adopt_orphans()
        try:
            for part in self.parts:  # the first start, in order, each ready before the next
                self._start(part)
                deadline = self.clock() + READY_WITHIN
                while part.ready is not None and part.pid and not part.ready() and self.clock() < deadline:
                    self._pump(timeout=0.02)
            while not self.stopping:
                now = self.clock()
                for part in self.parts:
                    if not part.pid and now - part.exited_at >= RESTART_AFTER and not self.stopping:
                        self._start(part)
                self._pump(timeout=RESTART_AFTER)
        finally:
            self._stop_children(grace=15.0)

    def _start(self, part: Part) -> None:
        read_end, write_end = os.pipe()
        inherited = [key.fd for key in self.selector.get_map().values()] + [self.wakeup_write, self.selector.fileno()]
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        # Held until the child has its own handlers: a stop signal sent the moment after the fork
        # would run this process's handler in the child, and the part would never see it.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                self._become(part, parent, write_end, inherited)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        os.close(write_end)
        # Read without blocking: a grandchild (the runner's fork server) may hold the pipe past its part.
        os.set_blocking(read_end, False)
        part.pid, part.output, part.pending = pid, read_end, b""
        self.selector.register(read_end, selectors.EVENT_READ, part)

    def _become(self, part: Part, parent: int, output: int, inherited: list[int]) -> None:
        """In the forked child: its output to the pipe, its own signals, its name; then its main. Never returns."""
        code = 1
        try:
            os.dup2(output, 1)
            os.dup2(output, 2)
            for fd in [output, *inherited]:
                os.close(fd)
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one sent meanwhile ends it now
            die_with_parent(parent)
            os.environ[PARENT_ENV] = str(parent)  # for a part that execs: its parent is now this one
            name_process(f"hacer-{part.name}")
            part.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _pump(self, timeout: float) -> None:
        """Copy what the children wrote, then reap the ones that ended."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                os.read(self.wakeup_read, 512)
                continue
            self._copy(key.data)
        for part in self.parts:
            if part.pid:
                pid, status = os.waitpid(part.pid, os.WNOHANG)
                if pid:
                    self._ended(part, os.waitstatus_to_exitcode(status))
        self._end_orphans()

    def _end_orphans(self) -> None:
        parts = {part.pid for part in self.parts}
        for pid in children_of(os.getpid()):
            if pid not in parts:
                if self.stopping:  # e.g. the runner's fork server, a moment from ending with its part
                    log.debug("ended process %d, left by a part that stopped", pid)
                else:
                    log.warning("ended process %d, left behind by a part that died", pid)
                kill_with_group(pid)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:  # reaped meanwhile
                    pass

    def _copy(self, part: Part) -> bool:
        """Copy what `part` has written; False when there was nothing to read."""
        try:
            data = os.read(part.output, 65536)
        except BlockingIOError:
            return False
        if not data:
            self._close_output(part)
            return False
        lines = (part.pending + data).split(b"\n")
        part.pending = lines.pop()
        self._write(part, lines)
        return True

    def _write(self, part: Part, lines: list[bytes]) -> None:
        prefix = f"{part.name:>8} | " if self.prefixed else ""
        sys.stderr.write("".join(f"{prefix}{line.decode(errors='replace')}\n" for line in lines))
        sys.stderr.flush()

    def _close_output(self, part: Part) -> None:
        if part.output >= 0:
            if part.pending:
                self._write(part, [part.pending])
            self.selector.unregister(part.output)
            os.close(part.output)
            part.output = -1

    def _ended(self, part: Part, code: int) -> None:
        while part.output >= 0 and self._copy(part):  # what it wrote last, before saying it ended
            pass
        self._close_output(part)
        if not self.stopping:
            log.error("%s exited with %s; restarting it", part.name, code)
        part.pid, part.exited_at = 0, self.clock()

    def _stop_children(self, grace: float) -> None:
        for last in (False, True):
            group = [part for part in self.parts if part.stops_last == last]
            for part in group:
                if part.pid:
                    os.kill(part.pid, signal.SIGTERM)
            deadline = self.clock() + grace
            while any(part.pid for part in group) and self.clock() < deadline:
                self._pump(timeout=0.1)
            for part in group:
                if part.pid:
                    os.kill(part.pid, signal.SIGKILL)
                    self._ended(part, os.waitstatus_to_exitcode(os.waitpid(part.pid, 0)[1]))
        self.selector.close()
        os.close(self.wakeup_read)
        os.close(self.wakeup_write)
