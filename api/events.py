"""Websockets: a snapshot on connect, then every change of the live view, numbered to resume.

Events go to every client except run log entries, which go to the room of their run (a client
joins it with `watch_run`). A client that reconnects sends `resume` with the last `seq` it saw
and gets what it missed, or a fresh snapshot when that is no longer kept.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import request
from flask_socketio import SocketIO, join_room, leave_room

from api.live import Event, LiveView, run_room

log = logging.getLogger(__name__)


# A client with more packets than this waiting to be sent is too slow: it is disconnected (its
# queue dropped) and, once back, resumes from its last seq or gets a snapshot. Emitting only
# queues, so a slow client never delays the others; this bounds the memory it can hold.
MAX_QUEUED_PACKETS = 2000


def attach(socketio: SocketIO, live: LiveView, token: str) -> None:
    """Register the websocket handlers and relay the live view's events."""

    def relay(event: Event) -> None:
        socketio.emit("event", {k: v for k, v in event.items() if k != "room"}, to=event["room"])

    live.add_listener(relay)

    def drop_slow_clients() -> None:
        while True:
            socketio.sleep(1.0)
            engine = getattr(socketio.server, "eio", None)
            for eio_socket in list(getattr(engine, "sockets", {}).values()):
                queue = getattr(eio_socket, "queue", None)
                if queue is not None and queue.qsize() > MAX_QUEUED_PACKETS:
                    log.warning(
                        "websocket client %s is %d packets behind: disconnecting it", eio_socket.sid, queue.qsize()
                    )
                    eio_socket.close(wait=False, abort=True)

    watchdog: list[Any] = []  # started by the first client, so it runs in the server's loop

    def catch_up(seq: Any) -> None:
        """Send the events after `seq`, or a snapshot when they are not all kept any more."""
        with live.held_back():  # nothing newer overtakes what this client is sent
            missed = live.since(seq) if isinstance(seq, int) else None
            if missed is None:
                socketio.emit("snapshot", live.snapshot(), to=request.sid)  # type: ignore[attr-defined]
                return
            for event in missed:
                socketio.emit("event", {k: v for k, v in event.items() if k != "room"}, to=request.sid)  # type: ignore[attr-defined]

    @socketio.on("connect")
    def connect(auth: Any = None) -> bool:
        auth = auth if isinstance(auth, dict) else {}
        if token and not hmac.compare_digest(str(auth.get("token", "")).encode(), token.encode()):
            return False
        if not watchdog:
            watchdog.append(socketio.start_background_task(drop_slow_clients))
        catch_up(auth.get("seq"))
        return True

    @socketio.on("resume")
    def resume(data: Any = None) -> None:  # a client may send an event without data
        catch_up(data.get("seq") if isinstance(data, dict) else None)

    @socketio.on("watch_run")
    def watch_run(data: Any = None) -> None:
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            room = run_room(data["run_id"])
            # What the run logged before the client asked (a short run may be over already),
            # then what it logs from now on: held back meanwhile, nothing falls between or ahead.
            with live.held_back():
                join_room(room)
                for event in live.room_events(room):
                    socketio.emit("event", {k: v for k, v in event.items() if k != "room"}, to=request.sid)  # type: ignore[attr-defined]

    @socketio.on("unwatch_run")
    def unwatch_run(data: Any = None) -> None:
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            leave_room(run_room(data["run_id"]))
