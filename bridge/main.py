"""`python manage.py bridge`: read settings, wire the bridge, run until a signal."""

from __future__ import annotations

import logging
import socket

from bridge.service import Bridge
from hacer.bus import Bus
from hacer.lifecycle import run_until_signal
from hacer.settings import Settings
from hacer.topics import DiscoveryTopics, Topics

log = logging.getLogger(__name__)

# The bridge's session outlives a restart by this long: commands sent while it was away are answered
# when it is back (runserver restarts it within a second), not lost; older ones find no session.
SESSION_EXPIRY = 120


def build_bridge(settings: Settings) -> Bridge:
    """Build a bridge (not started) from settings."""
    topics = Topics(settings.topic_prefix)
    bus = Bus(
        settings.mqtt_url,
        topics,
        client_id=f"hacer-bridge-{socket.gethostname()}",
        presence_topic=topics.build("bridge_state"),
        clean_start=False,
        session_expiry=SESSION_EXPIRY,
    )
    return Bridge(
        bus,
        topics,
        discovery_host=settings.discovery_host,
        discovery_port=settings.discovery_port,
        node_port=settings.node_port,
        offline_after=settings.offline_after,
        node_timeout=settings.node_timeout,
        state_dir=settings.state_dir,
        max_nodes=settings.max_nodes,
        new_nodes_per_second=settings.new_nodes_per_second,
        stats_interval=settings.stats_interval,
        lastseen_interval=settings.lastseen_interval,
        poll_plans=settings.poll,
        deadbands=settings.deadbands,
        discovery=DiscoveryTopics(settings.ha_discovery) if settings.ha_discovery else None,
    )


def main(settings: Settings | None = None) -> None:
    """Run the bridge until SIGINT or SIGTERM."""
    settings = settings or Settings.from_env()
    bridge = build_bridge(settings)
    log.info("starting the bridge (broker %s, prefix %s)", settings.mqtt_url, settings.topic_prefix)
    run_until_signal(bridge)
