"""How the scheduler judges a bus event: a value crossing a threshold (with hysteresis), and an
automation's conditions as they are now, each with what it saw (a trace keeps them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from hacer.automations import AutomationSpec, Condition, NodeValue, PresenceIs, TimeWindow, zone
from hacer.messages import Presence


def crossing(trigger: NodeValue, value: float, armed: bool) -> tuple[bool, bool]:
    """(fires, armed after) for a threshold trigger seeing `value` while `armed`."""
    past, back = value_past(trigger, value), value_back(trigger, value)
    if armed and past:
        return True, False
    return False, armed or back


def value_past(trigger: NodeValue, value: float) -> bool:
    """Whether `value` is past a threshold trigger's threshold."""
    if trigger.below is not None:
        return value < trigger.below
    assert trigger.above is not None
    return value > trigger.above


def value_back(trigger: NodeValue, value: float) -> bool:
    """Whether `value` is back past a threshold trigger's hysteresis (the trigger armed again)."""
    if trigger.below is not None:
        return value >= trigger.below + trigger.hysteresis
    assert trigger.above is not None
    return value <= trigger.above - trigger.hysteresis


@dataclass(frozen=True)
class NodesSeen:
    """What a scheduler last saw of the nodes: their values and their presence."""

    values: dict[int, dict[str, Any]]
    presence: dict[int, Presence]


def conditions_seen(spec: AutomationSpec, now: datetime, seen: NodesSeen) -> list[dict[str, Any]]:
    """Each condition with what it saw (the local time, or the node's value) and whether it held: a trace's."""
    return [condition_seen(condition, now, seen) for condition in spec.conditions]


def condition_seen(condition: Condition, now: datetime, seen: NodesSeen) -> dict[str, Any]:
    """A condition with what it saw (the local time, a node's value or presence) and whether it held."""
    if isinstance(condition, TimeWindow):
        value: Any = now.astimezone(zone(condition.tz)).strftime("%H:%M")
        after, before = condition.after, condition.before
        held = after <= value < before if after <= before else value >= after or value < before
    elif isinstance(condition, PresenceIs):
        presence = seen.presence.get(condition.node)
        value = None if presence is None else presence.state
        held = value == condition.state
    else:
        value = seen.values.get(condition.node, {}).get(condition.key)
        number = value if type(value) is int else None
        held = (
            value is not None
            and (condition.equals is None or value == condition.equals)
            and (condition.below is None or (number is not None and number < condition.below))
            and (condition.above is None or (number is not None and number > condition.above))
        )
    return {"condition": msgspec.to_builtins(condition), "seen": value, "held": held}


def conditions_hold(seen: list[dict[str, Any]]) -> bool:
    """Whether every condition held, as conditions_seen() saw them."""
    return all(condition["held"] for condition in seen)
