"""Run states: the names used by the status topic, the database and the REST API alike."""

from typing import Final, Literal, get_args

RunState = Literal["queued", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"]

QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
TIMED_OUT: Final = "timed_out"
LOST: Final = "lost"

ALL_STATES: tuple[str, ...] = get_args(RunState)
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, LOST})
