"""What the scheduler's parts share: an automation as planned, and the counts of what they did."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hacer import runstates
from hacer.automations import AutomationSpec
from hacer.messages import RunRequest


@dataclass
class Planned:
    """An automation as planned here: its definition and next due time."""

    id: int
    spec: AutomationSpec
    since: datetime  # what `every` counts from: when it last changed (aware UTC, whole seconds)
    next_due: datetime | None
    version: datetime  # its row's changed_at, as the database holds it


@dataclass
class Counts:
    """What a scheduler did since it started."""

    fired: int = 0
    fired_elsewhere: int = 0  # fires another scheduler made first
    skipped: int = 0  # due times missed and not run, as their `missed` policy says
    held_back: int = 0  # events and due times that fired nothing: cooldown, mode, a condition, a lost race
    failed: int = 0  # automations whose due times could not be computed: marked failed, never fired
    queued: int = 0  # fires of `queued` automations kept until the runs before them end


def requested_run(
    spec: AutomationSpec, run_id: str, script: str, params: tuple[str, ...], timeout: float | None, at: datetime
) -> tuple[dict[str, Any], bytes]:
    """A run an automation starts: its row (holding the request, as REST's do) and the request's payload."""
    request = RunRequest(script, params, run_id, f"automation:{spec.name}"[:64], timeout)
    payload = request.to_payload()
    row = {
        "run_id": run_id,
        "script": script,
        "params": json.dumps(list(params)),
        "state": runstates.QUEUED,
        "runner": "",
        "requested_by": request.requested_by,
        "request": payload.decode(),
        "requested_at": at,
    }
    return row, payload
