"""`python manage.py scheduler`: read settings, wire the scheduler, run until a signal."""

from __future__ import annotations

import logging

from hacer.automations import location_of
from hacer.bus import Bus
from hacer.lifecycle import run_until_signal
from hacer.models import Database
from hacer.settings import Settings
from hacer.topics import Topics
from scheduler.service import Scheduler

log = logging.getLogger(__name__)


def build_scheduler(settings: Settings) -> Scheduler:
    """Build a scheduler (not started) from settings."""
    topics = Topics(settings.topic_prefix)
    database = Database(settings.database_url, settings.database_timeout)
    database.init()
    bus = Bus(
        settings.mqtt_url,
        topics,
        client_id=f"hacer-scheduler-{settings.scheduler_id}",
        presence_topic=topics.build("scheduler_state", settings.scheduler_id),
    )
    return Scheduler(
        bus,
        topics,
        database.session,
        settings.scheduler_id,
        location=location_of(settings.latitude, settings.longitude),
        step_resend_after=settings.step_resend_after,
    )


def main(settings: Settings | None = None) -> None:
    """Run the scheduler until SIGINT or SIGTERM."""
    settings = settings or Settings.from_env()
    scheduler = build_scheduler(settings)
    log.info("starting the scheduler %s", settings.scheduler_id)
    run_until_signal(scheduler)
