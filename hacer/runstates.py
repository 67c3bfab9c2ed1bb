"""Run states: the names used by the status topic, the database and the REST API alike."""

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
LOST = "lost"

ALL_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, LOST)
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, LOST})
