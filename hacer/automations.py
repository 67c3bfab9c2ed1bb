"""Automations: their definition format, when a time trigger is next due, what a bus event means.

A definition is JSON, declared here once (msgspec) for REST, the CLI and the scheduler:

    {"name": "porch at sunset", "script": "toggle", "params": ["porch", "1"],
     "trigger": {"kind": "sun", "event": "sunset", "offset": -600, "tz": "Europe/Madrid"},
     "missed": "skip", "grace": 60}

Triggers: `cron` (Debian cron's rules, by cronsim, also across daylight-saving changes: a time
in the spring-forward gap fires once, when the gap ends; a time in the repeated fall-back hour
fires once, at its first occurrence; `*` minutes and hours fire in both), `every` (seconds, from
when the automation was last changed), `at` (once, a local time) and `sun` (sunrise, sunset,
dawn, dusk or noon with an offset, at HACER_LATITUDE / HACER_LONGITUDE, by astral); and bus
triggers: `presence` (a node going online or offline), `value` (a node value changing or crossing
a threshold, with hysteresis) and `run` (a script's run ending in given states).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from astral import Observer
from astral.sun import sun
from cronsim import CronSim, CronSimError
from msgspec import Meta, Struct
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from hacer import runstates
from hacer.messages import (
    FIRE_RUN_PREFIX,
    MAX_PARAMS,
    NO_NUL,
    MessageError,
    NodeId,
    Param,
    Payload,
    RunId,
    SetBody,
    SetCommand,
    Time,
    decode,
)
from hacer.models import Automation, AutomationFire, AutomationStep, Node, Run, aware_utc, naive_utc
from hacer.nodewire import MAX_NODE_ID
from hacer.runstates import RunState
from hacer.scriptdir import ScriptDir

ZoneName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+\-/]+$")]
SECONDS_PER_YEAR = 366 * 86400


class Cron(Struct, frozen=True, tag="cron", tag_field="kind", forbid_unknown_fields=True):
    """A cron expression (five fields) in a time zone."""

    cron: Annotated[str, Meta(min_length=9, max_length=128, pattern=NO_NUL)]
    tz: ZoneName = "UTC"


class Every(Struct, frozen=True, tag="every", tag_field="kind", forbid_unknown_fields=True):
    """Every `seconds`, counted from when the automation was last changed."""

    seconds: Annotated[int, Meta(ge=1, le=SECONDS_PER_YEAR)]


class At(Struct, frozen=True, tag="at", tag_field="kind", forbid_unknown_fields=True):
    """Once, at a local time ("2026-12-24T18:00") in a time zone."""

    at: Annotated[str, Meta(min_length=16, max_length=32, pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?$")]
    tz: ZoneName = "UTC"


class Sun(Struct, frozen=True, tag="sun", tag_field="kind", forbid_unknown_fields=True):
    """Daily at a moment of the sun, moved by `offset` seconds (negative: before)."""

    event: Literal["dawn", "sunrise", "noon", "sunset", "dusk"]
    offset: Annotated[int, Meta(ge=-6 * 3600, le=6 * 3600)] = 0
    tz: ZoneName = "UTC"


class NodePresence(Struct, frozen=True, tag="presence", tag_field="kind", forbid_unknown_fields=True):
    """A node going online or offline; with `for`, once it has stayed so that many seconds (from its `since`)."""

    node: NodeId
    becomes: Literal["online", "offline"]
    lasting: Annotated[int, Meta(ge=0, le=7 * 86400)] = msgspec.field(default=0, name="for")


class NodeValue(Struct, frozen=True, tag="value", tag_field="kind", forbid_unknown_fields=True):
    """A node's value changing, or crossing a threshold (`below` or `above`).

    A crossing fires once; it fires again only after the value went back past the threshold by
    `hysteresis` (so 17.9, 18.0, 17.9 around `below: 18` with `hysteresis: 0.5` fires once). With
    `for`, a crossing fires once the value has stayed past the threshold that many seconds (from
    when the bridge read it so); going back past the hysteresis meanwhile cancels it.
    """

    node: NodeId
    key: Annotated[str, Meta(min_length=1, max_length=64)]
    below: float | None = None
    above: float | None = None
    hysteresis: Annotated[float, Meta(ge=0)] = 0.0
    lasting: Annotated[int, Meta(ge=0, le=7 * 86400)] = msgspec.field(default=0, name="for")


class RunFinished(Struct, frozen=True, tag="run", tag_field="kind", forbid_unknown_fields=True):
    """A run of `script` ending in one of `states`; with `for`, once no run of it has ended otherwise
    (succeeded, say) for that many seconds after the first such end (failed, and nothing succeeded for an hour)."""

    script: Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL)]
    states: Annotated[tuple[RunState, ...], Meta(min_length=1)] = ("failed", "timed_out", "lost")
    lasting: Annotated[int, Meta(ge=0, le=7 * 86400)] = msgspec.field(default=0, name="for")


TimeTrigger = Cron | Every | At | Sun
BusTrigger = NodePresence | NodeValue | RunFinished
Trigger = Cron | Every | At | Sun | NodePresence | NodeValue | RunFinished
BUS_TRIGGERS = (NodePresence, NodeValue, RunFinished)
ClockTime = Annotated[str, Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class TimeWindow(Struct, frozen=True, tag="time", tag_field="kind", forbid_unknown_fields=True):
    """Only between `after` and `before` (local "HH:MM"; a window may span midnight)."""

    after: ClockTime
    before: ClockTime
    tz: ZoneName = "UTC"


class ValueIs(Struct, frozen=True, tag="value", tag_field="kind", forbid_unknown_fields=True):
    """Only while a node's value is below, above or equal to something."""

    node: NodeId
    key: Annotated[str, Meta(min_length=1, max_length=64)]
    below: float | None = None
    above: float | None = None
    equals: int | str | None = None


