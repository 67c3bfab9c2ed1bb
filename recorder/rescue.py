"""Run requests no runner took: sent again, ever less often, while a runner is online to take them."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hacer import runstates
from hacer.bus import Bus, named_decoder
from hacer.messages import RunnerState
from hacer.models import Run, utc_datetime
from hacer.topics import Topics

log = logging.getLogger(__name__)

MAX_RESCUE_EVERY = 60.0  # seconds between two sends of a request no runner takes, at most


class Rescuer:
    """Sends again the requests no runner took within `rescue_after` seconds, then at doubling intervals."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        sessions: sessionmaker[Session],
        rescue_after: float,
        clock: Callable[[], float],
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.sessions = sessions
        self.rescue_after = rescue_after
        self.clock = clock
        self.rescued = 0
        self.online_runners: set[str] = set()
        self._resends: dict[str, tuple[float, float]] = {}  # run id -> (last sent here, seconds until the next)

    def start(self) -> None:
        """Follow which runners are online (nothing is sent while none is)."""
        self.bus.subscribe_decoded(
            self.topics.filter("runner_state"),
            named_decoder(self.topics, RunnerState.from_payload, lambda state: state.runner, "runner"),
            self._on_runner_state,
        )

    def loop(self, stopped: threading.Event) -> None:
        """Rescue until `stopped` is set."""
        while not stopped.wait(min(1.0, self.rescue_after / 2)):
            try:
                self.round()
            except Exception:
                log.exception("rescuing run requests failed")

    def round(self) -> None:
        """Rescue now, if a runner is online to take the requests and the broker is there to carry them."""
        if self.online_runners and self.bus.connected:
            self.rescue()

    def rescue(self) -> None:
        """Send again what is due.

        A request keeps its time (`requested_at`); when it was last sent is this recorder's to know.
        """
        now = self.clock()
        cutoff = utc_datetime(now - self.rescue_after)
        with self.sessions() as session:
            stale = session.execute(
                select(Run.run_id, Run.request).where(
                    Run.runner == "", Run.state == runstates.QUEUED, Run.request != "", Run.requested_at < cutoff
                )
            ).all()
        resent = {run_id: self._resends.get(run_id, (-math.inf, 0.0)) for run_id, _ in stale}
        due = [(run_id, request) for run_id, request in stale if now - resent[run_id][0] >= resent[run_id][1]]
        for run_id, request in due:
            self.bus.publish(self.topics.build("run_request"), request)
            resent[run_id] = (now, min(max(self.rescue_after, resent[run_id][1] * 2), MAX_RESCUE_EVERY))
        self._resends = resent  # runs taken since are forgotten
        self.rescued += len(due)
        if due:
            log.warning(
                "%d run(s) not taken by any runner for %g s or more, requested again (%d wait): %s",
                len(due),
                self.rescue_after,
                len(stale),
                " ".join(run_id for run_id, _ in due[:10]) + (" ..." if len(due) > 10 else ""),
            )

    def _on_runner_state(self, state: RunnerState) -> None:
        if state.state == "online":
            self.online_runners.add(state.runner)
        else:
            self.online_runners.discard(state.runner)
