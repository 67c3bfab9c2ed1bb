"""A fire in the database: one transaction, an `automation_fire` row unique per (automation, due
time) and its run's row holding the request; the request is published after the commit.

Cooldown and modes are fences: one conditional UPDATE of the automation's row decides, however
many schedulers see the same event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import AutomationFired, AutomationHeldBack, AutomationSpec, fire_run_id
from hacer.bus import Bus, BusError
from hacer.models import (
    Automation,
    AutomationFire,
    AutomationHeld,
    AutomationStep,
    Run,
    aware_utc,
    insert_ignoring_duplicates,
    naive_utc,
)
from hacer.topics import Topics
from scheduler.plans import Counts, Planned, requested_run
from scheduler.steps import Steps

log = logging.getLogger(__name__)

MAX_QUEUED = 10  # fires of a `queued` automation waiting for its runs, as Home Assistant's max
HELD_KEPT = 20  # traces of what an automation did not run for, kept (its latest)
Fence = Callable[[Session], bool]
Verdict = Literal["fire", "hold", "queue"]


@dataclass(frozen=True)
class Trace:
    """What a fire's trace holds beside its row: what triggered it, each condition as it was seen."""

    cause: dict[str, Any]
    conditions: list[dict[str, Any]]

    def columns(self, spec: AutomationSpec) -> dict[str, str]:
        """The fire row's trace columns, with the definition as it is now."""
        return {
            "cause": json.dumps(self.cause),
            "conditions": json.dumps(self.conditions),
            "definition": spec.to_json().decode(),
        }


