"""An automation's steps, in order, each once: `set` a node's keys, `run` a script, `wait`, `wait_for`.

A fire with steps begins its first step in the fire's transaction: a row in `automation_step`
(for `run`, with the run's row holding its request, as a fire's). A step ends by a conditional
UPDATE of its row (waiting → done, failed or timed_out) in the transaction that begins the next,
so whichever scheduler gets there first ends it and begins the next, once; a scheduler killed
between two steps leaves a row that any scheduler ends. What a step starts is sent after the
commit: a run's request (lost, the recorders send it again from its row), a `set`'s command on
this scheduler's own command topic, answered on its own reply topic. A `set` not answered within
`resend_after` (its sender may have died before or after sending it) is read back by the scheduler
that takes its row's send fence: the node has the values, the step is done; it has not, the `set`
is sent again. So a `set` reaches its node once across scheduler crashes.

Waits are due times in the rows, so they outlive every process. A fire's steps follow its
definition as it fired (the fire's trace), not a later edit.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import AutomationSpec, AutomationStepEnded, Step, StepState
from hacer.bus import Bus, BusError, Message
from hacer.messages import ClientCommand, CommandResult, MessageError, RunStatus, SetCommand, decode, step_run_id
from hacer.models import AutomationFire, AutomationStep, Run, aware_utc, naive_utc
from hacer.topics import Topics
from scheduler.judging import NodesSeen, condition_seen
from scheduler.plans import requested_run

log = logging.getLogger(__name__)

RESEND_AFTER = 10.0  # seconds a `set` waits for its results before it is sent again
COMMAND_TIMEOUT = 30.0  # seconds a `set` waits for its results in all
Verdict = tuple[StepState, dict[str, Any], bool]  # how a step ended, what came of it, whether the next begins


def step_correlation(fire: str, position: int) -> bytes:
    """The correlation data of a `set` step's command: the bridge's results carry it back."""
    return f"{fire}/{position}".encode()


@dataclass
class Waiting:
    """A step begun and not yet ended, as its row says."""

    fire: str
    position: int
    automation_id: int
    spec: AutomationSpec
    started_at: datetime
    due_at: datetime | None
    sent_at: datetime | None
    reading: bool = False  # a `set` not answered: the node's keys asked for, to see whether it took

    @property
    def step(self) -> Step:
        return self.spec.steps[self.position]

    @property
    def correlation(self) -> bytes:
        return step_correlation(self.fire, self.position)

    @property
    def run_id(self) -> str:
        """A `run` step's run."""
        return step_run_id(self.fire, self.position)

    @property
    def read_correlation(self) -> bytes:
        return self.correlation + b"/read"


class SetSender:
    """Sends `set` steps' commands on this scheduler's own command topic (answered on its own reply
    topic), and reads a step's keys back under the step's send fence."""

    def __init__(self, bus: Bus, topics: Topics, sessions: sessionmaker[Session], resend_after: timedelta) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.resend_after = resend_after

    @property
    def reply_topic(self) -> str:
        return self.topics.build("reply", self.bus.client_id)

    def send(self, step: Step, correlation: bytes, read: bool = False) -> None:
        """Send a `set` step's command, or (`read`) a `get` of its keys."""
        values, node = step.set_values(), step.set_node()
        command = ClientCommand(node, get=list(values)) if read else ClientCommand(node, set=values)
        self.bus.publish(
            self.topics.build("client_command", self.bus.client_id),
            command.to_payload(),
            correlation=correlation,
            response_topic=self.reply_topic,
            expiry=math.ceil(self.resend_after.total_seconds()),  # not done after another copy is sent
            block=False,
        )

    def send_logged(self, waiting: Waiting, read: bool) -> None:
        """Send again (or read back) a waiting `set`, saying so."""
        log.info("automation step %s/%d: %s", waiting.fire, waiting.position, "read back" if read else "sent again")
        try:
            self.send(waiting.step, waiting.read_correlation if read else waiting.correlation, read)
        except BusError as exc:
            log.warning("automation step %s/%d not sent (%s)", waiting.fire, waiting.position, exc)

    def take_fence(self, waiting: Waiting, now: datetime) -> bool:
        """Whether this scheduler may send or read a `set` now: none did for `resend_after` (its row's fence)."""
        row = AutomationStep.__table__.c
        cutoff = naive_utc(now - self.resend_after)
        with self.sessions() as session:
            moved = session.execute(
                update(AutomationStep)
                .where(row.run_id == waiting.fire, row.position == waiting.position, row.state == "waiting")
                .where(row.sent_at.is_(None) | (row.sent_at <= cutoff))
                .values(sent_at=naive_utc(now))
            ).rowcount  # type: ignore[attr-defined]
            session.commit()
        waiting.sent_at = now
        return bool(moved)