class PresenceIs(Struct, frozen=True, tag="presence", tag_field="kind", forbid_unknown_fields=True):
    """Only while a node is online (or offline)."""

    node: NodeId
    state: Literal["online", "offline"] = "online"


Condition = TimeWindow | ValueIs | PresenceIs
MAX_STEP_SECONDS = 7 * 86400
MAX_STEPS = 32
StepKind = Literal["set", "run", "wait", "wait_for"]
StepState = Literal["waiting", "done", "failed", "timed_out", "cancelled"]


class RunStep(Struct, frozen=True, forbid_unknown_fields=True):
    """Start a script and wait for its run's end; a run that does not succeed ends the steps."""

    script: Annotated[str, Meta(min_length=1, max_length=255, pattern=NO_NUL)]
    params: Annotated[tuple[Param, ...], Meta(max_length=MAX_PARAMS)] = ()
    timeout: Annotated[float, Meta(gt=0, lt=1e9)] | None = None


class WaitFor(Struct, frozen=True, forbid_unknown_fields=True):
    """Wait until `condition` holds, at most `timeout` seconds; then go on (`on_timeout: "stop"` ends the steps)."""

    condition: Condition
    timeout: Annotated[int, Meta(ge=1, le=MAX_STEP_SECONDS)]
    on_timeout: Literal["continue", "stop"] = "continue"


