"""`GET /metrics`: hacer's counters and gauges in Prometheus' text format, read when scraped.

From the api's live view of the bus (the bridge's counters, every part's retained state), its
own websocket clients, and the database (runs by state, what runners hold unconfirmed, dead
letters). Counters are the parts' own, published retained: a part that restarts starts its
counters again, which Prometheus' rate() takes as a reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.live import LiveView
from hacer.models import Automation, DeadLetter, Run, RunOutbox


class HacerCollector(Collector):
    """Every hacer metric, read from the live view and the database at each scrape."""

    def __init__(self, live: LiveView, sessions: Callable[[], Any], websocket_clients: Callable[[], int]) -> None:
        self.live = live
        self.sessions = sessions
        self.websocket_clients = websocket_clients

    def collect(self) -> Iterator[Metric]:
        """The metrics as they are now."""
        yield from self._bridge()
        yield from self._parts()
        yield GaugeMetricFamily(
            "hacer_api_websocket_clients", "Websocket clients of this api process", value=self.websocket_clients()
        )
        refused = CounterMetricFamily(
            "hacer_api_messages_refused", "Bus messages this api process refused, by subscription", labels=["topic"]
        )
        for topic_filter, count in sorted(dict(self.live.bus.refused).items()):
            refused.add_metric([topic_filter], count)
        yield refused
        yield from self._database()

    def _bridge(self) -> Iterator[Metric]:
        yield _up("hacer_bridge_up", "Whether the bridge says it is online", [((), self.live.bridge_state)])
        nodes = GaugeMetricFamily("hacer_nodes", "Nodes the bridge tracks, by presence", labels=["state"])
        for state in ("online", "offline"):
            nodes.add_metric([state], sum(1 for node in list(self.live.nodes.values()) if node["state"] == state))
        yield nodes
        stats = self.live.bridge_stats
        if stats is None:
            return
        yield CounterMetricFamily("hacer_bridge_datagrams", "UDP datagrams the bridge received", value=stats.datagrams)
        yield CounterMetricFamily("hacer_bridge_beacons_accepted", "Beacons the bridge took", value=stats.accepted)
        dropped = CounterMetricFamily(
            "hacer_bridge_datagrams_dropped", "Datagrams dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "hacer_bridge_kernel_drops",
            "Datagrams the kernel dropped before the bridge read them",
            value=stats.kernel_drops,
        )
        for name, help_text, counts in (
            ("hacer_bridge_commands", "Node commands, by result", stats.commands),
            ("hacer_bridge_polls", "The bridge's own reads of node values, by result", stats.polls),
        ):
            family = CounterMetricFamily(name, help_text, labels=["result"])
            for result, count in sorted(counts.items()):
                family.add_metric([result], count)
            yield family
        yield CounterMetricFamily(
            "hacer_bridge_publish_failures", "Messages the bridge failed to publish", value=stats.publish_failures
        )

    def _parts(self) -> Iterator[Metric]:
        runners = list(self.live.runners.values())
        yield _up(
            "hacer_runner_up",
            "Whether each runner says it is online",
            [((r["runner"],), r["state"]) for r in runners],
            "runner",
        )
        for name, what, key in (
            ("hacer_runner_capacity", "Runs a runner takes at once", "capacity"),
            ("hacer_runner_running", "Runs a runner runs now", "running"),
            ("hacer_runner_queued", "Runs waiting for a runner's free slot", "queued"),
        ):
            gauge = GaugeMetricFamily(name, what, labels=["runner"])
            for runner in runners:
                value = runner[key]
                gauge.add_metric([runner["runner"]], len(value) if isinstance(value, list) else value)
            yield gauge
        recorders = dict(self.live.recorders)
        yield _up(
            "hacer_recorder_up",
            "Whether each recorder says it is online",
            [((name,), state.state) for name, state in recorders.items()],
            "recorder",
        )
        written = CounterMetricFamily("hacer_recorder_written", "Bus messages a recorder wrote", labels=["recorder"])
        set_aside = CounterMetricFamily(
            "hacer_recorder_set_aside", "Bus messages a recorder set aside (dead letters)", labels=["recorder"]
        )
        for name, state in recorders.items():
            written.add_metric([name], state.written)
            set_aside.add_metric([name], state.set_aside)
        yield written
        yield set_aside
        yield _up(
            "hacer_scheduler_up",
            "Whether each scheduler says it is online",
            [((name,), state) for name, state in dict(self.live.schedulers).items()],
            "scheduler",
        )

    def _database(self) -> Iterator[Metric]:
        with self.sessions() as session:
            by_state = session.execute(select(Run.state, func.count()).group_by(Run.state)).tuples().all()
            held, held_bytes = session.execute(select(func.count(), func.coalesce(func.sum(RunOutbox.size), 0))).one()
            letters = session.scalar(select(func.count()).select_from(DeadLetter))
            failed = session.scalar(select(func.count()).where(Automation.failure.is_not(None)))
        runs = GaugeMetricFamily("hacer_runs", "Runs in the database, by state", labels=["state"])
        for state, count in sorted(by_state):
            runs.add_metric([state], count)
        yield runs
        yield GaugeMetricFamily(
            "hacer_unconfirmed_messages",
            "Run statuses and log entries in runners' outboxes: not confirmed by a recorder yet (the recorders' lag),"
            " or confirmed and waiting, HACER_RUNNER_LET_GO_AFTER at most, for the runner's next write",
            value=held,
        )
        yield GaugeMetricFamily("hacer_unconfirmed_bytes", "Their size in bytes", value=held_bytes)
        yield GaugeMetricFamily("hacer_dead_letters", "Bus messages set aside by recorders, kept", value=letters)
        yield GaugeMetricFamily(
            "hacer_automations_failed", "Automations the scheduler cannot plan: never fired, the api says why", failed
        )


def _up(name: str, what: str, states: list[tuple[tuple[str, ...], str]], label: str = "") -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, what, labels=[label] if label else [])
    for labels, state in states:
        gauge.add_metric(list(labels), 1 if state == "online" else 0)
    return gauge