class Steps:
    """Begins, judges and ends automations' steps; `advance()` each scheduler round."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        now: Callable[[], datetime],
        seen: Callable[[], NodesSeen],
        poll_every: float = 1.0,
        resend_after: float = RESEND_AFTER,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.now = now
        self.seen = seen
        self.poll_every = poll_every
        self.resend_after = timedelta(seconds=resend_after)
        self.sender = SetSender(bus, topics, sessions, self.resend_after)
        self.command_timeout = timedelta(seconds=command_timeout)
        self._waiting: dict[tuple[str, int], Waiting] = {}
        self._results: dict[bytes, list[CommandResult]] = {}  # a `set`'s, by correlation
        self._run_ends: dict[str, tuple[str, int | None]] = {}  # step runs ended: state, exit code
        self._read_at = -float("inf")
        self._ended: list[AutomationStepEnded] = []
        self._begun: dict[tuple[str, int], Waiting] = {}  # in a transaction not yet committed
        self._unreadable: set[tuple[str, int]] = set()

    def topics_to_follow(self) -> list[str]:
        """Its own reply topic: a `set`'s results come there."""
        return [self.sender.reply_topic]

    # --- beginning -----------------------------------------------------------------------------

    def begin(self, session: Session, automation_id: int, spec: AutomationSpec, fire: str, position: int) -> None:
        """Begin step `position` of `fire` in `session`'s transaction; `started()` after the commit."""
        step, now = spec.steps[position], self.now()
        due, outcome = None, None
        if step.wait is not None:
            due = now + timedelta(seconds=step.wait)
        elif step.wait_for is not None:
            due = now + timedelta(seconds=step.wait_for.timeout)
        elif step.set is not None:
            due = now + self.command_timeout
        elif step.run is not None:
            run_id = step_run_id(fire, position)
            row, _ = requested_run(spec, run_id, step.run.script, step.run.params, step.run.timeout, naive_utc(now))
            session.execute(insert(Run).values(row))
            outcome = {"run_id": run_id}
        self._begun[fire, position] = Waiting(
            fire, position, automation_id, spec, now, due, now if step.set is not None else None
        )
        session.execute(
            insert(AutomationStep).values(
                run_id=fire,
                position=position,
                automation_id=automation_id,
                kind=step.kind,
                state="waiting",
                started_at=naive_utc(now),
                due_at=None if due is None else naive_utc(due),
                sent_at=naive_utc(now) if step.set is not None else None,
                outcome=None if outcome is None else json.dumps(outcome),
            )
        )

    def started(self, spec: AutomationSpec, fire: str, position: int) -> None:
        """Send what a committed step starts: a run's request, a `set`'s command."""
        step = spec.steps[position]
        begun = self._begun.pop((fire, position), None)
        if begun is not None:  # judged from now on, its results kept
            self._waiting[fire, position] = begun
        try:
            if step.run is not None:
                run_id = step_run_id(fire, position)
                _, payload = requested_run(spec, run_id, step.run.script, step.run.params, step.run.timeout, self.now())
                self.bus.publish(self.topics.build("run_request"), payload, block=False)
            elif step.set is not None:
                self.sender.send(step, step_correlation(fire, position))
        except BusError as exc:  # a run's row holds its request; a command is sent again after resend_after
            log.warning("automation step %s/%d not sent now (%s)", fire, position, exc)

    # --- what the bus says ---------------------------------------------------------------------

    def handle(self, name: str, message: Message) -> None:
        """Keep what may end a waiting step: a `set`'s result, a step run's end."""
        try:
            if name == "reply" and message.correlation is not None:
                asked = [
                    w for w in self._waiting.values() if message.correlation in (w.correlation, w.read_correlation)
                ]
                result = CommandResult.from_payload(message.payload)
                if asked and result.node_id == asked[0].step.set_node():
                    self._results.setdefault(message.correlation, []).append(result)
            elif name == "run_status" and message.payload:
                status = RunStatus.from_payload(message.payload)
                runs = {w.run_id for w in self._waiting.values() if w.step.run is not None}
                ended = status.state in runstates.FINISHED_STATES and status.run_id in runs
                if ended and message.topic == self.topics.build("run_status", status.run_id):
                    self._run_ends[status.run_id] = (status.state, status.exit_code)
        except MessageError as exc:
            log.debug("ignored %s: %s", message.topic, exc)

    # --- ending --------------------------------------------------------------------------------

    def advance(self) -> None:
        """Judge every waiting step and end those whose time, result, run or condition has come."""
        now = self.now()
        if now.timestamp() >= self._read_at + self.poll_every:
            self._read(now)
        for waiting in list(self._waiting.values()):
            verdict = self._judge(waiting, now)
            if verdict is not None:
                self._end(waiting, *verdict)
        self._tell()

    def earliest(self) -> datetime | None:
        """The earliest time a waiting step is due by (a wait's end, a timeout)."""
        return min((w.due_at for w in self._waiting.values() if w.due_at is not None), default=None)

    def _judge(self, waiting: Waiting, now: datetime) -> Verdict | None:
        step = waiting.step
        if step.wait is not None:
            return ("done", {}, True) if waiting.due_at is not None and waiting.due_at <= now else None
        if step.run is not None:
            run_id = waiting.run_id
            if run_id not in self._run_ends:
                return None
            state, exit_code = self._run_ends[run_id]
            succeeded = state == runstates.SUCCEEDED
            outcome = {"run_id": run_id, "state": state, "exit_code": exit_code}
            return ("done" if succeeded else "failed"), outcome, succeeded
        if step.set is not None:
            return self._judge_set(waiting, now)
        assert step.wait_for is not None
        seen = condition_seen(step.wait_for.condition, now, self.seen())
        if seen["held"]:
            return "done", {"seen": seen}, True
        if waiting.due_at is not None and waiting.due_at <= now:
            return "timed_out", {"seen": seen}, step.wait_for.on_timeout == "continue"
        return None

    def _judge_set(self, waiting: Waiting, now: datetime) -> Verdict | None:
        """Ended by its results; not answered in time, by what the node has (read once its sender has
        given up on it: the keys set already, it is done, else it is sent again); else it times out."""
        step = waiting.step
        assert step.set is not None
        wanted = SetCommand.of(step.set_values()).values
        results = self._results.get(waiting.correlation, [])
        if {result.key for result in results} >= wanted.keys():  # (a copy sent again may answer a key twice)
            succeeded = all(result.ok for result in results)
            return ("done" if succeeded else "failed"), {"results": [result_seen(r) for r in results]}, succeeded
        read = self._results.get(waiting.read_correlation, [])
        if waiting.reading and {result.key for result in read} >= wanted.keys():
            if all(r.ok and r.value == wanted.get(r.key) for r in read):
                return "done", {"results": [result_seen(r) for r in read], "read_back": True}, True
            waiting.reading = False
            self._results.pop(waiting.read_correlation, None)
            self.sender.send_logged(waiting, read=False)  # the node has not got it: sent again, under the same fence
        if waiting.due_at is not None and waiting.due_at <= now:
            return "timed_out", {"results": [result_seen(r) for r in results]}, False
        if (waiting.sent_at is None or waiting.sent_at + self.resend_after <= now) and self.sender.take_fence(
            waiting, now
        ):  # its sender may have died before or after sending it: read what the node has
            waiting.reading = True
            self._results.pop(waiting.read_correlation, None)
            self.sender.send_logged(waiting, read=True)
        return None

    def _end(self, waiting: Waiting, state: StepState, outcome: dict[str, Any], go_on: bool) -> None:
        """End a step (if no scheduler did) and begin the next, in one transaction."""
        now, row = self.now(), AutomationStep.__table__.c
        following = waiting.position + 1 if go_on and waiting.position + 1 < len(waiting.spec.steps) else None
        with self.sessions() as session:
            moved = session.execute(
                update(AutomationStep)
                .where(row.run_id == waiting.fire, row.position == waiting.position, row.state == "waiting")
                .values(state=state, ended_at=naive_utc(now), outcome=json.dumps(outcome))
            ).rowcount  # type: ignore[attr-defined]
            if moved and following is not None:
                self.begin(session, waiting.automation_id, waiting.spec, waiting.fire, following)
            session.commit()
        self._forget(waiting)
        if not moved:
            return  # another scheduler ended it
        log.info("automation %s: step %d of %s %s", waiting.automation_id, waiting.position, waiting.fire, state)
        self._ended.append(
            AutomationStepEnded(
                waiting.automation_id,
                waiting.spec.name,
                waiting.fire,
                waiting.position,
                waiting.step.kind,
                state,
                waiting.started_at,
                now,
                outcome,
            )
        )
        if following is not None:
            self.started(waiting.spec, waiting.fire, following)

    def cancel(self, session: Session, fire: str) -> list[str]:
        """End a replaced fire's waiting step as cancelled, in `session`'s transaction (mode `restart`):
        the steps after it never begin. Returns the run to cancel, if that step is a run."""
        row = AutomationStep.__table__.c
        waiting = session.execute(
            update(AutomationStep)
            .where(row.run_id == fire, row.state == "waiting")
            .values(state="cancelled", ended_at=naive_utc(self.now()), outcome=row.outcome)
            .returning(row.position, row.kind)
        ).all()
        return [step_run_id(fire, position) for position, kind in waiting if kind == "run"]

    def _forget(self, waiting: Waiting) -> None:
        self._waiting.pop((waiting.fire, waiting.position), None)
        self._results.pop(waiting.correlation, None)
        self._results.pop(waiting.read_correlation, None)
        self._run_ends.pop(waiting.run_id, None)

    def _tell(self) -> None:
        ended, self._ended = self._ended, []
        for event in ended:
            try:
                self.bus.publish(self.topics.build("automation_step", event.id), event.to_payload(), block=False)
            except BusError as exc:  # the trace in the database has it
                log.debug("automation %s: step end not told (%s)", event.id, exc)

    def _read(self, now: datetime) -> None:
        """Read the waiting steps (any scheduler's), with their fires' definitions and their runs' ends."""
        self._read_at = now.timestamp()
        with self.sessions() as session:
            rows = session.execute(
                select(AutomationStep, AutomationFire.definition)
                .join(AutomationFire, AutomationFire.run_id == AutomationStep.run_id)
                .where(AutomationStep.state == "waiting")
            ).all()
            run_ids = [step_run_id(step.run_id, step.position) for step, _ in rows if step.kind == "run"]
            ended = session.execute(
                select(Run.run_id, Run.state, Run.exit_code).where(
                    Run.run_id.in_(run_ids), Run.state.in_(runstates.FINISHED_STATES)
                )
            ).all()
        waiting: dict[tuple[str, int], Waiting] = {}
        for step, definition in rows:
            kept = self._waiting.get((step.run_id, step.position))
            if kept is not None:
                waiting[step.run_id, step.position] = kept
                continue
            try:
                spec = decode(AutomationSpec, definition or "", "automation")
                spec.steps[step.position]
            except (MessageError, IndexError):  # not written by a scheduler: left as it is, said once
                if (step.run_id, step.position) not in self._unreadable:
                    self._unreadable.add((step.run_id, step.position))
                    log.error(
                        "automation step %s/%d: its fire's definition has no such step", step.run_id, step.position
                    )
                continue
            waiting[step.run_id, step.position] = Waiting(
                step.run_id,
                step.position,
                step.automation_id,
                spec,
                aware_utc(step.started_at),
                None if step.due_at is None else aware_utc(step.due_at),
                None if step.sent_at is None else aware_utc(step.sent_at),
            )
        self._waiting, self._begun = waiting, {}
        asked = {c for w in waiting.values() for c in (w.correlation, w.read_correlation)}
        self._results = {key: results for key, results in self._results.items() if key in asked}
        for run_id, state, exit_code in ended:
            self._run_ends[run_id] = (state, exit_code)


def result_seen(result: CommandResult) -> dict[str, Any]:
    """A node's result as a trace keeps it."""
    return {"key": result.key, "ok": result.ok, "value": result.value, "error": result.error}
