"""Claiming run ids: a request is acknowledged once its claim (or its refusal) is in the database."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

from msgspec.structs import replace
from sqlalchemy.exc import SQLAlchemyError

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.messages import RunRequest
from hacer.runstates import RunState
from hacer.topics import Topics
from runner.claims import AlreadyClaimed, ClaimStore, Committed, Hold
from runner.publishing import RunPublisher
from runner.run import Run

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_TRIES = 3  # a claim change that fails for a database error (locked, gone) is tried this often


class Claimer:
    """Claims runs in the ClaimStore, trying again while the database is busy or away."""

    def __init__(
        self, claims: ClaimStore, bus: Bus, topics: Topics, publisher: RunPublisher, stopped: threading.Event
    ) -> None:
        self.claims = claims
        self.bus = bus
        self.topics = topics
        self.publisher = publisher
        self.stopped = stopped  # cuts the waits between tries short

    def claim_or_refuse(
        self, run: Run, message: Message, state: RunState, also: Hold | None = None, committed: Committed | None = None
    ) -> bool:
        """Claim a run and acknowledge its request; tell whether the claim is this runner's."""
        try:
            self.claim(run.run_id, run.request, state, also, committed)
        except AlreadyClaimed:
            log.info("run %s already claimed: duplicate delivery ignored", run.run_id)
            self.say_how_it_ended(run.run_id)
            self.bus.ack(message)
            return False
        except SQLAlchemyError as exc:
            self.publisher.failed(run.run_id, run.request, f"database error, the run was not claimed: {exc}")
            self.bus.ack(message)
            return False
        self.bus.ack(message)
        return True

    def say_how_it_ended(self, run_id: str) -> None:
        """Publish again how a finished run ended, as recorded: a requester that was away then stops asking.

        Requesters send until they see a status; one that missed every status of its run would
        otherwise send its request, refused as a duplicate, forever.
        """
        try:
            ended = self.claims.recorded_end(run_id)
        except SQLAlchemyError:
            return  # it asks again, and is answered then
        if ended is not None:
            self.bus.publish(self.topics.build("run_status", run_id), ended.to_payload())

    def claim(
        self, run_id: str, request: RunRequest, state: str, also: Hold | None = None, committed: Committed | None = None
    ) -> None:
        """Claim a run id, trying again a few times while the database is busy or away."""
        payload = request.to_payload().decode()
        self.with_retries(f"claiming run {run_id}", lambda: self.claims.claim(run_id, payload, state, also, committed))

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        """Call a database operation, again a few times while the database is busy or away."""
        for attempt in range(DB_TRIES):
            try:
                return call()
            except AlreadyClaimed:
                raise
            except SQLAlchemyError as exc:
                if attempt == DB_TRIES - 1:
                    raise
                log.warning("%s failed (%s); trying again", what, str(exc).splitlines()[0])
                self.stopped.wait(1.0)
        raise AssertionError("unreachable")

    def refuse(self, run_id: str | None, request: RunRequest | None, why: str) -> None:
        """Report a request that cannot run (a `failed` status and an exception entry).

        The refusal claims its run id first (as failed), so a request reusing a live run's id
        cannot write into that run.
        """
        request = replace(request or RunRequest("", ()), run_id=run_id or uuid.uuid4().hex)
        assert request.run_id is not None
        try:
            self.claim(request.run_id, request, runstates.FAILED)
        except AlreadyClaimed:
            log.warning("refused a request for run %s, which exists already: %s", request.run_id, why)
            return
        except SQLAlchemyError as exc:
            why = f"{why}; and the database failed: {exc}"
        self.publisher.failed(request.run_id, request, why)
