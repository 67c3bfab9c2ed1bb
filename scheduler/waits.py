"""The waits of `for` triggers ("node offline for 10 minutes", "above 25 for 5 minutes"), kept in the database.

A wait is a row (automation, began) written when a scheduler sees its condition begin, due `for`
seconds after the condition's own time (a presence's `since`), not after when a scheduler saw it:
a scheduler, broker or whole-server restart in the middle neither restarts nor loses it. At its
due time (or when a scheduler comes back after it) it is judged by the node's presence as this
scheduler last saw it: still in the state since the wait began, or left it at or after the due
time, it fires; else it is cancelled. A presence not seen since this scheduler started is waited
for (the retained one comes at connect). Transitions no scheduler saw (a node back and gone again
while none ran) are read from the recorder's availability history: one out of the state before the
due time cancels it. Firing deletes the row in the fire's transaction, and the fire row is unique
per (automation, due time): the fire comes once, whichever scheduler judges it.

A value threshold's wait begins at the reading's time of the value that crossed (the crossing's
fence and the wait's row in one transaction: one scheduler's). The value going back past the hysteresis
before the due time deletes it, in the transaction that arms the trigger again; a wait due by then
is judged instead: by the recorder's samples of the value between its beginning and its due time.
A run trigger's wait begins at the end (its `finished_at`) of the first run in its states while
none is pending, and a run of the script ending otherwise ends it the same way (the run rows
standing in for the samples).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import NodePresence, NodeValue, RunFinished
from hacer.history import millis
from hacer.messages import Presence
from hacer.models import Automation, AutomationWait, NodeAvailability, NodeSample, Run, aware_utc, naive_utc
from scheduler.judging import value_back
from scheduler.plans import Planned

Wait = tuple[datetime, int, datetime]  # (due, automation id, began), aware UTC
Fence = Callable[[Session], bool]


def lasting(plan: Planned) -> NodePresence | NodeValue | RunFinished | None:
    """The plan's bus trigger if it has a `for`, else None."""
    trigger = plan.spec.trigger
    return trigger if isinstance(trigger, NodePresence | NodeValue | RunFinished) and trigger.lasting else None


