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

The Runner wires its parts and keeps the runs' places (waiting, running); the parts each do one
job: claiming (runner/claiming.py), publishing a run (runner/publishing.py), driving a run from
launch to end (runner/driving.py), the heartbeat and the resends (runner/upkeep.py).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from msgspec.structs import replace
from sqlalchemy.exc import SQLAlchemyError

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.messages import FIRE_RUN_PREFIX, Entry, MessageError, RunnerState, RunRequest
from hacer.scriptdir import ScriptDir
from hacer.topics import TopicError, Topics
from runner.claiming import Claimer
from runner.claims import ClaimStore
from runner.driving import RunDriver
from runner.launcher import Launcher
from runner.outbox import Outbox
from runner.publishing import RunPublisher
from runner.run import Run, RunnerConfig
from runner.upkeep import Heartbeat, Resender

__all__ = ["Run", "Runner", "RunnerConfig"]

log = logging.getLogger(__name__)

SHARE_GROUP = "hacer-runners"


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
        self._threads: list[threading.Thread] = []
        self.publisher = RunPublisher(bus, topics, outbox, config.runner_id, clock)
        self.claimer = Claimer(claims, bus, topics, self.publisher, self._stopped)
        self.driver = RunDriver(bus, claims, self.claimer, self.publisher, outbox, launcher, config, clock)
        self.resender = Resender(bus, topics, outbox)
        self.heartbeat = Heartbeat(
            claims,
            config.takeover_after,
            self._started_runs,
            self.driver.fence,
            lambda runner_id: self._inbox.put(functools.partial(self._take_over, runner_id)),
            checkpoint,
        )

    @property
    def unheld(self) -> int:
        """Messages the outbox could not keep (database failing): sent once."""
        return self.publisher.unheld

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
        self.resender.start()
        self._spawn_thread(self._dispatch, "runner-dispatch")
        for index in range(self.config.capacity):
            self._spawn_thread(self._work, f"runner-worker-{index}")
        self._spawn_thread(functools.partial(self.heartbeat.loop, self._stopped), "runner-heartbeat")
        self._spawn_thread(functools.partial(self.resender.loop, self._stopped), "runner-resend")
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
            self.driver.cancel(run, "runner stopped")
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

    def _started_runs(self) -> list[Run]:
        with self._changed:
            return [run for run in self._running.values() if run.started_at is not None and not run.fenced]

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
            self.claimer.refuse(RunRequest.run_id_of(message.payload), None, f"bad run request: {exc}")
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
            self.claimer.refuse(run_id, request, f"no script named {request.script!r} in {self.scripts.folder.name}/")
            self.bus.ack(message)
            return
        run = Run(replace(request, run_id=run_id), run_id, script.path, self.clock())
        with self._changed:
            start_now = not self._stopping and len(self._running) + len(self._waiting) < self.config.capacity
            if start_now:  # a worker is free: take its slot, start the run here, let the worker follow it
                self._running[run_id] = run
        if start_now:
            started = self.driver.guarded(run, lambda: self.driver.start(run, message))
            with self._changed:
                if started:
                    self._started.append(run)
                    self._changed.notify()
                else:
                    self._running.pop(run_id, None)
            return
        if self.claimer.claim_or_refuse(run, message, runstates.QUEUED):
            self._enqueue(run)

    def _as_fired(self, run_id: str) -> RunRequest | None:
        """An automation fire's request as the scheduler stored it, whoever sent this one; None: no such fire.

        A fire's run id is predictable: a request under it that no scheduler stored is dropped without a
        claim (a refusal would take the id from the fire to come), and a stored one runs with the
        automation's parameters, whatever the message said.
        """
        try:
            stored = self.claimer.with_retries(
                f"reading the fire of run {run_id}", lambda: self.claims.fire_request(run_id)
            )
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

    def _enqueue(self, run: Run) -> None:
        self.publisher.status(run, runstates.QUEUED)
        with self._changed:
            self._waiting.append(run)
            self._changed.notify()
        self._publish_state()

    def _cancel_by_id(self, run_id: str) -> None:
        with self._changed:
            waiting = next((r for r in self._waiting if r.run_id == run_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            running = self._running.get(run_id)
        if waiting is not None:
            if self.claims.move(run_id, from_states=(runstates.QUEUED,), state=runstates.CANCELLED):
                self.publisher.status(
                    waiting,
                    runstates.CANCELLED,
                    error="cancelled before it started",
                    finished=True,
                    entries=[("exit_status", "failed")],
                )
            self._publish_state()
        elif running is not None:
            self.driver.cancel(running, "cancelled")

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
                    self.publisher.status(run, runstates.LOST, error=why[:2000], finished=True, entries=ending)
            elif script is None:
                if self.claims.move(
                    claim.run_id, owner=runner_id, from_states=(runstates.QUEUED,), state=runstates.FAILED
                ):
                    self.publisher.failed(
                        run.run_id,
                        request,
                        f"no script named {request.script!r} any more in {self.scripts.folder.name}/",
                    )
            elif self.claims.move(
                claim.run_id, owner=runner_id, from_states=(runstates.QUEUED,), new_owner=self.config.runner_id
            ):
                log.info("resuming run %s (claimed by %s)", claim.run_id, runner_id)
                self._enqueue(Run(request, claim.run_id, script.path, self.clock()))

    def _take_over(self, runner_id: str) -> None:
        if self._stopping:
            return
        held = self.outbox.adopt(runner_id)  # first: what it published and no recorder confirmed
        if held or self.claims.active_claims(runner_id):
            log.warning(
                "runner %s has stopped beating: taking over its claims and %d unconfirmed message(s)", runner_id, held
            )
            self._recover(runner_id)  # before the resend: a `lost` replaces a held `running`
            self.resender.send_everything()

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
                self.driver.guarded(run, functools.partial(self._carry, run, started))
            finally:
                with self._changed:
                    self._running.pop(run.run_id, None)
                self._publish_state()

    def _carry(self, run: Run, started: bool) -> None:
        """Start a run (unless the dispatcher did), then follow it to its end."""
        if started or self.driver.start(run):
            self.driver.follow(run)

    def _state_payload(self) -> bytes:
        with self._changed:
            running = tuple(self._running)
            waiting = len(self._waiting)
        return RunnerState(self.config.runner_id, "online", self.config.capacity, running, waiting).to_payload()

    def _publish_state(self) -> None:
        payload = self._state_payload()
        self.bus.birth = payload
        self.bus.publish(self.topics.build("runner_state", self.config.runner_id), payload, retain=True)
