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
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from astral import Observer
from sqlalchemy import String, cast, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import (
    AutomationFired,
    AutomationSpec,
    AutomationState,
    Every,
    NodePresence,
    NodeValue,
    RunFinished,
    anchor,
    automation_of_run,
    conditions_hold,
    crossing,
    fire_run_id,
    next_due,
    plan_start,
)
from hacer.bus import Bus, BusError, Message
from hacer.messages import MessageError, NodeValues, Presence, RunRequest, RunStatus, bus_time
from hacer.models import Automation, AutomationFire, AutomationTrigger, Run, aware_utc, naive_utc
from hacer.topics import TopicError, Topics

log = logging.getLogger(__name__)

MAX_CATCH_UP_STEPS = 100_000  # due times walked to find the latest missed one
MAX_QUEUED = 10  # fires of a `queued` automation waiting for its runs, as Home Assistant's max
BUS_TOPICS = ("node_presence", "node_state", "run_status")
Fence = Callable[[Session], bool]
Verdict = Literal["fire", "hold", "queue"]


@dataclass
class Planned:
    """An automation as planned here: its definition and next due time."""

    id: int
    spec: AutomationSpec
    since: datetime  # what `every` counts from: when it last changed (aware UTC, whole seconds)
    next_due: datetime | None
    version: datetime  # its row's changed_at, as the database holds it


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
        self.held_back = 0  # bus events that fired nothing: cooldown, mode, a condition, a lost race
        self.failed = 0  # automations whose due times could not be computed: marked failed, never fired
        self._values: dict[int, dict[str, Any]] = {}  # node values as last seen, for conditions
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.queued = 0
        self._by_node: dict[int, list[Planned]] = {}  # the bus plans each node's messages concern
        self._by_script: dict[str, list[Planned]] = {}
        # What this scheduler last read or wrote of each value trigger's row: (version, armed, value).
        # A message that changes nothing there needs no database; a stale copy only costs a failed fence.
        self._seen: dict[int, tuple[datetime, bool, str]] = {}
        self._planned: dict[int, Planned] = {}
        self._heap: list[tuple[datetime, int]] = []  # (next due, automation id); stale entries skipped
        self._versions: dict[int, str] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._refreshed_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect and start planning."""
        for name in BUS_TOPICS:
            self.bus.subscribe(self.topics.filter(name), self._on_bus)
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
                    self._drain(plan)
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(message)
        self._fire_due()

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
            self._publish_plan(plan)
        for gone in set(self._planned) - set(planned):
            self._clear_plan(gone)
        self._planned, self._versions = planned, versions
        self._heap = [(plan.next_due, plan.id) for plan in planned.values() if plan.next_due is not None]
        heapq.heapify(self._heap)
        self._by_node, self._by_script = {}, {}
        for plan in planned.values():
            trigger = plan.spec.trigger
            if isinstance(trigger, NodePresence | NodeValue):
                self._by_node.setdefault(trigger.node, []).append(plan)
            elif isinstance(trigger, RunFinished):
                self._by_script.setdefault(trigger.script, []).append(plan)
        for plan in fresh:  # a value trigger whose node's value is known sees it now, not at its next change
            if isinstance(plan.spec.trigger, NodeValue) and plan.spec.trigger.node in self._values:
                self._on_value(plan, plan.spec.trigger, self._values[plan.spec.trigger.node])

    def _next(self, plan: Planned, after: datetime) -> datetime | None:
        """The plan's first due time after `after`; a trigger that cannot say is marked failed, it alone."""
        try:
            return next_due(plan.spec.trigger, after, plan.since, self.location)
        except Exception as exc:  # a bug in one trigger's arithmetic must not stop the others
            self._mark_failed(plan.id, plan.spec.name, plan.version, f"{type(exc).__name__}: {exc}")
            return None

    def _mark_failed(self, automation_id: int, name: str, version: datetime, why: str) -> None:
        """Keep an automation from firing and say why, in the log and on its row (for that definition only)."""
        self.failed += 1
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
            if fire is not None:
                batch.append((plan, *fire))
            moved.append(plan)
        if batch:
            self._fire_batch(batch)
        for plan in moved:
            if plan.next_due is not None:
                heapq.heappush(self._heap, (plan.next_due, plan.id))
            self._publish_plan(plan)

    def _next_wake(self) -> float:
        """Seconds until the earliest due time, at most `poll_every`."""
        while self._heap and self._planned.get(self._heap[0][1]) is None:
            heapq.heappop(self._heap)
        if not self._heap:
            return self.poll_every
        return min(self.poll_every, max(0.0, self._heap[0][0].timestamp() - self.clock()))

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
        self.skipped += missed - run_once
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

    def _fire_batch(self, batch: list[tuple[Planned, datetime, bool]]) -> None:
        """Fire time triggers due together in one transaction (a burst at :00 costs one commit).

        If any of them was fired by another scheduler the batch is undone and each is fired alone.
        """
        fired_at = naive_utc(self.now())
        fires = [self._fire_rows(plan, due, late, fired_at) for plan, due, late in batch]
        with self.sessions() as session:
            try:
                session.execute(insert(AutomationFire), [fire for fire, _, _ in fires])
                session.execute(insert(Run), [run for _, run, _ in fires])
                session.commit()
            except IntegrityError:
                session.rollback()
                for plan, due, late in batch:
                    self._fire(plan, due, late)
                return
        for (plan, due, late), (_, run, payload) in zip(batch, fires, strict=True):
            self._fired(plan, due, late, run["run_id"], payload)

    def _fire(self, plan: Planned, due: datetime, late: bool, fence: Fence | None = None) -> bool:
        """Fire one due time, unless another scheduler did (the unique fire row decides) or a fence holds.

        `fence` runs first in the same transaction: False ends it there (its own changes kept).
        """
        fired_at = naive_utc(self.now())
        fire, run, payload = self._fire_rows(plan, due, late, fired_at)
        verdict, replaced = "fire", None
        with self.sessions() as session:
            if fence is not None:
                verdict, replaced = (
                    self._bus_fences(session, plan, run["run_id"], fired_at) if fence(session) else ("hold", None)
                )
            if verdict != "fire":
                try:
                    if verdict == "queue":
                        self._queue(session, plan, fire)
                    session.commit()  # what the fences spent (a disarmed crossing) stays spent
                except IntegrityError:  # another scheduler queued this very fire
                    self.fired_elsewhere += 1
                return False
            try:
                session.execute(insert(AutomationFire).values(fire))
                session.execute(insert(Run).values(run))
                session.commit()
            except IntegrityError:
                self.fired_elsewhere += 1
                log.debug("automation %s at %s: fired by another scheduler", plan.id, due)
                return False
        self._fired(plan, due, late, run["run_id"], payload)
        if replaced is not None:  # mode restart: the run this one replaces is cancelled
            log.info("automation %s (%s): cancelling run %s, replaced", plan.id, plan.spec.name, replaced)
            try:
                self.bus.publish(self.topics.build("run_cancel", replaced), b"", block=False)
            except BusError as exc:
                log.warning("run %s not cancelled (%s)", replaced, exc)
        return True

    def _fire_rows(
        self, plan: Planned, due: datetime, late: bool, fired_at: datetime
    ) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        """A fire's row, its run's row (holding the request) and the request's payload."""
        spec = plan.spec
        run_id = fire_run_id(plan.id, due)
        request = RunRequest(spec.script, spec.params, run_id, f"automation:{spec.name}"[:64], spec.timeout)
        payload = request.to_payload()
        fire = {
            "automation_id": plan.id,
            "due_at": naive_utc(due),
            "fired_at": fired_at,
            "run_id": run_id,
            "scheduler": self.scheduler_id,
            "late": late,
        }
        run = {
            "run_id": run_id,
            "script": spec.script,
            "params": json.dumps(list(spec.params)),
            "state": runstates.QUEUED,
            "runner": "",
            "requested_by": request.requested_by,
            "request": payload.decode(),
            "requested_at": fired_at,
        }
        return fire, run, payload

    def _fired(self, plan: Planned, due: datetime, late: bool, run_id: str, payload: bytes) -> None:
        """Tell a committed fire: its run request, and the fire itself."""
        self.fired += 1
        log.info("automation %s (%s): fired run %s for %s", plan.id, plan.spec.name, run_id, due.isoformat())
        fired = AutomationFired(plan.id, plan.spec.name, due, run_id, self.scheduler_id, late)
        try:
            self.bus.publish(self.topics.build("run_request"), payload, block=False)
            self.bus.publish(self.topics.build("automation_fired", plan.id), fired.to_payload(), block=False)
        except BusError as exc:  # the run's row holds the request: the recorders send it again
            log.warning("run %s not published now (%s): its request waits in the database", run_id, exc)

    @staticmethod
    def _busy(session: Session, run_id: str) -> bool:
        state = session.scalar(select(Run.state).where(Run.run_id == run_id))
        return state is not None and state not in runstates.FINISHED_STATES

    def _queue(self, session: Session, plan: Planned, fire: dict[str, Any]) -> None:
        """Keep a `queued` automation's fire, without its run, until the runs before it end."""
        waiting = session.scalar(
            select(func.count()).where(AutomationFire.automation_id == plan.id, AutomationFire.pending)
        )
        if (waiting or 0) >= MAX_QUEUED:
            self.held_back += 1
            log.warning("automation %s (%s): %d fires wait already, this one dropped", plan.id, plan.spec.name, waiting)
            return
        session.execute(insert(AutomationFire).values({**fire, "pending": True}))
        self.queued += 1

    def _drain(self, plan: Planned) -> None:
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
            session.execute(insert(Run).values(run))
            session.commit()
        self._fired(plan, due, waiting.late, run["run_id"], payload)

    def _bus_fences(
        self, session: Session, plan: Planned, run_id: str, fired_at: datetime
    ) -> tuple[Verdict, str | None]:
        """Cooldown and modes, decided by one conditional UPDATE of the automation's row.

        Returns what to do with the fire, and (mode `restart`) the run it replaces.
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
                    self.held_back += 1
                    return "hold", None
                replaced = active
            guard &= row.active_run.is_(None) if active is None else row.active_run == active
        moved = session.execute(
            update(Automation).where(guard).values(last_fired_at=fired_at, active_run=run_id)
        ).rowcount  # type: ignore[attr-defined]
        if not moved:
            self.held_back += 1
            return "hold", None
        return "fire", replaced

    # --- bus triggers -----------------------------------------------------------------------

    def _on_bus(self, message: Message) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _handle(self, message: Message) -> None:
        """Feed a bus event to the automations it may trigger."""
        try:
            name, arg = self.topics.parse(message.topic)
            if not message.payload:
                return
            if name == "node_state":
                self._on_values(self.topics.node_id(message.topic), NodeValues.from_payload(message.payload).values)
            elif name == "node_presence":
                presence = Presence.from_payload(message.payload)
                if presence.id != self.topics.node_id(message.topic):
                    raise MessageError("the topic names another node")
                self._on_presence(presence)
            elif name == "run_status":
                status = RunStatus.from_payload(message.payload)
                if status.run_id != arg:
                    raise MessageError("the topic names another run")
                self._on_run_status(status)
        except (TopicError, MessageError) as exc:
            log.debug("ignored %s: %s", message.topic, exc)

    def _event(self, plan: Planned, due: datetime, fence: Fence | None = None) -> None:
        """A bus event for `plan` at `due`: fired within grace, else as its `missed` policy says."""
        now = self.now()
        if due <= plan.since:
            return  # before the automation (or its last change) existed
        lateness = (now - due).total_seconds()
        if lateness > plan.spec.grace and not (plan.spec.missed == "run_once" and lateness <= plan.spec.catch_up):
            self.skipped += 1
            return
        if not conditions_hold(plan.spec, now, self._values):
            self.held_back += 1
            if fence is not None:  # the event is still spent: a crossing fires again only after re-arming
                with self.sessions() as session:
                    fence(session)
                    session.commit()
            return
        self._fire(plan, due, late=lateness > plan.spec.grace, fence=fence or (lambda session: True))

    def _on_presence(self, presence: Presence) -> None:
        for plan in self._by_node.get(presence.id, ()):
            trigger = plan.spec.trigger
            if isinstance(trigger, NodePresence) and presence.state == trigger.becomes:
                # `since` is the transition's own time, the same in every copy: one fire row per transition.
                self._event(plan, presence.since)

    def _on_run_status(self, status: RunStatus) -> None:
        if status.state not in runstates.FINISHED_STATES or status.finished_at is None:
            return
        owner = automation_of_run(status.run_id)  # one of ours ended: a queued fire may start
        plan = None if owner is None else self._planned.get(owner)
        if plan is not None and plan.spec.mode == "queued":
            self._drain(plan)  # the database says whether its run really ended
        for plan in self._by_script.get(status.script, ()):
            trigger = plan.spec.trigger
            assert isinstance(trigger, RunFinished)
            if status.state in trigger.states:
                self._event(plan, status.finished_at)

    def _on_values(self, node_id: int, values: dict[str, Any]) -> None:
        self._values[node_id] = values
        for plan in self._by_node.get(node_id, ()):
            trigger = plan.spec.trigger
            if isinstance(trigger, NodeValue):
                self._on_value(plan, trigger, values)

    def _on_value(self, plan: Planned, trigger: NodeValue, values: dict[str, Any]) -> None:
        if trigger.key not in values:
            return
        value = values[trigger.key]
        if trigger.below is None and trigger.above is None:
            self._value_changed(plan, value)
        elif type(value) is int:
            self._value_crossed(plan, trigger, value)

    def _trigger_row(self, session: Session, plan: Planned, armed: bool, value: Any) -> AutomationTrigger | None:
        """The trigger's row; None at its first sight of this definition (then written, and nothing fires)."""
        row = session.get(AutomationTrigger, plan.id)
        if row is None:
            session.add(
                AutomationTrigger(automation_id=plan.id, armed=armed, value=json.dumps(value), version=plan.version)
            )
            try:
                session.commit()
            except IntegrityError:  # another scheduler saw it first
                session.rollback()
                return session.get(AutomationTrigger, plan.id)
            return None
        if row.version != plan.version:  # the definition changed: its threshold is seen afresh
            table = AutomationTrigger.__table__.c
            session.execute(
                update(AutomationTrigger)
                .where((table.automation_id == plan.id) & (table.version == row.version))
                .values(armed=armed, value=json.dumps(value), version=plan.version)
            )
            session.commit()
            return None
        return row

    def _value_changed(self, plan: Planned, value: Any) -> None:
        seen = json.dumps(value)
        known = self._seen.get(plan.id)
        if known is not None and known[0] == plan.version and known[2] == seen:
            return
        self._seen[plan.id] = (plan.version, True, seen)  # whoever writes it, the row holds `seen` after this
        with self.sessions() as session:
            row = self._trigger_row(session, plan, True, value)
            if row is None or row.value == seen:
                return
            before = row.value

        def fence(session: Session) -> bool:  # from what this scheduler saw to the new value: once
            table = AutomationTrigger.__table__.c
            moved = session.execute(
                update(AutomationTrigger)
                .where((table.automation_id == plan.id) & (table.value == before))
                .values(value=seen)
            ).rowcount  # type: ignore[attr-defined]
            return bool(moved)

        self._event(plan, self.now(), fence)

    def _value_crossed(self, plan: Planned, trigger: NodeValue, value: int) -> None:
        known = self._seen.get(plan.id)
        if known is not None and known[0] == plan.version:
            was_armed = known[1]  # as this scheduler last left the row: the fences below check it
        else:
            with self.sessions() as session:
                past, _ = crossing(trigger, value, True)
                row = self._trigger_row(session, plan, not past, value)
                if row is None:
                    self._seen[plan.id] = (plan.version, not past, "")
                    return  # first sight: already past the threshold is no crossing
                was_armed = row.armed
        fires, armed = crossing(trigger, value, was_armed)
        self._seen[plan.id] = (plan.version, armed, "")
        if not fires:
            if armed != was_armed:  # back past the hysteresis: armed again
                with self.sessions() as session:
                    table = AutomationTrigger.__table__.c
                    session.execute(
                        update(AutomationTrigger)
                        .where((table.automation_id == plan.id) & (table.armed == was_armed))
                        .values(armed=armed)
                    )
                    session.commit()
            return

        def fence(session: Session) -> bool:  # the crossing that disarms it: one scheduler's
            table = AutomationTrigger.__table__.c
            moved = session.execute(
                update(AutomationTrigger)
                .where((table.automation_id == plan.id) & table.armed)
                .values(armed=False, value=json.dumps(value))
            ).rowcount  # type: ignore[attr-defined]
            return bool(moved)

        self._event(plan, self.now(), fence)

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
