"""A claimed run from its start to its end: launch, output, time limit, cancel, the end's report."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.messages import Entry, Launch
from hacer.parentdeath import kill_with_group
from hacer.runstates import RunState
from runner.claiming import Claimer
from runner.claims import ClaimStore
from runner.launcher import Launcher
from runner.leftovers import adopted, end_leftovers
from runner.outbox import Outbox
from runner.output import OutputSplitter, read_output
from runner.publishing import RunPublisher
from runner.run import Run, RunnerConfig
from runner.threads import ThreadPool

log = logging.getLogger(__name__)

# While more log publishes than this wait for the broker, consecutive output lines are sent
# together in one entry (up to BATCH_BYTES), so a fast printer is not held to one line per ack.
BATCH_WHEN_UNCONFIRMED = 64
BATCH_BYTES = 64 * 1024
OUTPUT_GRACE = 2.0  # seconds the output is still read once the script and its leftovers are gone


class RunDriver:
    """Starts claimed runs, follows them to their end and reports it, if the run is still this runner's."""

    def __init__(
        self,
        bus: Bus,
        claims: ClaimStore,
        claimer: Claimer,
        publisher: RunPublisher,
        outbox: Outbox,
        launcher: Launcher,
        config: RunnerConfig,
        clock: Callable[[], float],
    ) -> None:
        self.bus = bus
        self.claims = claims
        self.claimer = claimer
        self.publisher = publisher
        self.outbox = outbox
        self.launcher = launcher
        self.config = config
        self.clock = clock
        # A thread a run keeps its time limit and reaps it; a new one (and a Timer thread for the
        # limit) cost the first line 0.3-0.5 ms, the script's output waiting in the pipe meanwhile.
        self._reapers = ThreadPool("runner-reaper")

    def guarded(self, run: Run, step: Callable[[], object]) -> bool:
        """Do a step of a run; a runner error in it ends the run `failed`. Tell whether it went through."""
        try:
            return step() is not False
        except Exception as exc:
            log.exception("run %s failed inside the runner", run.run_id)
            try:
                self.finish(run, runstates.FAILED, error=f"runner error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("run %s could not be reported failed", run.run_id)
            return False

    def start(self, run: Run, request_message: Message | None = None) -> bool:
        """Claim a run as running and launch its script; tell whether it is this runner's.

        A run not claimed yet (a worker was free when its `request_message` came) is claimed
        straight as running, and the request acknowledged; a queued one moves to running.
        """
        request = run.request
        run.started_at = self.clock()
        status = self.publisher.status_message(run, runstates.RUNNING)
        launch = self.publisher.entry_messages(run, ("launch", Launch(request.script, request.params).to_data()))

        def hold_start(driver: Any) -> None:
            # Letting go of confirmed rows waits for a later write: this commit is synced, before the start.
            self.outbox.hold(run.run_id, launch, (runstates.RUNNING, *status), driver, let_go=False)

        start = (run.run_id, run.script_path, request.params)

        def publish_launch_and_prepare() -> None:
            # Once committed, while the commit is synced: a launch entry stops no requester (a
            # status does), and a recorder that kept it kept the claim before it in the same WAL.
            # The spare gets the script ready meanwhile; none of it runs before the sync is done.
            for _, topic, payload in launch:
                self.bus.publish(topic, payload)
            with run.lock:  # a cancel or a fence from now on finds the process
                prepared = None if run.cancel_requested or run.fenced else self.launcher.prepare(*start)
                if prepared is not None:
                    run.process, run.launch_token, run.birth = prepared

        try:
            # The claim's transaction holds the run's first messages too: one commit before the start.
            if request_message is not None:
                claimed = self.claimer.claim_or_refuse(
                    run, request_message, runstates.RUNNING, hold_start, publish_launch_and_prepare
                )
            else:
                claimed = self.claims.move(
                    run.run_id,
                    from_states=(runstates.QUEUED,),
                    state=runstates.RUNNING,
                    also=hold_start,
                    committed=publish_launch_and_prepare,
                )
        except BaseException:
            with run.lock:
                prepared, run.process = run.process, None
            if prepared is not None:  # the claim may not be on disk: none of the run may run
                self.launcher.let_go(prepared)
            raise
        if not claimed:
            if request_message is None:
                log.warning("run %s is no longer this runner's to start: dropped", run.run_id)
            return False
        with run.lock:
            if run.process is not None:
                self.launcher.go(run.process)
            elif not (run.cancel_requested or run.fenced):  # no spare to be had: a cold start
                run.process, run.launch_token, run.birth = self.launcher.launch(*start)
        # Queued for the bus (a tenth of a millisecond): it does not wait on the script, nor the
        # script on it.
        self.bus.publish(*status)
        return True

    def follow(self, run: Run) -> None:
        """Follow a started run to its end, publishing its log and status."""
        request = run.request
        if run.process is None:  # cancelled or taken between leaving the queue and its launch
            self.finish(run, runstates.CANCELLED, error="cancelled")
            return
        timeout = min(request.timeout or self.config.default_timeout, self.config.max_timeout)
        assert run.process.stdout is not None
        # The reaper's own copy of the pipe's read end: the pipe (and its inode number, which
        # finds the processes holding it) cannot go to another run's pipe before it is done.
        pipe = os.dup(run.process.stdout.fileno())
        self._reapers.submit(functools.partial(self._reap_group, run, pipe, timeout))
        self._stream_output(run)
        exit_code = run.process.wait()
        state: RunState
        if run.cancel_requested:
            state = runstates.CANCELLED
        elif run.timed_out:
            state = runstates.TIMED_OUT
        else:
            state = runstates.SUCCEEDED if exit_code == 0 else runstates.FAILED
        error = {runstates.TIMED_OUT: f"time limit of {timeout:g} s reached", runstates.CANCELLED: "cancelled"}.get(
            state
        )
        self.finish(run, state, exit_code=exit_code, error=error)

    def finish(self, run: Run, state: RunState, exit_code: int | None = None, error: str | None = None) -> None:
        """End a run's claim, then its log and status, if the claim is still this runner's."""
        exception: list[Entry] = [("exception", error)] if error and state == runstates.FAILED else []
        ending = self.publisher.entry_messages(
            run, *exception, ("exit_status", "success" if state == runstates.SUCCEEDED else "failed")
        )
        status = self.publisher.status_message(run, state, exit_code, error, finished=True)

        def hold_end(driver: Any) -> None:  # in the claim's transaction: a run's end is one commit
            self.outbox.hold(run.run_id, ending, (state, *status), driver)

        # Not synced (a sync a run, an SD card's wear): a power cut that rolls the end back, with
        # the recorder's unsynced copy of it, leaves the run `lost` on restart, never run again.
        try:
            owned = not run.fenced and self.claimer.with_retries(
                f"ending the claim of run {run.run_id}",
                lambda: self.claims.move(run.run_id, state=state, also=hold_end, sync=False),
            )
        except SQLAlchemyError as exc:
            # Its end is still told: the recorder keeps a run's first end, and a runner taking the
            # claim over meanwhile could only have reported it lost.
            log.error("run %s ended as %s but its claim could not be ended: %s", run.run_id, state, exc)
            self.publisher.hold(run.run_id, lambda: hold_end(None))
            owned = True
        if not owned:
            log.warning("run %s ended here as %s, but another runner owns it now: not reported", run.run_id, state)
            return
        for _, topic, payload in ending:
            self.bus.publish(topic, payload)
        self.bus.publish(*status)

    def cancel(self, run: Run, why: str) -> None:
        """End a run's whole process group: TERM, a grace period, then KILL."""
        with run.lock:
            if why != "time limit":
                run.cancel_requested = True
            process = run.process
        if process is None or process.poll() is not None:
            return
        log.info("ending run %s (%s)", run.run_id, why)
        escaped = adopted(process.pid)  # left its group (setsid, env -i): still its process's child
        for pid in escaped:
            kill_with_group(pid, signal.SIGTERM)
        _signal_group(process.pid, signal.SIGTERM)

        def kill_after_grace() -> None:
            try:
                process.wait(self.config.cancel_grace)
            except subprocess.TimeoutExpired:
                pass
            for pid in escaped:
                kill_with_group(pid)
            _signal_group(process.pid, signal.SIGKILL)

        threading.Thread(target=kill_after_grace, daemon=True).start()

    def fence(self, run: Run) -> None:
        """Another runner owns this run now: end it and publish nothing more of it."""
        log.error("run %s was taken over by another runner: ending it here", run.run_id)
        with run.lock:
            run.fenced = True
            process = run.process
        self.outbox.forget(run.run_id)
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)

    def _stream_output(self, run: Run) -> None:
        assert run.process is not None and run.process.stdout is not None
        read_output(
            run.process.stdout.fileno(),
            OutputSplitter(self.config.line_limit, self.config.output_limit),
            lambda: run.output_deadline,
            lambda entries: self._log_entries(run, entries),
        )
        run.process.stdout.close()

    def _log_entries(self, run: Run, entries: list[Entry]) -> None:
        out: list[Entry] = []
        batch: list[str] = []
        size = 0
        for entry_type, data in entries:
            batching = entry_type == "output" and self.bus.unconfirmed > BATCH_WHEN_UNCONFIRMED
            if batch and (not batching or size + len(data) > BATCH_BYTES):
                out.append(("output", "\n".join(batch)))
                batch, size = [], 0
            if batching:
                batch.append(data)
                size += len(data) + 1
            else:
                out.append((entry_type, data))
        if batch:
            out.append(("output", "\n".join(batch)))
        self.publisher.log(run, *out)

    def _reap_group(self, run: Run, pipe: int, timeout: float) -> None:
        """Keep the run's time limit; once the script exits, end what it left running, in its group and outside it."""
        assert run.process is not None
        try:
            run.process.wait(timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            self.cancel(run, "time limit")
            run.process.wait()
        if _signal_group(run.process.pid, signal.SIGTERM):
            time.sleep(0.2)  # a moment for the leftovers to exit cleanly before the kill
            _signal_group(run.process.pid, signal.SIGKILL)
        try:
            left = end_leftovers(run.run_id, run.launch_token, run.birth, os.fstat(pipe).st_ino)
        finally:
            os.close(pipe)
        if left:
            log.warning(
                "run %s: ended %d process(es) it left outside its process group: %s",
                run.run_id,
                len(left),
                " ".join(map(str, left)),
            )
        run.output_deadline = time.monotonic() + OUTPUT_GRACE


def _signal_group(pgid: int, signum: int) -> bool:
    """Signal a process group; tell whether any process was left in it."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
