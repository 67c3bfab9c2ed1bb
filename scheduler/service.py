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

The Scheduler plans time triggers and wakes for them; its parts fire (scheduler/firing.py) and
take bus triggers (scheduler/triggers.py).
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from astral import Observer
from sqlalchemy import String, cast, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hacer.automations import AutomationSpec, AutomationState, Every, anchor, next_due, plan_start
from hacer.bus import Bus, BusError, Message
from hacer.messages import MessageError, bus_time
from hacer.models import Automation, AutomationFire, aware_utc
from hacer.topics import TopicError, Topics
from scheduler.firing import Firer
from scheduler.plans import Counts, Planned
from scheduler.steps import RESEND_AFTER, Steps
from scheduler.triggers import BusTriggers

__all__ = ["Planned", "Scheduler"]

log = logging.getLogger(__name__)

MAX_CATCH_UP_STEPS = 100_000  # due times walked to find the latest missed one
BUS_TOPICS = ("node_presence", "node_readings", "run_status")  # readings: values with the times they were read


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
        step_resend_after: float = RESEND_AFTER,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.scheduler_id = scheduler_id
        self.location = location
        self.clock = clock
        self.poll_every = poll_every
        self.counts = Counts()
        self.steps = Steps(bus, topics, sessions, self.now, lambda: self.triggers.seen, poll_every, step_resend_after)
        self.firer = Firer(bus, topics, sessions, scheduler_id, self.now, self.counts, self.steps)
        self.triggers = BusTriggers(
            topics, sessions, self.firer, lambda automation_id: self._planned.get(automation_id), self.now, self.counts
        )
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._planned: dict[int, Planned] = {}
        self._heap: list[tuple[datetime, int]] = []  # (next due, automation id); stale entries skipped
        self._versions: dict[int, str] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._refreshed_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect and start planning."""
        for topic in [*(self.topics.filter(name) for name in BUS_TOPICS), *self.steps.topics_to_follow()]:
            self.bus.subscribe(topic, self._on_bus)
        self.bus.start()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop planning and disconnect."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.bus.stop()

    # --- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        """One round: fire what is due, read what changed (once per `poll_every`), feed the bus events."""
        if self.clock() < self._refreshed_at + 2 * self.poll_every:
            # First, unless the table is unread for two polls (it may hold a disable): reading
            # 10 000 automations takes longer than a fire may wait.
            self._fire_due()
        if self.clock() >= self._refreshed_at + self.poll_every:
            self._refreshed_at = self.clock()
            self._refresh()
            for plan in self._planned.values():  # a run's end missed (the broker away): its queue moves on anyway
                if plan.spec.mode == "queued":
                    self.firer.drain(plan)
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(message)
        self._fire_due()
        self.triggers.fire_waits()
        self.steps.advance()
        self.firer.tell_held()
        waits = self.triggers.waits
        for automation_id in list(waits.changed):  # a wait's due shown as the next fire
            waits.changed.discard(automation_id)
            if (changed := self._planned.get(automation_id)) is not None:
                self._publish_plan(changed)

    def _handle(self, message: Message) -> None:
        try:
            name, _ = self.topics.parse(message.topic)
        except TopicError:
            return
        if name in ("reply", "run_status"):
            self.steps.handle(name, message)
        if name != "reply":
            self.triggers.handle(message)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except SQLAlchemyError as exc:  # passing trouble (locked, away): the next round tries again
                log.warning("planning failed: %s", exc)
            except Exception:  # a bug must not end the thread while the process looks alive
                log.exception("planning failed")
                self._stopping.wait(1.0)
            self._wake.wait(self._next_wake())  # a bus event ends the wait
            self._wake.clear()

    def now(self) -> datetime:
        """The clock's time, aware UTC."""
        return bus_time(self.clock())

    def _refresh(self) -> None:
        """Read the automations again when any was added, changed, enabled, disabled or deleted."""
        with self.sessions() as session:
            # Change times as the database's text: no datetime built per row, every second.
            versions = dict(
                session.execute(select(Automation.id, cast(Automation.changed_at, String)).where(Automation.enabled))
                .tuples()
                .all()
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
        fresh: list[Planned] = []
        for row in rows:
            kept = self._planned.get(row.id)
            if kept is not None and self._versions.get(row.id) == versions.get(row.id):
                planned[row.id] = kept
                continue
            try:
                spec = AutomationSpec.from_json(row.definition, self.location)
            except MessageError as exc:  # written past the api's checks: shown, not run
                self._mark_failed(row.id, row.name, row.changed_at, str(exc))
                continue
            changed_at, last = aware_utc(row.changed_at), last_fires.get(row.id)
            start = plan_start(changed_at, None if last is None else aware_utc(last))
            plan = Planned(row.id, spec, anchor(changed_at), None, row.changed_at)
            plan.next_due = self._next(plan, start)
            planned[row.id] = plan
            fresh.append(plan)
        for gone in set(self._planned) - set(planned):
            self._clear_plan(gone)
        self._planned, self._versions = planned, versions
        self._heap = [(plan.next_due, plan.id) for plan in planned.values() if plan.next_due is not None]
        heapq.heapify(self._heap)
        self.triggers.index(planned.values(), fresh)
        self.triggers.waits.load(fresh)  # what a wait of theirs began before this scheduler saw them
        for plan in fresh:
            self._publish_plan(plan)  # with the due time of a wait it has
            self.triggers.waits.changed.discard(plan.id)

    def _next(self, plan: Planned, after: datetime) -> datetime | None:
        """The plan's first due time after `after`; a trigger that cannot say is marked failed, it alone."""
        try:
            return next_due(plan.spec.trigger, after, plan.since, self.location)
        except Exception as exc:  # a bug in one trigger's arithmetic must not stop the others
            self._mark_failed(plan.id, plan.spec.name, plan.version, f"{type(exc).__name__}: {exc}")
            return None

    def _mark_failed(self, automation_id: int, name: str, version: datetime, why: str) -> None:
        """Keep an automation from firing and say why, in the log and on its row (for that definition only)."""
        self.counts.failed += 1
        log.error("automation %s (%s) cannot be planned, and will not fire: %s", automation_id, name, why)
        try:
            with self.sessions() as session:
                session.execute(
                    update(Automation)
                    .where(Automation.id == automation_id, Automation.changed_at == version)
                    .values(failure=why[:500])
                )
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("automation %s: its failure not recorded (%s)", automation_id, exc)

    def _fire_due(self) -> None:
        now, batch, moved = self.now(), [], []
        while self._heap and self._heap[0][0] <= now:
            moment, automation_id = heapq.heappop(self._heap)
            plan = self._planned.get(automation_id)
            if plan is None or plan.next_due != moment:
                continue  # changed or gone since it was pushed
            fire = self._due_or_missed(plan, now)
            trace = None if fire is None else self.triggers.time_trace(plan, fire[0])
            if fire is not None and trace is not None:
                batch.append((plan, *fire, trace))
            moved.append(plan)
        if batch:
            self.firer.fire_batch(batch)
        for plan in moved:
            if plan.next_due is not None:
                heapq.heappush(self._heap, (plan.next_due, plan.id))
            self._publish_plan(plan)

    def _next_wake(self) -> float:
        """Seconds until the earliest due time or wait, at most `poll_every`."""
        while self._heap and self._planned.get(self._heap[0][1]) is None:
            heapq.heappop(self._heap)
        soonest = (self._heap[0][0] if self._heap else None, self.triggers.waits.earliest(), self.steps.earliest())
        earliest = [due for due in soonest if due]
        if not earliest:
            return self.poll_every
        return min(self.poll_every, max(0.0, min(earliest).timestamp() - self.clock()))

    def _due_or_missed(self, plan: Planned, now: datetime) -> tuple[datetime, bool] | None:
        """The (due time, late) to fire for a due plan, which moves on to its next due time.

        Its due time if it is at most `grace` late; else what its `missed` policy says (the latest
        missed one, or nothing).
        """
        assert plan.next_due is not None
        spec, due = plan.spec, plan.next_due
        if (now - due).total_seconds() <= spec.grace:
            plan.next_due = self._next(plan, due)
            return due, False
        latest, missed = self._latest_missed(plan, now)
        plan.next_due = self._next(plan, now)
        run_once = spec.missed == "run_once" and (now - latest).total_seconds() <= spec.catch_up
        self.counts.skipped += missed - run_once
        log.warning(
            "automation %s (%s): %d due time(s) missed up to %s, not run", plan.id, spec.name, missed - run_once, latest
        )
        return (latest, True) if run_once else None

    def _latest_missed(self, plan: Planned, now: datetime) -> tuple[datetime, int]:
        """The latest due time at or before `now`, and how many there were from the plan's next one."""
        assert plan.next_due is not None
        trigger = plan.spec.trigger
        if isinstance(trigger, Every):
            steps = int((now - plan.next_due).total_seconds() // trigger.seconds)
            return plan.next_due + timedelta(seconds=steps * trigger.seconds), steps + 1
        latest, count = plan.next_due, 1
        for _ in range(MAX_CATCH_UP_STEPS):
            following = self._next(plan, latest)
            if following is None or following > now:
                break
            latest, count = following, count + 1
        return latest, count

    def _on_bus(self, message: Message) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _publish_plan(self, plan: Planned) -> None:
        state = AutomationState(plan.id, plan.spec, plan.next_due or self.triggers.waits.next_due(plan.id))
        try:
            self.bus.publish(self.topics.build("automation", plan.id), state.to_payload(), retain=True, block=False)
        except BusError:
            pass  # republished at the next change or fire

    def _clear_plan(self, automation_id: int) -> None:
        try:
            self.bus.publish(self.topics.build("automation", automation_id), b"", retain=True, block=False)
        except BusError:
            pass