class Step(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One step, exactly one of: `set` a node's keys (`{"node": 7, "on": 1}`), `run` a script, `wait`
    seconds, `wait_for` a condition."""

    set: SetBody | None = None
    run: RunStep | None = None
    wait: Annotated[int, Meta(ge=1, le=MAX_STEP_SECONDS)] | None = None
    wait_for: WaitFor | None = None

    @property
    def kind(self) -> StepKind:
        """Which of the four it is."""
        kinds: tuple[StepKind, ...] = ("set", "run", "wait", "wait_for")
        return next(kind for kind in kinds if getattr(self, kind) is not None)

    def set_node(self) -> int:
        """The node a `set` step names."""
        assert self.set is not None
        node = self.set["node"]
        assert isinstance(node, int)
        return node

    def set_values(self) -> dict[str, bool | int | float | str]:
        """The keys a `set` step sets, with their values as written."""
        assert self.set is not None
        return {key: value for key, value in self.set.items() if key != "node"}


class AutomationSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """What a user defines: when (`trigger`), what (`script` with `params`, or `steps`), and what a late fire does.

    A fire up to `grace` seconds late still happens (a restart, a slow moment); older due times
    are skipped (`missed: "skip"`), or the latest of them runs once (`"run_once"`) if it is at
    most `catch_up` seconds old.
    """

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=NO_NUL)]
    trigger: Trigger
    script: Annotated[str, Meta(max_length=255, pattern=NO_NUL)] = ""  # or `steps`
    params: Annotated[tuple[Param, ...], Meta(max_length=MAX_PARAMS)] = ()
    steps: Annotated[tuple[Step, ...], Meta(max_length=MAX_STEPS)] = ()
    enabled: bool = True
    missed: Literal["skip", "run_once"] = "skip"
    conditions: Annotated[tuple[Condition, ...], Meta(max_length=16)] = ()
    # A bus trigger's fires: at most one per `cooldown` seconds; `single` starts none while a run
    # of this automation is queued or running, `restart` cancels that run and starts the new one,
    # `queued` starts it when the runs before it ended (10 wait at most), `parallel` starts each.
    cooldown: Annotated[int, Meta(ge=0, le=7 * 86400)] = 0
    mode: Literal["single", "restart", "queued", "parallel"] = "single"
    grace: Annotated[int, Meta(ge=0, le=86400)] = 60
    catch_up: Annotated[int, Meta(ge=0, le=7 * 86400)] = 6 * 3600  # how old a due time run_once still runs
    timeout: Annotated[float, Meta(gt=0, lt=1e9)] | None = None

    @classmethod
    def from_json(cls, payload: bytes | str, location: Observer | None = None) -> AutomationSpec:
        """Decode and check a definition; MessageError names the field at fault."""
        spec: AutomationSpec = decode(cls, payload, "automation")
        check_trigger(spec.trigger, location, spec.conditions)
        check_steps(spec)
        return spec

    def scripts(self) -> list[tuple[str, str]]:
        """The scripts it runs, each with the path of the field naming it."""
        named = [(self.script, "$.script")] if self.script else []
        return named + [(s.run.script, f"$.steps[{i}].run.script") for i, s in enumerate(self.steps) if s.run]

    def nodes(self) -> set[int]:
        """The nodes its trigger, conditions and steps name (each must exist when it is saved)."""
        conditions = [*self.conditions, *(step.wait_for.condition for step in self.steps if step.wait_for)]
        named = {c.node for c in conditions if isinstance(c, ValueIs | PresenceIs)}
        named |= {step.set_node() for step in self.steps if step.set is not None}
        if isinstance(self.trigger, NodePresence | NodeValue):
            named.add(self.trigger.node)
        return named

    def to_json(self) -> bytes:
        """Encode as the definition JSON."""
        return msgspec.json.encode(self)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; MessageError when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise MessageError(f"bad automation: unknown time zone {name!r} - at `$.trigger.tz`") from None


def check_steps(spec: AutomationSpec) -> None:
    """Refuse what the declaration cannot: a script and steps both or neither, a step of no or two kinds,
    a `set` without a node id or keys."""
    if bool(spec.script) == bool(spec.steps):
        raise MessageError("bad automation: give `script` or `steps`, one of them - at `$.script`")
    if spec.steps and spec.params:
        raise MessageError("bad automation: `params` go with `script`; a run step has its own - at `$.params`")
    for index, step in enumerate(spec.steps):
        path = f"$.steps[{index}]"
        given = [name for name in step.__struct_fields__ if getattr(step, name) is not None]
        if len(given) != 1:
            raise MessageError(f"bad automation: a step is one of `set`, `run`, `wait`, `wait_for` - at `{path}`")
        if step.set is not None:
            node = step.set.get("node")
            if type(node) is not int or not 0 <= node <= MAX_NODE_ID:
                raise MessageError(f"bad automation: `set` needs a node id - at `{path}.set.node`")
            if len(step.set) < 2:
                raise MessageError(f"bad automation: `set` needs a key to set - at `{path}.set`")
            try:
                SetCommand.of(step.set_values())
            except MessageError as exc:
                raise MessageError(f"bad automation: {exc} - at `{path}.set`") from None
        if step.wait_for is not None and isinstance(step.wait_for.condition, TimeWindow):
            zone(step.wait_for.condition.tz)


def check_trigger(trigger: Trigger, location: Observer | None, conditions: tuple[Condition, ...] = ()) -> None:
    """Refuse what the declaration cannot: a cron expression, a zone or a place that does not exist."""
    for condition in conditions:
        if isinstance(condition, TimeWindow):
            zone(condition.tz)
    if isinstance(trigger, NodeValue) and trigger.below is not None and trigger.above is not None:
        raise MessageError("bad automation: a value trigger has `below` or `above`, not both - at `$.trigger`")
    if isinstance(trigger, NodeValue) and trigger.lasting and trigger.below is None and trigger.above is None:
        raise MessageError("bad automation: `for` needs a threshold, `below` or `above` - at `$.trigger.for`")
    if isinstance(trigger, Cron | At | Sun):
        zone(trigger.tz)
    if isinstance(trigger, Cron):
        try:
            CronSim(trigger.cron, datetime.now(UTC))
        except CronSimError as exc:
            raise MessageError(f"bad automation: {exc} - at `$.trigger.cron`") from None
    if isinstance(trigger, At):
        try:
            datetime.fromisoformat(trigger.at).replace(tzinfo=zone(trigger.tz)).astimezone(UTC)
        except ValueError:
            raise MessageError(f"bad automation: {trigger.at!r} is not a local time - at `$.trigger.at`") from None
        except OverflowError:  # 9999-12-31T23:59 in Los Angeles is in the year 10000 in UTC
            raise MessageError(
                f"bad automation: {trigger.at!r} in {trigger.tz} is past what a date can hold - at `$.trigger.at`"
            ) from None
    if isinstance(trigger, Sun) and location is None:
        raise MessageError("bad automation: a sun trigger needs HACER_LATITUDE and HACER_LONGITUDE - at `$.trigger`")


def next_due(trigger: Trigger, after: datetime, since: datetime, location: Observer | None) -> datetime | None:
    """The first due time strictly after `after` (UTC), or None when there is none any more.

    `since` is when the automation was last changed: `every` counts from it. Bus triggers are
    never due at a time, nor is a trigger whose next time is past the year 9999.
    """
    try:
        return _next_due(trigger, after, since, location)
    except OverflowError:
        return None


def _next_due(trigger: Trigger, after: datetime, since: datetime, location: Observer | None) -> datetime | None:
    if isinstance(trigger, BUS_TRIGGERS):
        return None
    if isinstance(trigger, Every):
        steps = max(1, math.floor((after - since).total_seconds() / trigger.seconds) + 1)
        return since + timedelta(seconds=steps * trigger.seconds)
    if isinstance(trigger, Cron):
        return next(iter(CronSim(trigger.cron, after.astimezone(zone(trigger.tz))))).astimezone(UTC)
    if isinstance(trigger, At):
        moment = datetime.fromisoformat(trigger.at).replace(tzinfo=zone(trigger.tz)).astimezone(UTC)
        return moment if moment > after else None
    assert location is not None, "a sun trigger is refused without a location"
    return _next_sun(trigger, after, location)


def _next_sun(trigger: Sun, after: datetime, location: Observer) -> datetime | None:
    local_zone = zone(trigger.tz)
    day = after.astimezone(local_zone).date() - timedelta(days=1)
    for _ in range(370):  # near the poles the sun may not rise for months
        moment = _sun_moment(trigger, day, location, local_zone)
        if moment is not None and moment > after:
            return moment
        day += timedelta(days=1)
    return None


def _sun_moment(trigger: Sun, day: date, location: Observer, local_zone: ZoneInfo) -> datetime | None:
    try:
        moment: datetime = sun(location, date=day, tzinfo=local_zone)[trigger.event]
    except ValueError:  # the sun does not reach that elevation on that day here
        return None
    return (moment + timedelta(seconds=trigger.offset)).astimezone(UTC)


def fire_run_id(automation_id: int, due: datetime) -> str:
    """The run id of an automation's fire at `due`: the same for every scheduler, so a second fire is a no-op."""
    fraction = f".{due.microsecond:06d}" if due.microsecond else ""  # a bus event's time
    return f"{FIRE_RUN_PREFIX}{automation_id}-{due.astimezone(UTC):%Y%m%dT%H%M%S}{fraction}Z"


def automation_of_run(run_id: str) -> int | None:
    """The automation whose fire a run id names (see fire_run_id), or None."""
    if not run_id.startswith(FIRE_RUN_PREFIX):
        return None
    automation_id = run_id[len(FIRE_RUN_PREFIX) :].partition("-")[0]
    return int(automation_id) if automation_id.isascii() and automation_id.isdigit() else None


def location_of(latitude: float | None, longitude: float | None) -> Observer | None:
    """The place sun triggers are computed for, when the settings give one."""
    if latitude is None or longitude is None:
        return None
    return Observer(latitude, longitude)


# --- on the bus ----------------------------------------------------------------------------


class AutomationState(Payload, frozen=True):
    """An automation as the scheduler plans it, retained on `automations/<id>`."""

    what: ClassVar[str] = "automation"
    id: Annotated[int, Meta(ge=1)]
    definition: AutomationSpec
    next_fire: Time | None = None


class AutomationFired(Payload, frozen=True):
    """One fire: the run it requested, for its due time (`late`: a missed one run on start)."""

    what: ClassVar[str] = "fire"
    id: Annotated[int, Meta(ge=1)]
    name: Annotated[str, Meta(max_length=64, pattern=NO_NUL)]
    due: Time
    run_id: RunId
    scheduler: Annotated[str, Meta(max_length=128, pattern=NO_NUL)]
    late: bool = False


HeldWhy = Literal["conditions", "cooldown", "single", "queue full"]  # why a due time or event did not run


class AutomationHeldBack(Payload, frozen=True):
    """A due time or event an automation did not run for, and why: its trace is in the api's."""

    what: ClassVar[str] = "held"
    id: Annotated[int, Meta(ge=1)]
    name: Annotated[str, Meta(max_length=64, pattern=NO_NUL)]
    due: Time
    why: HeldWhy
    scheduler: Annotated[str, Meta(max_length=128, pattern=NO_NUL)]


class AutomationStepEnded(Payload, frozen=True):
    """A step of a fire ended (`fire`: the fire's run id), with what came of it: its run and the run's
    state, the node's results, the condition as seen."""

    what: ClassVar[str] = "step"
    id: Annotated[int, Meta(ge=1)]
    name: Annotated[str, Meta(max_length=64, pattern=NO_NUL)]
    fire: RunId
    position: Annotated[int, Meta(ge=0, lt=MAX_STEPS)]
    kind: StepKind
    state: StepState
    started: Time
    ended: Time
    outcome: dict[str, Any] = {}


DECLARATIONS = {
    "AutomationSpec": AutomationSpec,
    "AutomationState": AutomationState,
    "AutomationFired": AutomationFired,
    "AutomationHeldBack": AutomationHeldBack,
    "AutomationStepEnded": AutomationStepEnded,
}


# --- in the database -----------------------------------------------------------------------


def plan_start(changed_at: datetime, last_due: datetime | None) -> datetime:
    """Where due times are counted from: the last fire, unless the automation changed since."""
    return last_due if last_due is not None and last_due >= changed_at else changed_at


def upcoming(
    spec: AutomationSpec, changed_at: datetime, after: datetime, location: Observer | None, count: int
) -> list[datetime]:
    """The next `count` due times after `after`."""
    dues: list[datetime] = []
    moment: datetime | None = after
    while moment is not None and len(dues) < count:
        moment = next_due(spec.trigger, moment, anchor(changed_at), location)
        if moment is not None:
            dues.append(moment)
    return dues


def anchor(changed_at: datetime) -> datetime:
    """The whole second `every` triggers count from."""
    return changed_at.replace(microsecond=0)


def start_time(text: str, spec: AutomationSpec) -> datetime:
    """A time to list due times from ("2027-03-27T00:00"): in the trigger's time zone unless it names an offset."""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone(getattr(spec.trigger, "tz", "UTC")))
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise MessageError(f"bad start time {text[:40]!r}: not an ISO 8601 date and time") from None
    if moment.year < 2:  # due times are listed from a moment before it
        raise MessageError(f"bad start time {text[:40]!r}: before the year 2")
    return moment