class Waits:
    """The waits this scheduler knows, earliest first; the database holds them for every scheduler."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._heap: list[Wait] = []
        self._known: dict[int, dict[datetime, datetime]] = {}  # automation -> began -> due
        self.changed: set[int] = set()  # automations whose waits began or ended since the scheduler last looked
        self._undecided: list[Wait] = []  # due, but the node's presence or value is not seen yet

    def load(self, plans: Iterable[Planned]) -> None:
        """Know the waits the database holds for these plans (at start, and when plans change); drop those
        of automations deleted or disabled (a disabled automation's waits end with it)."""
        ids = [plan.id for plan in plans if lasting(plan)]
        with self.sessions() as session:
            enabled = select(Automation.id).where(Automation.enabled)
            session.execute(delete(AutomationWait).where(AutomationWait.automation_id.not_in(enabled)))
            session.commit()
            if ids:
                self._read(session, ids)

    def begin(self, plan: Planned, began: datetime) -> None:
        """The plan's condition began at `began` (its own time): wait for it, once whoever saw it first."""
        if began in self._known.get(plan.id, {}):
            return
        wait = _wait(plan, began)
        with self.sessions() as session:
            session.add(_row(wait))
            try:
                session.commit()
            except IntegrityError:  # another scheduler (or this one, before a restart) wrote it
                session.rollback()
        self._know(wait)

    def begin_crossed(self, plan: Planned, began: datetime, crossed: Fence) -> None:
        """A value crossed the plan's threshold at `began`: wait, if `crossed` (its fence) says it is this
        scheduler's crossing; else know the wait of the scheduler that crossed it first."""
        wait = _wait(plan, began)
        with self.sessions() as session:
            if crossed(session):
                session.add(_row(wait))
                session.commit()
                self._know(wait)
                return
            session.rollback()
            self._read(session, [plan.id])

    def _read(self, session: Session, automation_ids: list[int]) -> None:
        """Know the waits the database holds for these automations."""
        rows = session.execute(
            select(AutomationWait.automation_id, AutomationWait.began_at, AutomationWait.due_at).where(
                AutomationWait.automation_id.in_(automation_ids)
            )
        ).all()
        for automation_id, began, due in rows:
            self._know((aware_utc(due), automation_id, aware_utc(began)))

    def end_before_due(self, session: Session, automation_id: int, now: datetime) -> None:
        """The condition ended at `now` (in `session`'s transaction): the waits begun by then and not due
        yet are cancelled (those known here come due still, and find their row gone)."""
        session.execute(
            delete(AutomationWait).where(
                AutomationWait.automation_id == automation_id,
                AutomationWait.began_at <= naive_utc(now),
                AutomationWait.due_at > naive_utc(now),
            )
        )
        self._forget(automation_id, lambda began, due: began <= now < due)

    def earliest(self) -> datetime | None:
        """When the next wait is due."""
        return self._heap[0][0] if self._heap else None

    def due(self, now: datetime) -> list[Wait]:
        """The waits due by `now`, and those due earlier whose node's presence was not seen yet."""
        ready, self._undecided = self._undecided, []
        while self._heap and self._heap[0][0] <= now:
            ready.append(heapq.heappop(self._heap))
        return ready

    def undecided(self, wait: Wait) -> None:
        """Judge this wait again at the next round (its node's presence is not seen yet)."""
        self._undecided.append(wait)

    def verdict(self, trigger: NodePresence, presence: Presence | None, wait: Wait) -> bool | None:
        """Whether the condition lasted until the wait's due time; None: not known yet."""
        due, _, began = wait
        if presence is None:
            return None
        if presence.state == trigger.becomes:  # the same `since`: it never left the state; a later one: began anew
            return presence.since.timestamp() == began.timestamp()
        if presence.since < due:
            return False  # ended before it was due
        # Ended at or after its due time; unless it left and came back before, while no scheduler watched.
        opposite = "online" if trigger.becomes == "offline" else "offline"
        with self.sessions() as session:  # as the recorder wrote the transitions
            broken = session.scalar(
                select(
                    exists().where(
                        NodeAvailability.node_id == trigger.node,
                        NodeAvailability.state == opposite,
                        NodeAvailability.at_ms > millis(began.timestamp()),
                        NodeAvailability.at_ms < millis(due.timestamp()),
                    )
                )
            )
        return not broken

    def value_verdict(self, trigger: NodeValue, latest: object, wait: Wait) -> bool | None:
        """Whether the value stayed past the threshold until the wait's due time; None: no value seen yet.

        A return a scheduler saw cancelled the wait already; one none saw is in the recorder's samples.
        """
        if latest is None:
            return None
        due, _, began = wait
        with self.sessions() as session:
            samples = session.scalars(
                select(NodeSample.value).where(
                    NodeSample.node_id == trigger.node,
                    NodeSample.key == trigger.key,
                    NodeSample.at_ms > millis(began.timestamp()),
                    NodeSample.at_ms < millis(due.timestamp()),
                    NodeSample.value.is_not(None),
                )
            )
            return not any(value_back(trigger, value) for value in samples if value is not None)

    def run_verdict(self, trigger: RunFinished, wait: Wait) -> bool:
        """Whether no run of the script ended otherwise between the wait's beginning and its due time
        (one a scheduler saw cancelled the wait already; the recorder's rows hold the rest)."""
        due, _, began = wait
        with self.sessions() as session:
            ended_otherwise = session.scalar(
                select(
                    exists().where(
                        Run.script == trigger.script,
                        Run.state.in_(runstates.FINISHED_STATES),
                        Run.state.not_in(trigger.states),
                        Run.finished_at > naive_utc(began),
                        Run.finished_at < naive_utc(due),
                    )
                )
            )
        return not ended_otherwise

    def fence(self, wait: Wait) -> Fence:
        """A fire's fence: the wait's row deleted in the fire's transaction; False when it is gone already."""
        _, automation_id, began = wait

        def spend(session: Session) -> bool:
            gone = session.execute(
                delete(AutomationWait).where(
                    AutomationWait.automation_id == automation_id, AutomationWait.began_at == naive_utc(began)
                )
            )
            return bool(gone.rowcount)  # type: ignore[attr-defined]

        return spend

    def cancel(self, wait: Wait) -> None:
        """Drop a wait whose condition did not last (or whose automation is gone or changed)."""
        with self.sessions() as session:
            self.fence(wait)(session)
            session.commit()
        self._forget(wait[1], lambda began, due: began == wait[2])

    def next_due(self, automation_id: int) -> datetime | None:
        """When the automation's earliest known wait is due: its next fire, if the condition lasts."""
        return min(self._known.get(automation_id, {}).values(), default=None)

    def _know(self, wait: Wait) -> None:
        due, automation_id, began = wait
        waits = self._known.setdefault(automation_id, {})
        if began not in waits:
            waits[began] = due
            heapq.heappush(self._heap, wait)
            self.changed.add(automation_id)

    def _forget(self, automation_id: int, which: Callable[[datetime, datetime], bool]) -> None:
        """Forget the automation's waits `which(began, due)` says (their heap entries stay till due, harmless)."""
        waits = self._known.get(automation_id, {})
        for began, due in list(waits.items()):
            if which(began, due):
                del waits[began]
                self.changed.add(automation_id)
        if not waits:
            self._known.pop(automation_id, None)


def _wait(plan: Planned, began: datetime) -> Wait:
    """The plan's wait for a condition that began at `began`."""
    trigger = lasting(plan)
    assert trigger is not None
    return (began + timedelta(seconds=trigger.lasting), plan.id, began)


def _row(wait: Wait) -> AutomationWait:
    due, automation_id, began = wait
    return AutomationWait(automation_id=automation_id, began_at=naive_utc(began), due_at=naive_utc(due))
