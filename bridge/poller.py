"""Keeps node values current: reads each online node's keys on its type's interval.

A 2015 node never pushes its values, so the bridge asks. Each node's first read falls at a
random point of its interval, so a thousand nodes spread their reads instead of arriving
together; a set of one of the keys it reads is read back a moment later, so the value shown is
the node's own (a set of another key, a name say, reads nothing: the firmware serves four
clients at most).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from hacer.settings import PollPlan

READ_BACK_AFTER = 1.0  # seconds after a set before its key is read back


class Poller:
    """Asks for each online node's planned keys when they are due; see the module docstring."""

    def __init__(
        self,
        plans: dict[str, PollPlan],
        poll: Callable[[list[tuple[int, tuple[str, ...]]]], None],
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self.plans = plans
        self._poll = poll
        self._random_fraction = random_fraction
        self._due: dict[int, tuple[float, PollPlan]] = {}  # node -> when its next read is due, and its plan

    def run_due(self, online: Iterable[tuple[int, str]], now: float) -> None:
        """Poll the online nodes whose reads are due (in one call); forget the nodes not online."""
        due: dict[int, tuple[float, PollPlan]] = {}
        polls: list[tuple[int, tuple[str, ...]]] = []
        for node_id, node_type in online:
            plan = self.plans.get(node_type)
            if plan is None:
                continue
            followed = self._due.get(node_id)
            if followed is None:
                when = now + self._random_fraction() * plan.interval
            elif followed[0] <= now:
                polls.append((node_id, plan.keys))
                when = now + plan.interval
            else:
                when = followed[0]
            due[node_id] = (when, plan)
        self._due = due
        if polls:
            self._poll(polls)

    def read_back(self, node_id: int, key: str, now: float) -> None:
        """Read a node's planned keys again shortly, after a set of one of them."""
        due = self._due  # run_due() (another thread) may put a new one in its place meanwhile
        followed = due.get(node_id)
        if followed is not None and key in followed[1].keys:
            due[node_id] = (min(followed[0], now + READ_BACK_AFTER), followed[1])