class NameTaken(ValueError):
    """Another automation has this name."""


def save(session: Session, spec: AutomationSpec, now: datetime, row: Automation | None = None) -> Automation:
    """Add an automation (or replace `row`'s definition); the caller commits. Raises NameTaken."""
    taken = session.scalar(select(Automation.id).where(Automation.name == spec.name))
    if taken is not None and (row is None or taken != row.id):
        raise NameTaken(f"an automation is already named {spec.name!r}")
    if row is None:
        row = Automation()
        session.add(row)
    row.name, row.definition, row.enabled = spec.name, spec.to_json().decode(), spec.enabled
    row.changed_at, row.failure = naive_utc(now), None  # a new definition is planned afresh
    session.flush()
    return row


def find(session: Session, key: str) -> Automation | None:
    """The automation with this id or name."""
    row = session.get(Automation, int(key)) if key.isascii() and key.isdigit() and len(key) < 19 else None
    return row or session.scalar(select(Automation).where(Automation.name == key))


FireRow = tuple[AutomationFire, str | None, int | None]  # a fire, its run's state and exit code


def describe(
    session: Session,
    row: Automation,
    location: Observer | None,
    now: datetime,
    count: int = 5,
    start: datetime | None = None,
) -> dict[str, Any]:
    """An automation for people and programs: its definition, next due times (from `start`, if given: at
    or after it) and last fires with their runs."""
    fires = session.execute(
        select(AutomationFire, func.coalesce(Run.state, _steps_state()), Run.exit_code)
        .outerjoin(Run, Run.run_id == AutomationFire.run_id)
        .where(AutomationFire.automation_id == row.id)
        .order_by(AutomationFire.due_at.desc())
        .limit(10)
    ).all()
    return _described(row, [(fire, state, code) for fire, state, code in fires], location, now, count, start)


