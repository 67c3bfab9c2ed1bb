"""Requesting a run over the bus, sent again until a runner has claimed it.

The broker may lose an acknowledged request (it saves after it acknowledges), and drops one no
runner session subscribes to yet, so a requester keeps sending it, after every reconnect and
every `RESEND_EVERY` seconds, until the run's first status says a runner took it. Runners claim
by run id, so the copies run once.
"""

from __future__ import annotations

import threading
import time

from hacer.bus import Bus, Message
from hacer.messages import MessageError, RunRequest, RunStatus

RESEND_EVERY = 2.0


def request_until_claimed(bus: Bus, request: RunRequest, timeout: float = 10.0) -> RunStatus | None:
    """Publish `request` (which names its run id) until a status of the run arrives; None after `timeout`."""
    assert request.run_id is not None, "only a request with a run id can be sent again safely"
    topics = bus.topics
    status_topic = topics.build("run_status", request.run_id)
    claimed: list[RunStatus] = []
    wake = threading.Event()

    def on_status(message: Message) -> None:
        try:
            claimed.append(RunStatus.from_payload(message.payload))
        except MessageError:
            return
        wake.set()

    def on_connect(session_present: bool) -> None:
        wake.set()

    bus.subscribe(status_topic, on_status)
    bus.on_connect(on_connect)
    try:
        bus.wait_connected(timeout)
        bus.sync()
        deadline = time.monotonic() + timeout
        while not claimed:
            if bus.connected:
                bus.publish(topics.build("run_request"), request.to_payload())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wake.wait(min(RESEND_EVERY, remaining))
            wake.clear()
        return claimed[0]
    finally:
        bus.unsubscribe(status_topic)
        bus.remove_connect_hook(on_connect)
