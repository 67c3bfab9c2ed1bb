"""What the api's handlers use: settings, the bus and its live view, the database, the scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.live import LiveView
from hacer import runstates
from hacer.bus import Bus
from hacer.models import Node, Run, utc_datetime
from hacer.nodecommands import NodeCommandClient
from hacer.scriptdir import ScriptDir
from hacer.settings import Settings
from hacer.topics import Topics


@dataclass
class Services:
    """The api's collaborators, built by create_app (nothing started there)."""

    settings: Settings
    topics: Topics
    bus: Bus
    live: LiveView
    commands: NodeCommandClient
    sessions: sessionmaker[Session]
    scripts: ScriptDir
    sync_commits: Callable[[], None]  # what the sessions committed survives a power cut once this returns

    def publish_meta(self, node: Node) -> None:
        """Publish a node's retained `meta` (after a rename)."""
        self.bus.publish(self.topics.build("node_meta", node.id), node.meta().to_payload(), retain=True)

    def record_request(self, run_id: str, script: str, params: list[Any], payload: bytes) -> tuple[int, str | None]:
        """Insert the run row of a REST request; return its 2015 thread id, and None.

        A run id recorded already keeps its row: its thread id and the request it holds are returned.
        """
        with self.sessions() as session:
            run = Run(
                run_id=run_id,
                script=script,
                params=json.dumps([str(p) for p in params]),
                state=runstates.QUEUED,
                runner="",
                requested_by="rest",
                request=payload.decode(),
                requested_at=utc_datetime(time.time()),
            )
            session.add(run)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                kept = session.scalars(select(Run).where(Run.run_id == run_id)).one()
                return kept.id, kept.request
        # The answer says the run is recorded: so it is after a power cut too, not only a crash.
        self.sync_commits()
        return run.id, None

    def versions(self) -> dict[str, str]:
        """Versions of hacer's main dependencies."""
        found = {}
        for package in ("flask", "flask-socketio", "eventlet", "paho-mqtt", "sqlalchemy"):
            try:
                found[package] = version(package)
            except PackageNotFoundError:
                found[package] = "not installed"
        return found
