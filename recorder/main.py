"""`python manage.py recorder`: read settings, wire the recorder, run until a signal."""

from __future__ import annotations

import logging

from hacer.bus import Bus
from hacer.lifecycle import run_until_signal
from hacer.messages import RecorderState
from hacer.models import Database
from hacer.settings import Settings
from hacer.topics import Topics
from recorder.retention import Purger, Retention
from recorder.service import Recorder

log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600  # a recorder down for days still catches up


def build_recorder(settings: Settings) -> Recorder:
    """Build a recorder (not started) from settings."""
    topics = Topics(settings.topic_prefix)
    database = Database(settings.database_url, settings.database_timeout)
    database.init()
    bus = Bus(
        settings.mqtt_url,
        topics,
        client_id=f"hacer-recorder-{settings.recorder_id}",
        presence_topic=topics.build("recorder_state", settings.recorder_id),
        will=RecorderState(settings.recorder_id, "offline").to_payload(),
        clean_start=False,
        session_expiry=SESSION_EXPIRY,
        manual_ack=True,
    )
    return Recorder(
        bus,
        topics,
        database.session,
        recorder_id=settings.recorder_id,
        rescue_after=settings.rescue_after,
        node_data_every=settings.node_data_every,
        run_data_every=settings.run_data_every,
        purge=Purger(database.engine, Retention.from_settings(settings)),
        purge_every=settings.purge_every,
    )


def main(settings: Settings | None = None) -> None:
    """Run the recorder until SIGINT or SIGTERM."""
    settings = settings or Settings.from_env()
    recorder = build_recorder(settings)
    log.info("starting the recorder (%s)", settings.database_url.split("@")[-1])
    run_until_signal(recorder)
