"""The scheduler: fires each automation's due times as ordinary run requests, each exactly once.

A fire is one transaction: an `automation_fire` row, unique per (automation, due time), and the
run's row holding its request, as REST requests have. Whichever scheduler inserts first fires;
another one (two at once, or one restarted mid-fire) meets the unique constraint and moves on.
The request is published after the commit; if that publish is lost (the broker away, a crash
just then) the recorders send the queued run's request again, as they do for REST's. The run id
is derived from the automation and the due time, so a runner runs that fire once whatever is
sent twice.

The database is the truth: automations are read from it (every `poll_every` seconds, cheaply:
ids and change times), the next due time from the last fire; the bus carries each automation's
plan (retained) and its fires, for people and programs to watch.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from astral import Observer
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import (
    AutomationFired,
    AutomationSpec,
    AutomationState,
    Every,
    anchor,
    next_due,
    plan_start,
    run_id_of,
)
from hacer.bus import Bus, BusError
from hacer.messages import MessageError, RunRequest
from hacer.models import Automation, AutomationFire, Run
from hacer.topics import Topics

log = logging.getLogger(__name__)

MAX_CATCH_UP_STEPS = 100_000  # due times walked to find the latest missed one


@dataclass
class Planned:
    """An automation as planned here: its definition and next due time."""

    id: int
    spec: AutomationSpec
    since: datetime  # what `every` counts from: when it last changed (aware UTC, whole seconds)
    next_due: datetime | None


def aware(moment: datetime) -> datetime:
    """A database datetime (naive UTC) as an aware one."""
    return moment.replace(tzinfo=UTC)


def naive(moment: datetime) -> datetime:
    """An aware datetime as the database holds it (naive UTC)."""
    return moment.astimezone(UTC).replace(tzinfo=None)


class Scheduler:
    """Fires due automations; start() and stop()."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        scheduler_id: str,
        location: Observer | None = None,
        clock: Callable[[], float] = time.time,
        poll_every: float = 1.0,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.scheduler_id = scheduler_id
        self.location = location
        self.clock = clock
        self.poll_every = poll_every
        self.fired = 0
        self.fired_elsewhere = 0
        self.skipped = 0
        self._planned: dict[int, Planned] = {}
        self._versions: dict[int, datetime] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect and start planning."""
        self.bus.start()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop planning and disconnect."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        self.bus.stop()

    def wake(self) -> None:
        """Plan again now rather than at the next poll (tests, and a change seen on the bus)."""
        self._versions = {}

    # --- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        """One round: read what changed, fire what is due."""
        self._refresh()
        self._fire_due()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except SQLAlchemyError as exc:  # passing trouble (locked, away): the next round tries again
                log.warning("planning failed: %s", exc)
            wait = self.poll_every
            dues = [p.next_due for p in self._planned.values() if p.next_due is not None]
            if dues:
                wait = min(wait, max(0.0, min(dues).timestamp() - self.clock()))
            self._stopping.wait(wait)

    def now(self) -> datetime:
        """The clock's time, aware UTC."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def _refresh(self) -> None:
        """Read the automations again when any was added, changed, enabled, disabled or deleted."""
        with self.sessions() as session:
            versions = dict(
                session.execute(select(Automation.id, Automation.changed_at).where(Automation.enabled)).tuples().all()
            )
            if versions == self._versions:
                return
            rows = session.scalars(select(Automation).where(Automation.id.in_(list(versions)))).all()
            last_fires = dict(
                session.execute(
                    select(AutomationFire.automation_id, func.max(AutomationFire.due_at)).group_by(
                        AutomationFire.automation_id
                    )
                )
                .tuples()
                .all()
            )
        planned: dict[int, Planned] = {}
        for row in rows:
            kept = self._planned.get(row.id)
            if kept is not None and self._versions.get(row.id) == row.changed_at:
                planned[row.id] = kept
                continue
            try:
                spec = AutomationSpec.from_json(row.definition, self.location)
            except MessageError as exc:  # written past the api's checks: shown, not run
                log.error("automation %s (%s) cannot be planned: %s", row.id, row.name, exc)
                continue
            changed_at, last = aware(row.changed_at), last_fires.get(row.id)
            start = plan_start(changed_at, None if last is None else aware(last))
            since = anchor(changed_at)
            planned[row.id] = Planned(row.id, spec, since, next_due(spec.trigger, start, since, self.location))
            self._publish_plan(planned[row.id])
        for gone in set(self._planned) - set(planned):
            self._clear_plan(gone)
        self._planned, self._versions = planned, versions

    def _fire_due(self) -> None:
        now = self.now()
        due = [(p.next_due, p.id) for p in self._planned.values() if p.next_due is not None and p.next_due <= now]
        heapq.heapify(due)
        while due:
            moment, automation_id = heapq.heappop(due)
            self._fire_or_skip(self._planned[automation_id], now)

    def _fire_or_skip(self, plan: Planned, now: datetime) -> None:
        """Fire the plan's due time if it is at most `grace` late; else follow its `missed` policy."""
        assert plan.next_due is not None
        spec, due = plan.spec, plan.next_due
        if (now - due).total_seconds() <= spec.grace:
            self._fire(plan, due, late=False)
            plan.next_due = next_due(spec.trigger, due, plan.since, self.location)
        else:
            latest, missed = self._latest_missed(plan, now)
            self.skipped += missed
            if spec.missed == "run_once" and (now - latest).total_seconds() <= spec.catch_up:
                self._fire(plan, latest, late=True)
                missed -= 1
            log.warning(
                "automation %s (%s): %d due time(s) missed up to %s, not run", plan.id, spec.name, missed, latest
            )
            plan.next_due = next_due(spec.trigger, now, plan.since, self.location)
        self._publish_plan(plan)

    def _latest_missed(self, plan: Planned, now: datetime) -> tuple[datetime, int]:
        """The latest due time at or before `now`, and how many there were from the plan's next one."""
        assert plan.next_due is not None
        trigger = plan.spec.trigger
        if isinstance(trigger, Every):
            steps = int((now - plan.next_due).total_seconds() // trigger.seconds)
            return plan.next_due + timedelta(seconds=steps * trigger.seconds), steps + 1
        latest, count = plan.next_due, 1
        for _ in range(MAX_CATCH_UP_STEPS):
            following = next_due(trigger, latest, plan.since, self.location)
            if following is None or following > now:
                break
            latest, count = following, count + 1
        return latest, count

    def _fire(self, plan: Planned, due: datetime, late: bool) -> None:
        """Fire one due time, unless another scheduler did (the unique fire row decides)."""
        spec = plan.spec
        run_id = run_id_of(plan.id, due)
        request = RunRequest(spec.script, spec.params, run_id, f"automation:{spec.name}"[:64], spec.timeout)
        payload = request.to_payload()
        fired_at = naive(self.now())
        with self.sessions() as session:
            session.add(
                AutomationFire(
                    automation_id=plan.id,
                    due_at=naive(due),
                    fired_at=fired_at,
                    run_id=run_id,
                    scheduler=self.scheduler_id,
                    late=late,
                )
            )
            session.add(
                Run(
                    run_id=run_id,
                    script=spec.script,
                    params=json.dumps(list(spec.params)),
                    state=runstates.QUEUED,
                    runner="",
                    requested_by=request.requested_by,
                    request=payload.decode(),
                    requested_at=fired_at,
                )
            )
            try:
                session.commit()
            except IntegrityError:
                self.fired_elsewhere += 1
                log.debug("automation %s at %s: fired by another scheduler", plan.id, due)
                return
        self.fired += 1
        log.info("automation %s (%s): fired run %s for %s", plan.id, spec.name, run_id, due.isoformat())
        fired = AutomationFired(plan.id, spec.name, due, run_id, self.scheduler_id, late)
        try:
            self.bus.publish(self.topics.build("run_request"), payload, block=False)
            self.bus.publish(self.topics.build("automation_fired", plan.id), fired.to_payload(), block=False)
        except BusError as exc:  # the run's row holds the request: the recorders send it again
            log.warning("run %s not published now (%s): its request waits in the database", run_id, exc)

    def _publish_plan(self, plan: Planned) -> None:
        state = AutomationState(plan.id, plan.spec, plan.next_due)
        try:
            self.bus.publish(self.topics.build("automation", plan.id), state.to_payload(), retain=True, block=False)
        except BusError:
            pass  # republished at the next change or fire

    def _clear_plan(self, automation_id: int) -> None:
        try:
            self.bus.publish(self.topics.build("automation", automation_id), b"", retain=True, block=False)
        except BusError:
            pass
