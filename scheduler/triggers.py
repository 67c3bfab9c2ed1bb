"""Bus triggers: a node's presence or value, a run's end, fed to the automations they concern.

A value trigger keeps its last value and its hysteresis (armed or not) in `automation_trigger`,
moved by conditional UPDATEs: one scheduler's crossing, one fire.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.automations import NodePresence, NodeValue, RunFinished, automation_of_run
from hacer.bus import Message
from hacer.messages import MessageError, NodeReadings, Presence, RunStatus
from hacer.models import AutomationTrigger
from hacer.topics import TopicError, Topics
from scheduler.firing import Fence, Firer, Trace
from scheduler.judging import NodesSeen, conditions_hold, conditions_seen, crossing
from scheduler.plans import Counts, Planned
from scheduler.waits import Waits, lasting

log = logging.getLogger(__name__)


class BusTriggers:
    """Feeds bus events to the automations they may trigger, through the Firer."""

    def __init__(
        self,
        topics: Topics,
        sessions: sessionmaker[Session],
        firer: Firer,
        planned: Callable[[int], Planned | None],
        now: Callable[[], datetime],
        counts: Counts,
    ) -> None:
        self.topics = topics
        self.sessions = sessions
        self.firer = firer
        self.planned = planned
        self.now = now
        self.counts = counts
        self._values: dict[int, dict[str, Any]] = {}  # node values as last seen, for conditions
        self._read_at: dict[int, dict[str, datetime]] = {}  # and when each was read: a value wait's beginning
        self._by_node: dict[int, list[Planned]] = {}  # the bus plans each node's messages concern
        self._by_script: dict[str, list[Planned]] = {}
        # What this scheduler last read or wrote of each value trigger's row: (version, armed, value).
        # A message that changes nothing there needs no database; a stale copy only costs a failed fence.
        self._seen: dict[int, tuple[datetime, bool, str]] = {}
        self._presence: dict[int, Presence] = {}  # each node's as last seen, for `for` triggers
        self.waits = Waits(sessions)

    def index(self, planned: Iterable[Planned], fresh: Iterable[Planned]) -> None:
        """Know which plans each node and script concern; `fresh` ones see a node's known value now."""
        self._by_node, self._by_script = {}, {}
        for plan in planned:
            trigger = plan.spec.trigger
            if isinstance(trigger, NodePresence | NodeValue):
                self._by_node.setdefault(trigger.node, []).append(plan)
            elif isinstance(trigger, RunFinished):
                self._by_script.setdefault(trigger.script, []).append(plan)
        for plan in fresh:  # a trigger whose node's value or presence is known sees it now, not at its next change
            trigger = plan.spec.trigger
            if isinstance(trigger, NodeValue) and trigger.node in self._values:
                self._on_value(plan, trigger, self._values[trigger.node])
            if isinstance(trigger, NodePresence) and trigger.lasting:
                seen = self._presence.get(trigger.node)
                if seen is not None and seen.state == trigger.becomes:
                    self.waits.begin(plan, seen.since)

    @property
    def seen(self) -> NodesSeen:
        """Each node's values and presence as last seen."""
        return NodesSeen(self._values, self._presence)

    def handle(self, message: Message) -> None:
        """Feed a bus event to the automations it may trigger."""
        try:
            name, arg = self.topics.parse(message.topic)
            if not message.payload:
                return
            if name == "node_readings":
                readings = NodeReadings.from_payload(message.payload)
                if readings.node_id != self.topics.node_id(message.topic):
                    raise MessageError("the topic names another node")
                self._read_at[readings.node_id] = {key: reading.at for key, reading in readings.values.items()}
                self._on_values(readings.node_id, {key: reading.value for key, reading in readings.values.items()})
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

    def _event(self, plan: Planned, due: datetime, cause: dict[str, Any], fence: Fence | None = None) -> None:
        """A bus event for `plan` at `due` (`cause` says what it was): fired within grace, else as `missed` says."""
        now = self.now()
        if due <= plan.since:
            return  # before the automation (or its last change) existed
        lateness = (now - due).total_seconds()
        if lateness > plan.spec.grace and not (plan.spec.missed == "run_once" and lateness <= plan.spec.catch_up):
            self.counts.skipped += 1
            return
        seen = conditions_seen(plan.spec, now, self.seen)
        trace = Trace(cause, seen)
        if not conditions_hold(seen):
            self.counts.held_back += 1
            with self.sessions() as session:
                # The event is still spent (a crossing fires again only after re-arming); its trace is
                # kept by the scheduler that spent it.
                if fence is None or fence(session):
                    self.firer.held(session, plan, due, trace, "conditions")
                session.commit()
            return
        self.firer.fire(plan, due, late=lateness > plan.spec.grace, fence=fence or (lambda session: True), trace=trace)

    def time_trace(self, plan: Planned, due: datetime) -> Trace | None:
        """A due time's trace, with its conditions as they are now; None when they do not hold (not fired)."""
        trace = Trace({"kind": "time", "due": due.isoformat()}, conditions_seen(plan.spec, self.now(), self.seen))
        if not conditions_hold(trace.conditions):
            self.counts.held_back += 1
            with self.sessions() as session:
                self.firer.held(session, plan, due, trace, "conditions")
                session.commit()
            return None
        return trace

    def fire_waits(self) -> None:
        """Judge the `for` waits that are due: fired if their condition lasted, else cancelled."""
        for wait in self.waits.due(self.now()):
            due, automation_id, began = wait
            plan = self.planned(automation_id)
            trigger = None if plan is None else lasting(plan)
            if plan is None or trigger is None:  # gone, disabled, or no `for` any more
                self.waits.cancel(wait)
                continue
            if isinstance(trigger, NodePresence):
                lasted = self.waits.verdict(trigger, self._presence.get(trigger.node), wait)
                cause = {"kind": "presence", "node": trigger.node, "state": trigger.becomes}
            elif isinstance(trigger, RunFinished):
                lasted = self.waits.run_verdict(trigger, wait)
                cause = {"kind": "run", "script": trigger.script, "states": list(trigger.states)}
            else:
                latest = self._values.get(trigger.node, {}).get(trigger.key)
                lasted = self.waits.value_verdict(trigger, latest, wait)
                cause = value_cause(plan, latest)
            if lasted is None:
                self.waits.undecided(wait)
                continue
            if lasted:
                self._event(
                    plan, due, {**cause, "since": began.isoformat(), "for": trigger.lasting}, self.waits.fence(wait)
                )
            self.waits.cancel(wait)  # fired (its row went with the fire), held back, too late, or not lasted

    def _on_presence(self, presence: Presence) -> None:
        self._presence[presence.id] = presence
        for plan in self._by_node.get(presence.id, ()):
            trigger = plan.spec.trigger
            if isinstance(trigger, NodePresence) and trigger.lasting:
                if presence.state == trigger.becomes:
                    self.waits.begin(plan, presence.since)
            elif isinstance(trigger, NodePresence) and presence.state == trigger.becomes:
                # `since` is the transition's own time, the same in every copy: one fire row per transition.
                cause = {"kind": "presence", "node": presence.id, "state": presence.state}
                self._event(plan, presence.since, {**cause, "since": presence.since.isoformat()})

    def _on_run_status(self, status: RunStatus) -> None:
        if status.state not in runstates.FINISHED_STATES or status.finished_at is None:
            return
        owner = automation_of_run(status.run_id)  # one of ours ended: a queued fire may start
        plan = None if owner is None else self.planned(owner)
        if plan is not None and plan.spec.mode == "queued":
            self.firer.drain(plan)  # the database says whether its run really ended
        for plan in self._by_script.get(status.script, ()):
            trigger = plan.spec.trigger
            assert isinstance(trigger, RunFinished)
            if trigger.lasting and status.finished_at <= plan.since:
                continue  # ended before the automation (or its last change) existed
            if trigger.lasting and status.state in trigger.states:
                if self.waits.next_due(plan.id) is None:  # the first of a streak starts the clock
                    self.waits.begin(plan, status.finished_at)
            elif trigger.lasting:  # ended otherwise: the streak is over
                with self.sessions() as session:
                    self.waits.end_before_due(session, plan.id, status.finished_at)
                    session.commit()
            elif status.state in trigger.states:
                cause = {"kind": "run", "run_id": status.run_id, "script": status.script, "state": status.state}
                self._event(plan, status.finished_at, {**cause, "finished_at": status.finished_at.isoformat()})

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

        self._event(plan, self.now(), value_cause(plan, value, before=json.loads(before)), fence)

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
                    if trigger.lasting:  # back when the bridge read it so
                        self.waits.end_before_due(session, plan.id, self._read_at_or_now(trigger))
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

        if trigger.lasting:  # from when the bridge read the value that crossed
            self.waits.begin_crossed(plan, self._read_at_or_now(trigger), fence)
        else:
            self._event(plan, self.now(), value_cause(plan, value), fence)

    def _read_at_or_now(self, trigger: NodeValue) -> datetime:
        """When the bridge read the trigger's value as it is now (now, for a value without its reading)."""
        return self._read_at.get(trigger.node, {}).get(trigger.key) or self.now()


def value_cause(plan: Planned, value: Any, **more: Any) -> dict[str, Any]:
    """A value trigger's cause, for the fire's trace: the node, the key and the value it saw."""
    trigger = plan.spec.trigger
    assert isinstance(trigger, NodeValue)
    return {"kind": "value", "node": trigger.node, "key": trigger.key, "value": value, **more}