class Firer:
    """Fires automations' due times, each once whichever scheduler gets there first."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        scheduler_id: str,
        now: Callable[[], datetime],
        counts: Counts,
        steps: Steps,
    ) -> None:
        self.bus = bus
        self.steps = steps
        self.topics = topics
        self.sessions = sessions
        self.scheduler_id = scheduler_id
        self.now = now
        self.counts = counts
        self._held: list[AutomationHeldBack] = []  # traced in a transaction; told once it is committed

    def fire_batch(self, batch: list[tuple[Planned, datetime, bool, Trace]]) -> None:
        """Fire time triggers due together in one transaction (a burst at :00 costs one commit).

        If any of them was fired by another scheduler the batch is undone and each is fired alone.
        """
        fired_at = naive_utc(self.now())
        fires = [self._fire_rows(plan, due, late, fired_at, trace) for plan, due, late, trace in batch]
        with self.sessions() as session:
            try:
                session.execute(insert(AutomationFire), [fire for fire, _, _ in fires])
                if runs := [run for _, run, _ in fires if run is not None]:
                    session.execute(insert(Run), runs)
                for (plan, _, _, _), (fire, run, _) in zip(batch, fires, strict=True):
                    if run is None:
                        self.steps.begin(session, plan.id, plan.spec, fire["run_id"], 0)
                session.commit()
            except IntegrityError:
                session.rollback()
                for plan, due, late, trace in batch:
                    self.fire(plan, due, late, trace=trace)
                return
        for (plan, due, late, _), (fire, _, payload) in zip(batch, fires, strict=True):
            self._fired(plan, due, late, fire["run_id"], payload)

    def fire(
        self, plan: Planned, due: datetime, late: bool, fence: Fence | None = None, trace: Trace | None = None
    ) -> bool:
        """Fire one due time, unless another scheduler did (the unique fire row decides) or a fence holds.

        `fence` runs first in the same transaction: False ends it there (its own changes kept).
        """
        fired_at = naive_utc(self.now())
        fire, run, payload = self._fire_rows(plan, due, late, fired_at, trace)
        verdict, replaced = "fire", None
        with self.sessions() as session:
            if fence is not None:
                verdict, replaced = (
                    self._bus_fences(session, plan, fire["run_id"], fired_at) if fence(session) else ("hold", None)
                )
                if verdict == "hold" and replaced is not None and trace is not None:  # this event's, held back
                    self.held(session, plan, due, trace, replaced)
            if verdict != "fire":
                try:
                    if verdict == "queue" and not self._queue(session, plan, fire) and trace is not None:
                        self.held(session, plan, due, trace, "queue full")
                    session.commit()  # what the fences spent (a disarmed crossing) stays spent
                except IntegrityError:  # another scheduler queued this very fire
                    self.counts.fired_elsewhere += 1
                return False
            cancelled = [replaced] if replaced is not None else []
            try:
                session.execute(insert(AutomationFire).values(fire))
                self._begin(session, plan, fire["run_id"], run)
                if replaced is not None:  # a fire with steps: its waiting step ends, its run is cancelled
                    cancelled += self.steps.cancel(session, replaced)
                session.commit()
            except IntegrityError:
                self.counts.fired_elsewhere += 1
                log.debug("automation %s at %s: fired by another scheduler", plan.id, due)
                return False
        self._fired(plan, due, late, fire["run_id"], payload)
        for run_id in cancelled:  # mode restart: the run this one replaces is cancelled
            log.info("automation %s (%s): cancelling run %s, replaced", plan.id, plan.spec.name, run_id)
            try:
                self.bus.publish(self.topics.build("run_cancel", run_id), b"", block=False)
            except BusError as exc:
                log.warning("run %s not cancelled (%s)", run_id, exc)
        return True

    def drain(self, plan: Planned) -> None:
        """Start a `queued` automation's oldest waiting fire once its last run has ended (one scheduler does)."""
        fired_at = naive_utc(self.now())
        with self.sessions() as session:
            active = session.scalar(select(Automation.active_run).where(Automation.id == plan.id))
            if active is not None and self._busy(session, active):
                return
            waiting = session.scalars(
                select(AutomationFire)
                .where(AutomationFire.automation_id == plan.id, AutomationFire.pending)
                .order_by(AutomationFire.due_at)
                .limit(1)
            ).first()
            if waiting is None:
                return
            row = Automation.__table__.c
            guard = (row.id == plan.id) & (row.active_run.is_(None) if active is None else row.active_run == active)
            if not session.execute(
                update(Automation).where(guard).values(active_run=waiting.run_id, last_fired_at=fired_at)
            ).rowcount:  # type: ignore[attr-defined]
                return  # another scheduler started it
            due = aware_utc(waiting.due_at)
            _, run, payload = self._fire_rows(plan, due, waiting.late, fired_at)
            waiting.pending = False
            self._begin(session, plan, waiting.run_id, run)
            session.commit()
        self._fired(plan, due, waiting.late, waiting.run_id, payload)

    def _begin(self, session: Session, plan: Planned, run_id: str, run: dict[str, Any] | None) -> None:
        """What a fire starts, in its transaction: its run's row, or its first step."""
        if run is not None:
            session.execute(insert(Run).values(run))
        else:
            self.steps.begin(session, plan.id, plan.spec, run_id, 0)

    def _fire_rows(
        self, plan: Planned, due: datetime, late: bool, fired_at: datetime, trace: Trace | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None, bytes]:
        """A fire's row (with its trace: a time trigger's if none is given), its run's row (holding the
        request) and the request's payload; no run (None, b"") when it has steps."""
        spec = plan.spec
        run_id = fire_run_id(plan.id, due)
        fire = {
            "automation_id": plan.id,
            "due_at": naive_utc(due),
            "fired_at": fired_at,
            "run_id": run_id,
            "scheduler": self.scheduler_id,
            "late": late,
            **(trace or Trace({"kind": "time", "due": due.isoformat()}, [])).columns(spec),
        }
        if spec.steps:
            return fire, None, b""
        run, payload = requested_run(spec, run_id, spec.script, spec.params, spec.timeout, fired_at)
        return fire, run, payload

    def held(self, session: Session, plan: Planned, due: datetime, trace: Trace, why: str) -> None:
        """Keep, in `session`'s transaction, the trace of a due time or event not run (`why`): once, and
        not beside a fire of the same time (another scheduler's); an automation's latest HELD_KEPT."""
        fired = session.scalar(
            select(AutomationFire.id).where(
                AutomationFire.automation_id == plan.id, AutomationFire.due_at == naive_utc(due)
            )
        )
        if fired is not None:
            return
        row = {
            "automation_id": plan.id,
            "due_at": naive_utc(due),
            "seen_at": naive_utc(self.now()),
            "scheduler": self.scheduler_id,
            "why": why,
            **trace.columns(plan.spec),
        }
        insert_ignoring_duplicates(session, AutomationHeld.__table__, [row], ["automation_id", "due_at"])
        oldest_kept = (
            select(AutomationHeld.due_at)
            .where(AutomationHeld.automation_id == plan.id)
            .order_by(AutomationHeld.due_at.desc())
            .offset(HELD_KEPT - 1)
            .limit(1)
            .scalar_subquery()
        )
        session.execute(
            delete(AutomationHeld).where(AutomationHeld.automation_id == plan.id, AutomationHeld.due_at < oldest_kept)
        )
        log.info("automation %s (%s): %s not run (%s)", plan.id, plan.spec.name, due.isoformat(), why)
        self._held.append(AutomationHeldBack(plan.id, plan.spec.name, due, why, self.scheduler_id))  # type: ignore[arg-type]

    def tell_held(self) -> None:
        """Publish what was held back since the last call (its traces committed by now)."""
        held, self._held = self._held, []
        for event in held:
            try:
                self.bus.publish(self.topics.build("automation_held", event.id), event.to_payload(), block=False)
            except BusError as exc:  # only a hint to reread the traces: the database has them
                log.debug("automation %s: held back, not told (%s)", event.id, exc)

    def _fired(self, plan: Planned, due: datetime, late: bool, run_id: str, payload: bytes) -> None:
        """Tell a committed fire: its run request, and the fire itself."""
        self.counts.fired += 1
        log.info("automation %s (%s): fired run %s for %s", plan.id, plan.spec.name, run_id, due.isoformat())
        fired = AutomationFired(plan.id, plan.spec.name, due, run_id, self.scheduler_id, late)
        if plan.spec.steps:
            self.steps.started(plan.spec, run_id, 0)
        try:
            if payload:
                self.bus.publish(self.topics.build("run_request"), payload, block=False)
            self.bus.publish(self.topics.build("automation_fired", plan.id), fired.to_payload(), block=False)
        except BusError as exc:  # the run's row holds the request: the recorders send it again
            log.warning("run %s not published now (%s): its request waits in the database", run_id, exc)

    @staticmethod
    def _busy(session: Session, run_id: str) -> bool:
        """Whether a fire's run, or a step of its, is still going."""
        state = session.scalar(select(Run.state).where(Run.run_id == run_id))
        if state is not None:
            return state not in runstates.FINISHED_STATES
        step = AutomationStep.__table__.c
        return session.scalar(select(step.position).where(step.run_id == run_id, step.state == "waiting")) is not None

    def _queue(self, session: Session, plan: Planned, fire: dict[str, Any]) -> bool:
        """Keep a `queued` automation's fire, without its run, until the runs before it end; False if full."""
        waiting = session.scalar(
            select(func.count()).where(AutomationFire.automation_id == plan.id, AutomationFire.pending)
        )
        if (waiting or 0) >= MAX_QUEUED:
            self.counts.held_back += 1
            log.warning("automation %s (%s): %d fires wait already, this one dropped", plan.id, plan.spec.name, waiting)
            return False
        session.execute(insert(AutomationFire).values({**fire, "pending": True}))
        self.counts.queued += 1
        return True

    def _bus_fences(
        self, session: Session, plan: Planned, run_id: str, fired_at: datetime
    ) -> tuple[Verdict, str | None]:
        """Cooldown and modes, decided by one conditional UPDATE of the automation's row.

        Returns what to do with the fire, and (mode `restart`) the run it replaces, or why it is held.
        """
        spec, row = plan.spec, Automation.__table__.c
        if not spec.cooldown and spec.mode == "parallel":
            return "fire", None  # nothing to fence
        guard, replaced = row.id == plan.id, None
        if spec.cooldown:
            cutoff = fired_at - timedelta(seconds=spec.cooldown)
            guard &= row.last_fired_at.is_(None) | (row.last_fired_at <= cutoff)
        if spec.mode != "parallel":
            active = session.scalar(select(Automation.active_run).where(Automation.id == plan.id))
            waiting = spec.mode == "queued" and session.scalar(
                select(func.count()).where(AutomationFire.automation_id == plan.id, AutomationFire.pending)
            )
            if waiting or (active is not None and self._busy(session, active)):
                if spec.mode == "queued":
                    return "queue", None  # it waits for the runs before it
                if spec.mode == "single":
                    self.counts.held_back += 1
                    return "hold", "single"  # its last run still runs
                replaced = active
            guard &= row.active_run.is_(None) if active is None else row.active_run == active
        moved = session.execute(
            update(Automation).where(guard).values(last_fired_at=fired_at, active_run=run_id)
        ).rowcount  # type: ignore[attr-defined]
        if not moved:
            self.counts.held_back += 1
            return "hold", "cooldown" if spec.cooldown else None  # else: another scheduler's fire
        return "fire", replaced
