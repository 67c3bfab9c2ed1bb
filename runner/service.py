"""The runner: run requests from the bus become script processes, with their logs on the bus.

Flow: a request arrives through the MQTT 5 shared subscription (so runners share the work) on
a durable session, and is acknowledged only once claimed in the database; the claim (a row
keyed by run id) is what makes a run id run once, however often the request is delivered and
whichever runner gets it. Claimed runs wait in order for one of `capacity` workers. A worker
starts the script in its own process group, turns its output into log entries (the runner is
the only publisher of a run's log, so entries are numbered without gaps), enforces the time
limit and cancels, and publishes the final status.

A runner that starts finds its own claims: runs that were running are `lost`, queued ones run.
Ownership is decided in the database (runner/claims.py): a run starts only if its claim moved
from queued to running for this runner; a runner whose heartbeat there stops moving is taken
over (its queued claims run elsewhere, its running ones are `lost`); a runner that finds a
running claim taken from it kills that run and publishes nothing more of it.

Every status and log entry is held in the database (runner/outbox.py) from before it is
published until a recorder confirms it written, and sent again when it is not.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from msgspec.structs import replace
from sqlalchemy.exc import SQLAlchemyError

from hacer import runstates
from hacer.bus import Bus, BusError, Message, named_decoder, payload_decoder
from hacer.messages import (
    FIRE_RUN_PREFIX,
    Entry,
    Launch,
    LogEntry,
    MessageError,
    RecorderState,
    RunnerState,
    RunRequest,
    RunsRecorded,
    RunStatus,
    bus_time,
)
from hacer.parentdeath import kill_with_group
from hacer.runstates import RunState
from hacer.scriptdir import ScriptDir
from hacer.topics import TopicError, Topics
from runner.claims import AlreadyClaimed, ClaimStore, Committed, Hold
from runner.launcher import Launcher, ScriptProcess
from runner.leftovers import Birth, adopted, end_leftovers
from runner.outbox import Outbox
from runner.output import OutputSplitter, read_output
from runner.threads import ThreadPool

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARE_GROUP = "hacer-runners"
# While more log publishes than this wait for the broker, consecutive output lines are sent
# together in one entry (up to BATCH_BYTES), so a fast printer is not held to one line per ack.
BATCH_WHEN_UNCONFIRMED = 64
BATCH_BYTES = 64 * 1024
DB_TRIES = 3  # a claim change that fails for a database error (locked, gone) is tried this often
CONFIRM_EVERY = 0.1  # seconds between applying recorders' confirmations to the outbox
BOUND_EVERY = 5.0  # seconds between checks of the outbox's size
# Seconds between checkpoints of a SQLite WAL: each copies the pages committed since into the
# database file and syncs it, so a page committed every minute was written twice a minute (an SD
# card's wear). Other parts' connections still checkpoint a WAL past 1000 pages themselves.
CHECKPOINT_EVERY = 300.0
OUTPUT_GRACE = 2.0  # seconds the output is still read once the script and its leftovers are gone


@dataclass(frozen=True)
class RunnerConfig:
    """How a runner behaves; see Settings for the environment variables."""

    runner_id: str
    capacity: int = 4
    default_timeout: float = 300.0
    max_timeout: float = 24 * 3600.0
    cancel_grace: float = 5.0
    takeover_after: float = 10.0
    line_limit: int = 8192
    output_limit: int = 64 * 1024 * 1024
    python: str = sys.executable
    script_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """One claimed run, from queued to finished."""

    request: RunRequest
    run_id: str
    script_path: Path
    queued_at: float
    seq: int = 0
    process: ScriptProcess | None = None
    launch_token: str = ""
    birth: Birth = Birth(-1, 0)  # when it was launched: its leftovers were created since
    cancel_requested: bool = False
    timed_out: bool = False
    started_at: float | None = None
    fenced: bool = False  # another runner owns it now: publish nothing more of it
    output_deadline: float | None = None  # monotonic: when reading its output stops, whoever holds the pipe
    lock: threading.Lock = field(default_factory=threading.Lock)


class Runner:
    """See the module docstring. Does nothing until start()."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        claims: ClaimStore,
        scripts: ScriptDir,
        config: RunnerConfig,
        outbox: Outbox,
        launcher: Launcher,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> None:
        self.bus = bus
        self.launcher = launcher
        self.checkpoint = checkpoint  # the database's upkeep, done by the heartbeat thread
        self.topics = topics
        self.claims = claims
        self.scripts = scripts
        self.config = config
        self.outbox = outbox
        self.clock = clock
        self.forged_fires = 0  # requests under an automation fire's run id that no scheduler stored
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._waiting: deque[Run] = deque()
        self._started: deque[Run] = deque()  # started by the dispatcher, for a worker to follow
        self._running: dict[str, Run] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._stopped = threading.Event()
        self._resend_all = threading.Event()
        self._threads: list[threading.Thread] = []
        self._recorders_online: set[str] = set()
        # A thread a run keeps its time limit and reaps it; a new one (and a Timer thread for the
        # limit) cost the first line 0.3-0.5 ms, the script's output waiting in the pipe meanwhile.
        self._reapers = ThreadPool("runner-reaper")
        self.unheld = 0  # messages the outbox could not keep (database failing): sent once

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Beat once, subscribe, start the workers, then recover this runner's earlier claims."""
        self.claims.beat()
        self.launcher.start()  # waits for the fork server's imports (0.3 s), so the first runs are forked too
        self.outbox.adopt(self.config.runner_id)  # what this runner's earlier process still held
        self.bus.birth = self._state_payload()
        self.bus.subscribe(
            self.topics.shared(self.bus.private_group(SHARE_GROUP), self.topics.build("run_request")),
            self._on_request,
            manual_ack=True,
        )
        self.bus.subscribe(self.topics.filter("run_cancel"), self._on_cancel)
        self.bus.subscribe_decoded(
            self.topics.build("runs_recorded"), payload_decoder(RunsRecorded.from_payload), self._on_recorded, qos=0
        )
        self.bus.subscribe_decoded(
            self.topics.filter("recorder_state"),
            named_decoder(self.topics, RecorderState.from_payload, lambda state: state.recorder, "recorder"),
            self._on_recorder_state,
        )
        self.bus.on_connect(lambda session_present: self._resend_all.set())
        self._spawn_thread(self._dispatch, "runner-dispatch")
        for index in range(self.config.capacity):
            self._spawn_thread(self._work, f"runner-worker-{index}")
        self._spawn_thread(self._heartbeat, "runner-heartbeat")
        self._spawn_thread(self._resend, "runner-resend")
        self.bus.start()
        self._inbox.put(lambda: self._recover(self.config.runner_id))

    def stop(self) -> None:
        """Stop taking runs, end the running ones (cancelled) and leave the bus.

        Runs still waiting stay claimed: this runner resumes them when it starts again, or
        another runner takes them over once it sees this one offline.
        """
        with self._changed:
            self._stopping = True
            running = list(self._running.values())
            self._changed.notify_all()
        self._stopped.set()
        for run in running:
            self._cancel(run, "runner stopped")
        self._inbox.put(lambda: None)
        for thread in self._threads:
            thread.join(self.config.cancel_grace + 5)
        self.launcher.stop()
        self.bus.will = RunnerState(self.config.runner_id, "offline").to_payload()
        self.bus.stop()

    def _spawn_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- bus callbacks (paho's thread: hand over, never block) -----------------------------

    def _on_request(self, message: Message) -> None:
        self._inbox.put(lambda: self._accept(message))

    def _on_cancel(self, message: Message) -> None:
        try:
            _, run_id = self.topics.parse(message.topic)
        except TopicError:
            return
        if run_id:
            self._inbox.put(lambda: self._cancel_by_id(run_id))

    def _on_recorded(self, recorded: RunsRecorded) -> None:
        for run in recorded.recorded():
            self.outbox.confirm(run)

    def _on_recorder_state(self, state: RecorderState) -> None:
        if state.state == "online":
            self._recorders_online.add(state.recorder)
        else:
            self._recorders_online.discard(state.recorder)

    # --- dispatcher thread ------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping:
            task = self._inbox.get()
            try:
                task()
            except Exception:
                log.exception("runner task failed")

    def _accept(self, message: Message) -> None:
        """Validate and claim one request; acknowledge it once the claim (or refusal) is durable."""
        try:
            request = RunRequest.from_payload(message.payload)
        except MessageError as exc:
            self._refuse(RunRequest.run_id_of(message.payload), None, f"bad run request: {exc}")
            self.bus.ack(message)
            return
        run_id = request.run_id or uuid.uuid4().hex
        if run_id.startswith(FIRE_RUN_PREFIX):
            fired = self._as_fired(run_id)
            if fired is None:
                self.bus.ack(message)
                return
            request = fired
        script = self.scripts.find(request.script)
        if script is None:
            self._refuse(run_id, request, f"no script named {request.script!r} in {self.scripts.folder.name}/")
            self.bus.ack(message)
            return
        run = Run(replace(request, run_id=run_id), run_id, script.path, self.clock())
        with self._changed:
            start_now = not self._stopping and len(self._running) + len(self._waiting) < self.config.capacity
            if start_now:  # a worker is free: take its slot, start the run here, let the worker follow it
                self._running[run_id] = run
        if start_now:
            started = self._guarded(run, lambda: self._start(run, message))
            with self._changed:
                if started:
                    self._started.append(run)
                    self._changed.notify()
                else:
                    self._running.pop(run_id, None)
            return
        if self._claim_or_refuse(run, message, runstates.QUEUED):
            self._enqueue(run)

    def _as_fired(self, run_id: str) -> RunRequest | None:
        """An automation fire's request as the scheduler stored it, whoever sent this one; None: no such fire.

        A fire's run id is predictable: a request under it that no scheduler stored is dropped without a
        claim (a refusal would take the id from the fire to come), and a stored one runs with the
        automation's parameters, whatever the message said.
        """
        try:
            stored = self._with_retries(f"reading the fire of run {run_id}", lambda: self.claims.fire_request(run_id))
        except SQLAlchemyError as exc:  # the recorders send a queued fire's request again
            log.warning("run %s: its fire could not be read (%s); the request is sent again later", run_id, exc)
            return None
        if stored is None:
            self.forged_fires += 1
            log.warning("run %s: no automation fired it, request dropped (not the scheduler's)", run_id)
            return None
        try:
            return RunRequest.from_payload(stored)
        except MessageError as exc:
            log.error("run %s: its stored request cannot be read: %s", run_id, exc)
            return None

    def _claim_or_refuse(
        self, run: Run, message: Message, state: RunState, also: Hold | None = None, committed: Committed | None = None
    ) -> bool:
        """Claim a run and acknowledge its request; tell whether the claim is this runner's."""
        try:
            self._claim(run.run_id, run.request, state, also, committed)
        except AlreadyClaimed:
            log.info("run %s already claimed: duplicate delivery ignored", run.run_id)
            self._say_how_it_ended(run.run_id)
            self.bus.ack(message)
            return False
        except SQLAlchemyError as exc:
            self._report_unclaimed(run.run_id, run.request, f"database error, the run was not claimed: {exc}")
            self.bus.ack(message)
            return False
        self.bus.ack(message)
        return True

    def _say_how_it_ended(self, run_id: str) -> None:
        """Publish again how a finished run ended, as recorded: a requester that was away then stops asking.

        Requesters send until they see a status; one that missed every status of its run would
        otherwise send its request, refused as a duplicate, forever.
        """
        try:
            ended = self.claims.recorded_end(run_id)
        except SQLAlchemyError:
            return  # it asks again, and is answered then
        if ended is not None:
            self.bus.publish(self.topics.build("run_status", run_id), ended.to_payload())

    def _claim(
        self, run_id: str, request: RunRequest, state: str, also: Hold | None = None, committed: Committed | None = None
    ) -> None:
        """Claim a run id, trying again a few times while the database is busy or away."""
        payload = request.to_payload().decode()
        self._with_retries(f"claiming run {run_id}", lambda: self.claims.claim(run_id, payload, state, also, committed))

    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        """Call a database operation, again a few times while the database is busy or away."""
        for attempt in range(DB_TRIES):
            try:
                return call()
            except AlreadyClaimed:
                raise
            except SQLAlchemyError as exc:
                if attempt == DB_TRIES - 1:
                    raise
                log.warning("%s failed (%s); trying again", what, str(exc).splitlines()[0])
                self._stopped.wait(1.0)
        raise AssertionError("unreachable")

    def _enqueue(self, run: Run) -> None:
        self._publish_status(run, runstates.QUEUED)
        with self._changed:
            self._waiting.append(run)
            self._changed.notify()
        self._publish_state()

    def _refuse(self, run_id: str | None, request: RunRequest | None, why: str) -> None:
        """Report a request that cannot run (a `failed` status and an exception entry).

        The refusal claims its run id first (as failed), so a request reusing a live run's id
        cannot write into that run.
        """
        request = replace(request or RunRequest("", ()), run_id=run_id or uuid.uuid4().hex)
        assert request.run_id is not None
        try:
            self._claim(request.run_id, request, runstates.FAILED)
        except AlreadyClaimed:
            log.warning("refused a request for run %s, which exists already: %s", request.run_id, why)
            return
        except SQLAlchemyError as exc:
            why = f"{why}; and the database failed: {exc}"
        self._report_unclaimed(request.run_id, request, why)

    def _report_unclaimed(self, run_id: str, request: RunRequest, why: str) -> None:
        log.warning("run %s refused: %s", run_id, why)
        run = Run(request, run_id, Path(), self.clock())
        ending: list[Entry] = [("exception", why), ("exit_status", "failed")]
        self._publish_status(run, runstates.FAILED, error=why[:2000], finished=True, entries=ending)

    def _cancel_by_id(self, run_id: str) -> None:
        with self._changed:
            waiting = next((r for r in self._waiting if r.run_id == run_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            running = self._running.get(run_id)
        if waiting is not None:
            if self.claims.move(run_id, from_states=(runstates.QUEUED,), state=runstates.CANCELLED):
                self._publish_status(
                    waiting,
                    runstates.CANCELLED,
                    error="cancelled before it started",
                    finished=True,
                    entries=[("exit_status", "failed")],
                )
            self._publish_state()
        elif running is not None:
            self._cancel(running, "cancelled")

    # --- claims of runners that are gone ----------------------------------------------------

    def _recover(self, runner_id: str) -> None:
        """Report `runner_id`'s running claims lost and queue its waiting ones here (each move fenced)."""
        for claim in self.claims.active_claims(runner_id):
            try:
                request = RunRequest.from_payload(claim.request)
            except MessageError:
                continue
            script = self.scripts.find(request.script)
            run = Run(request, claim.run_id, Path(), claim.claimed_at)
            if claim.state == runstates.RUNNING:
                if self.claims.move(
                    claim.run_id, owner=runner_id, from_states=(runstates.RUNNING,), state=runstates.LOST
                ):
                    # Never run again (it may have done its work): its log's last entry says how far it got.
                    so_far = self.claims.log_so_far(claim.run_id)
                    why = f"runner {runner_id} went away while it ran; {so_far.account()}; it is not run again"
                    run.seq = so_far.last_seq
                    ending: list[Entry] = [("exception", why), ("exit_status", "failed")]
                    self._publish_status(run, runstates.LOST, error=why[:2000], finished=True, entries=ending)
            elif script is None:
                if self.claims.move(
                    claim.run_id, owner=runner_id, from_states=(runstates.QUEUED,), state=runstates.FAILED
                ):
                    self._report_unclaimed(
                        run.run_id,
                        request,
                        f"no script named {request.script!r} any more in {self.scripts.folder.name}/",
                    )
            elif self.claims.move(
                claim.run_id, owner=runner_id, from_states=(runstates.QUEUED,), new_owner=self.config.runner_id
            ):
                log.info("resuming run %s (claimed by %s)", claim.run_id, runner_id)
                self._enqueue(Run(request, claim.run_id, script.path, self.clock()))

    # --- heartbeat, fences, takeover, resends -----------------------------------------------

    def _heartbeat(self) -> None:
        """Beat; stop the runs taken from this runner; take over the runners that stopped beating."""
        interval = max(0.05, self.config.takeover_after / 4)
        checkpoint_due = time.monotonic() + CHECKPOINT_EVERY
        while not self._stopped.wait(interval):
            try:
                silent, watched = self.claims.watch_others(self.config.takeover_after)
                if watched:  # alone, a beat is a disk write no one reads (runner/claims.py)
                    self.claims.beat()
                with self._changed:
                    running = [run for run in self._running.values() if run.started_at is not None and not run.fenced]
                for run_id in self.claims.taken([run.run_id for run in running]):
                    self._fence(next(run for run in running if run.run_id == run_id))
                for runner_id in silent:
                    self._inbox.put(functools.partial(self._take_over, runner_id))
                if time.monotonic() >= checkpoint_due:
                    checkpoint_due = time.monotonic() + CHECKPOINT_EVERY
                    self.checkpoint()
            except SQLAlchemyError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _take_over(self, runner_id: str) -> None:
        if self._stopping:
            return
        held = self.outbox.adopt(runner_id)  # first: what it published and no recorder confirmed
        if held or self.claims.active_claims(runner_id):
            log.warning(
                "runner %s has stopped beating: taking over its claims and %d unconfirmed message(s)", runner_id, held
            )
            self._recover(runner_id)  # before the resend: a `lost` replaces a held `running`
            self._resend_all.set()

    def _fence(self, run: Run) -> None:
        """Another runner owns this run now: end it and publish nothing more of it."""
        log.error("run %s was taken over by another runner: ending it here", run.run_id)
        with run.lock:
            run.fenced = True
            process = run.process
        self.outbox.forget(run.run_id)
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)

    def _resend(self) -> None:
        """Let go of what recorders confirmed; send again what they did not, all of it after a reconnect."""
        next_check = next_bound = 0.0
        while not self._stopped.is_set():
            everything = self._resend_all.wait(CONFIRM_EVERY)
            try:
                self.outbox.apply()
                now = time.monotonic()
                if now >= next_bound:
                    self.outbox.bound()
                    next_bound = now + BOUND_EVERY
                if not self.bus.connected or not (everything or (self._recorders_online and now >= next_check)):
                    continue
                self._resend_all.clear()
                next_check = now + max(0.05, self.outbox.resend_after / 2)
                for topic, payload in self.outbox.due(everything):
                    self.bus.publish(topic, payload)
            except (BusError, SQLAlchemyError) as exc:
                log.warning("sending unconfirmed messages again failed: %s", exc)

    # --- workers ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._started and not self._waiting and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                started = bool(self._started)
                if started:  # started by the dispatcher (its slot taken then): follow it
                    run = self._started.popleft()
                else:
                    run = self._waiting.popleft()
                    self._running[run.run_id] = run
            self._publish_state()
            try:
                self._guarded(run, functools.partial(self._carry, run, started))
            finally:
                with self._changed:
                    self._running.pop(run.run_id, None)
                self._publish_state()

    def _carry(self, run: Run, started: bool) -> None:
        """Start a run (unless the dispatcher did), then follow it to its end."""
        if started or self._start(run):
            self._follow(run)

    def _guarded(self, run: Run, step: Callable[[], object]) -> bool:
        """Do a step of a run; a runner error in it ends the run `failed`. Tell whether it went through."""
        try:
            return step() is not False
        except Exception as exc:
            log.exception("run %s failed inside the runner", run.run_id)
            try:
                self._finish(run, runstates.FAILED, error=f"runner error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("run %s could not be reported failed", run.run_id)
            return False

    def _start(self, run: Run, request_message: Message | None = None) -> bool:
        """Claim a run as running and launch its script; tell whether it is this runner's.

        A run not claimed yet (a worker was free when its `request_message` came) is claimed
        straight as running, and the request acknowledged; a queued one moves to running.
        """
        request = run.request
        run.started_at = self.clock()
        status = self._status_message(run, runstates.RUNNING)
        launch = self._entry_messages(run, ("launch", Launch(request.script, request.params).to_data()))

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
                claimed = self._claim_or_refuse(
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

    def _follow(self, run: Run) -> None:
        """Follow a started run to its end, publishing its log and status."""
        request = run.request
        if run.process is None:  # cancelled or taken between leaving the queue and its launch
            self._finish(run, runstates.CANCELLED, error="cancelled")
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
        self._finish(run, state, exit_code=exit_code, error=error)

    def _finish(self, run: Run, state: RunState, exit_code: int | None = None, error: str | None = None) -> None:
        """End a run's claim, then its log and status, if the claim is still this runner's."""
        exception: list[Entry] = [("exception", error)] if error and state == runstates.FAILED else []
        ending = self._entry_messages(
            run, *exception, ("exit_status", "success" if state == runstates.SUCCEEDED else "failed")
        )
        status = self._status_message(run, state, exit_code, error, finished=True)

        def hold_end(driver: Any) -> None:  # in the claim's transaction: a run's end is one commit
            self.outbox.hold(run.run_id, ending, (state, *status), driver)

        # Not synced (a sync a run, an SD card's wear): a power cut that rolls the end back, with
        # the recorder's unsynced copy of it, leaves the run `lost` on restart, never run again.
        try:
            owned = not run.fenced and self._with_retries(
                f"ending the claim of run {run.run_id}",
                lambda: self.claims.move(run.run_id, state=state, also=hold_end, sync=False),
            )
        except SQLAlchemyError as exc:
            # Its end is still told: the recorder keeps a run's first end, and a runner taking the
            # claim over meanwhile could only have reported it lost.
            log.error("run %s ended as %s but its claim could not be ended: %s", run.run_id, state, exc)
            self._hold(run.run_id, lambda: hold_end(None))
            owned = True
        if not owned:
            log.warning("run %s ended here as %s, but another runner owns it now: not reported", run.run_id, state)
            return
        for _, topic, payload in ending:
            self.bus.publish(topic, payload)
        self.bus.publish(*status)

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
        self._log(run, *out)

    def _reap_group(self, run: Run, pipe: int, timeout: float) -> None:
        """Keep the run's time limit; once the script exits, end what it left running, in its group and outside it."""
        assert run.process is not None
        try:
            run.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._time_out(run)
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

    def _time_out(self, run: Run) -> None:
        run.timed_out = True
        self._cancel(run, "time limit")

    def _cancel(self, run: Run, why: str) -> None:
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

    # --- publishing -------------------------------------------------------------------------

    def _log(self, run: Run, *entries: Entry) -> None:
        """Publish (entry_type, data) entries, held in the outbox first."""
        if run.fenced or not entries:
            return
        held = self._entry_messages(run, *entries)
        self._hold(run.run_id, lambda: self.outbox.hold(run.run_id, held))
        for _, topic, payload in held:
            self.bus.publish(topic, payload)

    def _entry_messages(self, run: Run, *entries: Entry) -> list[tuple[int, str, bytes]]:
        """Number (entry_type, data) entries of a run: (seq, topic, payload) each."""
        topic, now, messages = self.topics.build("run_log", run.run_id), bus_time(self.clock()), []
        for entry_type, data in entries:
            run.seq += 1
            messages.append((run.seq, topic, LogEntry(run.run_id, run.seq, now, entry_type, data).to_payload()))
        return messages

    def _publish_status(
        self,
        run: Run,
        state: RunState,
        exit_code: int | None = None,
        error: str | None = None,
        finished: bool = False,
        entries: Sequence[Entry] = (),
    ) -> None:
        """Publish a run's status after `entries`, all held in the outbox (written down) first."""
        if run.fenced:
            return
        held = self._entry_messages(run, *entries)
        topic, payload = self._status_message(run, state, exit_code, error, finished)
        self._hold(run.run_id, lambda: self.outbox.hold(run.run_id, held, status=(state, topic, payload)))
        for _, entry_topic, entry_payload in held:
            self.bus.publish(entry_topic, entry_payload)
        self.bus.publish(topic, payload)

    def _status_message(
        self, run: Run, state: RunState, exit_code: int | None = None, error: str | None = None, finished: bool = False
    ) -> tuple[str, bytes]:
        """The (topic, payload) of a run's status."""
        now = bus_time(self.clock())
        status = RunStatus(
            run.run_id,
            run.request.script,
            run.request.params,
            state,
            self.config.runner_id,
            exit_code,
            bus_time(run.queued_at),
            None if run.started_at is None else bus_time(run.started_at),
            now if finished else None,
            error,
            run.request.requested_by,
        )
        return self.topics.build("run_status", run.run_id), status.to_payload()

    def _hold(self, run_id: str, hold: Callable[[], None]) -> None:
        """Keep a message in the outbox; when the database cannot, it is still sent, once."""
        try:
            hold()
        except SQLAlchemyError as exc:
            self.unheld += 1
            log.warning(
                "run %s: a message sent without being held (the database failed: %s)", run_id, str(exc).splitlines()[0]
            )

    def _state_payload(self) -> bytes:
        with self._changed:
            running = tuple(self._running)
            waiting = len(self._waiting)
        return RunnerState(self.config.runner_id, "online", self.config.capacity, running, waiting).to_payload()

    def _publish_state(self) -> None:
        payload = self._state_payload()
        self.bus.birth = payload
        self.bus.publish(self.topics.build("runner_state", self.config.runner_id), payload, retain=True)


def _signal_group(pgid: int, signum: int) -> bool:
    """Signal a process group; tell whether any process was left in it."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