def _steps_state() -> Any:
    """A fire with steps as a run's state: running while its last step begun waits, succeeded when that
    one was done (it was the last: a step done begins the next), cancelled (mode restart), else failed."""
    last = (
        select(AutomationStep.state)
        .where(AutomationStep.run_id == AutomationFire.run_id)
        .order_by(AutomationStep.position.desc())
        .limit(1)
        .correlate(AutomationFire)
        .scalar_subquery()
    )
    return case(
        (last == "waiting", runstates.RUNNING),
        (last == "done", runstates.SUCCEEDED),
        (last == "cancelled", runstates.CANCELLED),
        (last.is_not(None), runstates.FAILED),
        else_=None,
    )


def describe_all(session: Session, location: Observer | None, now: datetime) -> list[dict[str, Any]]:
    """Every automation, each with its next due time and its last fire, in two queries whatever their number."""
    latest = (
        select(AutomationFire.automation_id, func.max(AutomationFire.due_at).label("due_at"))
        .group_by(AutomationFire.automation_id)
        .subquery()
    )
    last_fires = {
        fire.automation_id: (fire, state, exit_code)
        for fire, state, exit_code in session.execute(
            select(AutomationFire, func.coalesce(Run.state, _steps_state()), Run.exit_code)
            .join(
                latest,
                (latest.c.automation_id == AutomationFire.automation_id) & (latest.c.due_at == AutomationFire.due_at),
            )
            .outerjoin(Run, Run.run_id == AutomationFire.run_id)
        )
    }
    rows = session.scalars(select(Automation).order_by(Automation.id)).all()
    return [_described(row, [last_fires[row.id]] if row.id in last_fires else [], location, now, 1) for row in rows]


