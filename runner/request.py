"""`manage.py run SCRIPT [PARAMS...]`: request a run from a terminal and follow it to its end.

The script's `output` entries go to stdout as they come, the other entries to stderr; the exit
code is the run's (0 when it succeeded). Ctrl-C cancels the run; a second one stops waiting.
"""

from __future__ import annotations

import queue
import signal
import sys
import time
import uuid
from typing import TextIO

from hacer import runstates
from hacer.bus import Bus, Message
from hacer.messages import LogEntry, MessageError, RunRequest, RunStatus
from hacer.topics import TopicError
from scripting.runrequest import RESEND_EVERY, request_until_claimed

NO_RUNNER_NOTICE_AFTER = 5.0  # seconds without a status before saying why nothing happens
EXIT_ENTRY_WAIT = 2.0  # the exit_status entry is published just before the final status
DETACHED_CLAIM_WAIT = 10.0  # seconds --detach sends its request until a runner takes it
CTRL_C = object()  # put in the inbox by the SIGINT handler
RECONNECTED = object()  # put in the inbox after every connect

Inbox = queue.SimpleQueue[object]  # messages and CTRL_C


def request_run(
    bus: Bus, script: str, params: list[str], *, follow: bool = True, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Publish a run request; with `follow`, print its log until it ends and return its exit code."""
    topics = bus.topics
    run_id = uuid.uuid4().hex
    # A SimpleQueue, because its put may interrupt its own get in the same thread (the signal handler).
    inbox: Inbox = queue.SimpleQueue()
    if follow:  # subscribed before the request goes out, so nothing is missed
        for name in ("run_log", "run_status"):
            bus.subscribe(topics.build(name, run_id), inbox.put)
    bus.start()
    bus.wait_connected(10)
    bus.sync()
    request = RunRequest(script, tuple(params), run_id, "cli")
    if not follow:
        if request_until_claimed(bus, request, DETACHED_CLAIM_WAIT) is None:
            print(f"no runner has taken run {run_id} yet: it waits for one", file=err)
        print(run_id, file=out)
        return 0
    # From the request on, Ctrl-C arrives as an inbox item rather than a KeyboardInterrupt, which
    # could strike anywhere (while printing an entry, say) and end the command without cancelling.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: inbox.put(CTRL_C))
    bus.on_connect(lambda session_present: inbox.put(RECONNECTED))
    try:
        print(f"run {run_id}: {script} {' '.join(params)}".rstrip(), file=err)
        return _follow(bus, request, inbox, out, err)
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(bus: Bus, request: RunRequest, inbox: Inbox, out: TextIO, err: TextIO) -> int:
    run_id = request.run_id
    status: RunStatus | None = None
    exit_entry_seen = noticed = cancelled = False
    last_seq = 0
    notice_at = time.monotonic() + NO_RUNNER_NOTICE_AFTER
    send_at = 0.0
    while True:
        finished = status is not None and status.state in runstates.FINISHED_STATES
        if finished and (exit_entry_seen or (status and status.state == runstates.LOST)):  # lost: no exit entry
            break
        if status is None and time.monotonic() >= send_at:  # sent until a runner has taken it
            if bus.connected:
                bus.publish(bus.topics.build("run_request"), request.to_payload())
            send_at = time.monotonic() + RESEND_EVERY
        if status is None and not noticed and time.monotonic() >= notice_at:
            print(f"no runner has taken run {run_id} yet: is one running on this broker?", file=err)
            noticed = True
        timeout = EXIT_ENTRY_WAIT if finished else max(0.0, send_at - time.monotonic()) if status is None else None
        try:
            message = inbox.get(timeout=timeout)
        except queue.Empty:
            if finished:
                break  # its exit_status entry did not come: the status says enough
            continue
        if message is RECONNECTED:
            send_at = 0.0  # the broker may have lost it: send again at once unless taken
            continue
        if message is CTRL_C:
            if cancelled:
                return 130
            cancelled = True
            print(f"cancelling run {run_id} (Ctrl-C again to stop waiting)", file=err)
            bus.publish(bus.topics.build("run_cancel", run_id), b"")
            continue
        assert isinstance(message, Message)
        try:
            if bus.topics.parse(message.topic)[0] == "run_status":
                status = RunStatus.from_payload(message.payload)
                continue
            entry = LogEntry.from_payload(message.payload)
        except (MessageError, TopicError) as exc:
            print(f"ignored a bad message on {message.topic}: {exc}", file=err)
            continue
        if entry.seq <= last_seq:  # delivered again (QoS 1 is at least once, e.g. across a broker restart)
            continue
        last_seq = entry.seq
        exit_entry_seen = exit_entry_seen or entry.entry_type == "exit_status"
        if entry.entry_type == "output":
            print(entry.data, file=out, flush=True)
        else:
            print(f"[{entry.entry_type}] {entry.data}", file=err, flush=True)
    assert status is not None
    why = f": {status.error}" if status.error and status.error != status.state else ""
    print(f"run {run_id} {status.state}{why}", file=err)
    if status.state == runstates.SUCCEEDED:
        return 0
    return status.exit_code if status.exit_code and status.exit_code > 0 else 1