def _described(
    row: Automation,
    fires: list[FireRow],
    location: Observer | None,
    now: datetime,
    count: int,
    start: datetime | None = None,
) -> dict[str, Any]:
    spec = decode(AutomationSpec, row.definition, "automation")
    changed_at = aware_utc(row.changed_at)
    last_due = aware_utc(fires[0][0].due_at) if fires else None
    # A start asked for counts itself in: a due time at 00:00 is listed `from` 00:00.
    start = max(plan_start(changed_at, last_due), now) if start is None else start - timedelta(microseconds=1)
    failure = row.failure
    next_fires: list[datetime] = []
    if row.enabled and failure is None:
        try:
            next_fires = upcoming(spec, changed_at, start, location, count)
        except Exception as exc:  # the scheduler marks it failed too; the list stays readable for the others
            failure = f"{type(exc).__name__}: {exc}"
    return {
        "id": row.id,
        "name": row.name,
        "enabled": row.enabled,
        "definition": msgspec.to_builtins(spec),
        "changed_at": changed_at.isoformat(),
        "failure": failure,
        "next_fires": [due.isoformat() for due in next_fires],
        "last_runs": [
            {
                "due": aware_utc(fire.due_at).isoformat(),
                "run_id": fire.run_id,
                "late": fire.late,
                "state": "pending" if fire.pending else state or runstates.QUEUED,
                "exit_code": exit_code,
            }
            for fire, state, exit_code in fires
        ],
    }


def missing_references(session: Session, spec: AutomationSpec, scripts: ScriptDir) -> str | None:
    """What a definition names that does not exist (a script, a node), as a refusal; None when all do."""
    for script, path in spec.scripts():
        if scripts.find(script) is None:
            return f"bad automation: no script named {script!r} - at `{path}`"
    for node_id in sorted(spec.nodes()):
        if session.get(Node, node_id) is None:
            return f"bad automation: no node {node_id} - at `$.trigger.node`, `$.conditions` or `$.steps`"
    return None
