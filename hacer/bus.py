"""The MQTT client every hacer process uses; the only module that imports paho.

A `Bus` connects with MQTT 5, sets its last will before connecting, reconnects with backoff,
renews every registered subscription on each connect and only then publishes its retained
birth message, keeps its publishes in order across reconnects, bounds its unconfirmed QoS 1
publishes, and dispatches messages to handlers that must not block; a handler's exception is
logged and counted, never raised into paho.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

# paho imports dnspython when it is installed (eventlet brings it), for connect_srv(), which hacer
# never calls: 4.5 MB in every process. Hidden from paho's import unless something has it already.
_DNS_HIDDEN = "dns" not in sys.modules
if _DNS_HIDDEN:
    sys.modules["dns"] = None  # type: ignore[assignment]
import paho.mqtt.client as paho  # noqa: E402

if _DNS_HIDDEN:
    del sys.modules["dns"]
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from hacer.topics import Topics, is_wildcard  # noqa: E402

log = logging.getLogger(__name__)


class BusError(RuntimeError):
    """The bus could not do what was asked (not connected in time, refused publish)."""


class MessageTooLarge(BusError):
    """A publish larger than the broker accepts: dropped and counted, since a retry cannot help."""


# MQTT's own limit, until the broker's CONNACK announces a smaller one.
MQTT_MAX_PACKET = 268_435_455
MAX_PACKETS_PER_READ = 1000  # then paho writes and keeps alive before reading on
PUBLISH_OVERHEAD = 64  # fixed header, lengths, packet id and properties other than correlation


@dataclass(frozen=True)
class Message:
    """A received message, free of paho types."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    correlation: bytes | None = None
    response_topic: str | None = None
    mid: int = 0


Handler = Callable[[Message], None]
T = TypeVar("T")
H = TypeVar("H")


def payload_decoder(from_payload: Callable[[bytes], T]) -> Callable[[Message], T]:
    """A decoder for subscribe_decoded() that reads the payload alone (`payload_decoder(RunStatus.from_payload)`)."""
    return lambda message: from_payload(message.payload)


def named_decoder(
    topics: Topics, from_payload: Callable[[bytes], T], id_of: Callable[[T], str], what: str
) -> Callable[[Message], T]:
    """A decoder for subscribe_decoded() that also refuses a payload whose id is not the one its topic names."""

    def decode(message: Message) -> T:
        decoded = from_payload(message.payload)
        if topics.parse(message.topic)[1] != id_of(decoded):
            raise ValueError(f"the topic names another {what}")
        return decoded

    return decode


def decoding(
    topic_filter: str, decode: Callable[[Message], T], handler: Callable[[T], None], refused: dict[str, int]
) -> Handler:
    """A handler that hands `handler` what `decode` makes of a message; one it refuses is logged and counted, once.

    `decode` checks the payload (and that the topic agrees with it), raising ValueError (MessageError,
    TopicError) for one it will not have: the handler only ever sees a decoded message. Refusals
    are counted in `refused` by `topic_filter` (a subscription's, so the count stays bounded).
    """

    def handle(message: Message) -> None:
        try:
            decoded = decode(message)
        except ValueError as exc:
            refused[topic_filter] = refused.get(topic_filter, 0) + 1  # one thread delivers: paho's network thread
            log.warning("refused %.200s: %s (%r)", message.topic, exc, message.payload[:100])
            return
        handler(decoded)

    return handle


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to reach the broker, parsed from a URL."""

    host: str
    port: int
    transport: str = "tcp"
    tls: bool = False
    username: str | None = None
    password: str | None = None
    path: str = "/mqtt"
    ca_file: str | None = None  # the CA to trust instead of the system's (a home broker's own)


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse mqtt://, mqtts://, ws:// or wss:// URLs (user:password@ allowed, `?ca=<file>` for TLS)."""
    parts = urlsplit(url)
    defaults = {
        "mqtt": (1883, "tcp", False),
        "mqtts": (8883, "tcp", True),
        "ws": (80, "websockets", False),
        "wss": (443, "websockets", True),
    }
    if parts.scheme not in defaults or not parts.hostname:
        raise BusError(f"broker URL {url!r} is not mqtt://host[:port] (or mqtts, ws, wss)")
    port, transport, tls = defaults[parts.scheme]
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or port,
        transport=transport,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=parts.path or "/mqtt",
        ca_file=parse_qs(parts.query).get("ca", [None])[0],
    )


def private_client_id(client_id: str, password: str | None) -> str:
    """Return `client_id` with a suffix only the password's holders can compute, when there is one.

    The broker lets any user connect with any client id and so take over that client's session;
    a part's id ("hacer-runner-<id>") is easy to guess, its keyed suffix is not. It is stable,
    so a durable session survives restarts (a changed password starts a new session).
    """
    if not password:
        return client_id
    suffix = hmac.new(password.encode(), client_id.encode(), hashlib.sha256).hexdigest()[:12]
    return f"{client_id}-{suffix}"


# Linux only: acknowledge every read at once, instead of up to 40 ms later.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _Client(paho.Client):
    """paho's client: publishes kept in order across reconnects, reads acknowledged at once, sends by the caller.

    A broker with Nagle on (mosquitto's default; the project's config sets `set_tcp_nodelay`)
    holds a small packet back until the one before it is acknowledged, and the client's kernel
    delays that acknowledgement up to 40 ms when it has nothing to send: a PUBACK followed by a
    PUBLISH took 44 ms to arrive (measured, bench_runner.py). Linux leaves quick-ack mode by
    itself, so it is asked again after every read (one setsockopt).
    """

    quickack = False
    connect_properties: Properties | None = None  # CONNECT's, as connect_async takes them
    direct_writes = False  # a plain TCP socket: other threads may write to it (see _packet_queue)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._write_lock = threading.RLock()
        self._awaiting_connack = True
        self.on_drained: Callable[[], None] = lambda: None

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        # Every packet already received, not paho's one per select(), then on_drained: what a
        # burst changed (a new node's presence and readings) is seen whole, and sent on once.
        rc = paho.MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(MAX_PACKETS_PER_READ):
            if self._sock is None:
                rc = paho.MQTTErrorCode.MQTT_ERR_NO_CONN
                break
            rc = self._packet_read()
            if rc > 0:
                rc = self._loop_rc_handle(rc)
                break
            if rc == paho.MQTTErrorCode.MQTT_ERR_AGAIN:
                rc = paho.MQTTErrorCode.MQTT_ERR_SUCCESS
                break
        self.on_drained()
        return rc

    # --- order across reconnects --------------------------------------------------------------

    def reconnect(self) -> paho.MQTTErrorCode:
        with self._write_lock:  # the network thread sends, closes and reconnects under the lock direct writes take
            self._awaiting_connack = True
            return super().reconnect()

    def _send_connect(self, keepalive: int) -> paho.MQTTErrorCode:
        # reconnect() empties the queue before it connects, but another thread may queue a packet
        # meanwhile (an ack): one meant for the old connection, which the broker would take for a
        # protocol error before CONNECT and close the new one. Held publishes stay in paho's store.
        for packet in self._out_packet:
            if packet["info"] is not None and packet["command"] & 0xF0 == paho.PUBLISH and packet["qos"] == 0:
                packet["info"].rc = paho.MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["info"]._set_as_published()
        self._out_packet.clear()
        return super()._send_connect(keepalive)

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: paho.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> paho.MQTTErrorCode:
        """Hold a publish made between a reconnect and its CONNACK, as one made while disconnected.

        paho sends such a publish at once, and only at CONNACK those it had not seen acknowledged:
        the newer overtook the older (a run's log entry 4 reached a subscriber before 3). Held, a
        QoS 1 publish is sent by CONNACK's re-sends, in order; a QoS 0 one is dropped, as paho
        drops those made while disconnected.
        """
        if self._awaiting_connack:
            return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
        return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)

    def _handle_connack(self) -> paho.MQTTErrorCode:
        # publish() takes this lock to add a message: none can come between the end of the hold
        # and the re-sends, which paho makes after on_connect under the same lock.
        with self._out_message_mutex:
            self._awaiting_connack = False
            return super()._handle_connack()

    # --- sending from the calling thread ------------------------------------------------------

    def _packet_queue(
        self, command: int, packet: bytes, mid: int, qos: int, info: paho.MQTTMessageInfo | None = None
    ) -> paho.MQTTErrorCode:
        """Queue a packet; one from another thread is sent by that thread when no other is sending.

        paho leaves every packet of another thread to its network thread, woken through a socket
        pair: on two busy cores that thread then waited for the GIL while the caller went on (a
        run's launch entry behind the claim's sync). Only plain TCP: an SSL object must not be
        read and written by two threads at once, nor a websocket frame.
        """
        if not self.direct_writes or threading.current_thread() is self._thread or command & 0xF0 == paho.DISCONNECT:
            return super()._packet_queue(command, packet, mid, qos, info)
        # As paho 2.1's _packet_queue (requirements.txt pins it), without the wake-up.
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        if command & 0xF0 != paho.PUBLISH:  # publish() sends its own once out of its lock (see there)
            self._send_queued()
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(
        self,
        topic: str,
        payload: paho.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        """paho's publish, then the send, outside paho's message lock.

        Sending a QoS 0 packet calls on_publish under paho's callback lock; a handler on the
        network thread holds that lock while it publishes, waiting for the message lock.
        """
        info = super().publish(topic, payload, qos, retain, properties)
        if self.direct_writes and threading.current_thread() is not self._thread:
            self._send_queued()
        return info

    def _send_queued(self) -> None:
        if self._write_lock.acquire(blocking=False):
            try:
                self._packet_write()  # what cannot be sent now (a full socket, a lost connection) stays queued
            finally:
                self._write_lock.release()
        if self._out_packet and self._sockpairW is not None:  # left for the network thread
            try:
                self._sockpairW.send(b"0")
            except BlockingIOError:
                pass

    def _packet_write(self) -> paho.MQTTErrorCode:
        with self._write_lock:
            return super()._packet_write()

    def _sock_close(self) -> None:
        with self._write_lock:
            super()._sock_close()

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        if self.quickack and TCP_QUICKACK is not None and isinstance(self._sock, socket.socket):
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            except OSError:
                pass
        return data


@dataclass
class _Subscription:
    topic_filter: str
    match_filter: str
    qos: int
    handler: Handler
    no_local: bool
    send_retained: bool
    manual_ack: bool = False

    def options(self) -> SubscribeOptions:
        return SubscribeOptions(
            qos=self.qos,
            noLocal=self.no_local,
            retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            if self.send_retained
            else SubscribeOptions.RETAIN_DO_NOT_SEND,
        )


class _Subscriptions:
    """The registered subscriptions (renewed on each connect), and the dispatch of a message to each match."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: list[_Subscription] = []

    def add(self, sub: _Subscription) -> None:
        with self._lock:
            self._all.append(sub)

    def remove(self, topic_filter: str) -> None:
        with self._lock:
            self._all = [s for s in self._all if s.topic_filter != topic_filter]

    def all(self) -> list[_Subscription]:
        with self._lock:
            return list(self._all)

    def dispatch(self, message: Message) -> tuple[bool, int]:
        """Hand a message to every matching handler: (whether one acknowledges it itself, handlers that failed)."""
        acked_by_handler, failed = False, 0
        for sub in self.all():
            if not paho.topic_matches_sub(sub.match_filter, message.topic):
                continue
            acked_by_handler |= sub.manual_ack
            try:
                sub.handler(message)
            except Exception:
                failed += 1
                log.exception("handler for %s failed on payload %r", message.topic, message.payload[:200])
        return acked_by_handler, failed


class _Hooks(Generic[H]):
    """Callbacks for an event; one that raises is logged and counted, and the others still run."""

    def __init__(self, event: str) -> None:
        self.event = event
        self._hooks: list[Callable[[H], None]] = []

    def add(self, hook: Callable[[H], None]) -> None:
        self._hooks.append(hook)

    def remove(self, hook: Callable[[H], None]) -> None:
        self._hooks.remove(hook)

    def call(self, argument: H) -> int:
        """Call each hook with `argument`; return how many failed."""
        failed = 0
        for hook in list(self._hooks):  # a requester may remove its hook meanwhile
            try:
                hook(argument)
            except Exception:
                failed += 1
                log.exception("%s hook %r failed", self.event, hook)
        return failed


class _SyncMarkers:
    """Markers a client publishes to itself: one back says every message queued before it was handled."""

    def __init__(self) -> None:
        self._waiting: dict[str, threading.Event] = {}

    def wait(self, send: Callable[[str], object], received: Callable[[], int], timeout: float) -> None:
        """`send` a new marker and wait for it; BusError when `timeout` seconds pass with nothing `received`."""
        token, arrived = uuid.uuid4().hex, threading.Event()
        self._waiting[token] = arrived
        try:
            send(token)
            seen = -1
            while not arrived.wait(timeout):
                if received() == seen:
                    raise BusError(f"sync marker not back and nothing received for {timeout} s")
                seen = received()
        finally:
            self._waiting.pop(token, None)

    def arrived(self, message: Message) -> None:
        waiter = self._waiting.get(message.payload.decode(errors="replace"))
        if waiter is not None:
            waiter.set()


class _InFlight:
    """The QoS 1 publishes waiting for the broker's acknowledgement, at most `limit` of them.

    Never hold the lock while calling paho: paho holds its own while calling on_publish, which
    may even run before publish() returns the mid; `_early_acks` catches those.
    """

    def __init__(self, limit: int) -> None:
        self._free = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._pending_qos0: set[int] = set()
        self._early_acks: set[int] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def publish(
        self,
        client: paho.Client,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        block: bool,
        timeout: float,
    ) -> paho.MQTTMessageInfo | None:
        """Publish through `client` once a place is free: None if none freed at once (without block)."""
        if qos > 0 and not self._free.acquire(blocking=block, timeout=timeout if block else None):
            if block:
                raise BusError(f"broker confirmed nothing for {timeout} s")
            return None
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self._free.release()
            raise BusError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
                if qos > 0:
                    self._free.release()
            elif qos > 0:
                self._pending.add(info.mid)
            elif info.rc == paho.MQTT_ERR_SUCCESS:
                self._pending_qos0.add(info.mid)
        return info

    def acknowledged(self, mid: int) -> None:
        """The broker acknowledged `mid` (or paho sent a QoS 0 one)."""
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                self._free.release()
            elif mid in self._pending_qos0:
                self._pending_qos0.discard(mid)
            else:
                self._early_acks.add(mid)

    def disconnected(self) -> None:
        """Unsent QoS 0 messages are dropped without a callback: forget them."""
        with self._lock:
            self._pending_qos0.clear()


class Bus:
    """One MQTT connection with its subscriptions, birth and will; see the module docstring."""

    def __init__(
        self,
        url: str,
        topics: Topics,
        client_id: str,
        *,
        presence_topic: str | None = None,
        birth: bytes = b"online",
        will: bytes = b"offline",
        clean_start: bool = True,
        session_expiry: int = 0,
        max_unconfirmed: int = 10_000,
        keepalive: int = 15,
        manual_ack: bool = False,
        send_from_caller: bool = False,
    ) -> None:
        self.address = parse_broker_url(url)
        self.topics = topics
        self.client_id = private_client_id(client_id, self.address.password)
        self.presence_topic = presence_topic
        self.birth = birth
        self.will = will
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.manual_ack = manual_ack
        # Publishes written to the socket by the calling thread (see _Client._packet_queue): for parts
        # of plain threads whose latency it serves (the runner); eventlet's api keeps paho's way.
        self.send_from_caller = send_from_caller
        self.handler_errors = 0
        self.refused: dict[str, int] = {}  # by subscription: messages their decoder refused (subscribe_decoded)
        self.messages_received = 0
        self.too_large = 0
        self.max_packet = MQTT_MAX_PACKET
        self._subscriptions = _Subscriptions()
        self._connect_hooks: _Hooks[bool] = _Hooks("connect")
        self._drained_hooks: _Hooks[None] = _Hooks("drained")
        self._in_flight = _InFlight(max_unconfirmed)
        self._connected = threading.Event()
        self._markers = _SyncMarkers()
        self._client: paho.Client | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; reconnects by itself until stop()."""
        client = _new_client(self.address, self.client_id, self.manual_ack, self.session_expiry)
        if self.presence_topic:
            client.will_set(self.presence_topic, self.will, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = functools.partial(_tune_socket, self.send_from_caller)
        client.on_drained = lambda: self._call(self._drained_hooks, None)
        self._client = client
        self.subscribe(self.topics.build("client_sync", self.client_id), self._markers.arrived, qos=1)
        client.connect_async(self.address.host, self.address.port, self.keepalive, clean_start=self.clean_start,
                             properties=client.connect_properties)  # fmt: skip
        client.loop_start()

    def stop(self, timeout: float = 5.0, end_session: bool = False) -> None:
        """Publish the will on the presence topic (a clean disconnect sends none) and close.

        With end_session the broker drops this client's durable session (and its place in shared
        subscriptions, whose messages would otherwise queue for it until the session expires).
        """
        client, self._client = self._client, None  # from here a disconnect is not a loss
        if client is None:
            return
        if self.presence_topic and self.connected:
            info = client.publish(self.presence_topic, self.will, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        client.disconnect(properties=properties)
        client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """Tell whether the connection is up and subscriptions renewed."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise BusError after `timeout` seconds."""
        if not self._connected.wait(timeout):
            raise BusError(f"no broker at {self.address.host}:{self.address.port} after {timeout} s")

    def on_connect(self, hook: Callable[[bool], None]) -> None:
        """Call `hook(session_present)` after every connect, once subscriptions are renewed."""
        self._connect_hooks.add(hook)

    def remove_connect_hook(self, hook: Callable[[bool], None]) -> None:
        """Stop calling a hook given to on_connect."""
        self._connect_hooks.remove(hook)

    def on_drained(self, hook: Callable[[], None]) -> None:
        """Call `hook()` after each burst of messages, once every message already received is handled."""
        self._drained_hooks.add(lambda _: hook())

    def _call(self, hooks: _Hooks[H], argument: H) -> None:
        self.handler_errors += hooks.call(argument)

    # --- subscribe / publish ---------------------------------------------------------------

    def private_group(self, group: str) -> str:
        """A shared subscription group only this role's password holders can name (see private_client_id).

        Mosquitto 2.0's ACL file lets any user subscribe to anything and filters at delivery, so a
        user who joined the runners' group by its plain name would be dealt requests it may not
        read, which the broker then drops; a keyed name keeps the group to the role.
        """
        return private_client_id(group, self.address.password)

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        no_local: bool = False,
        send_retained: bool = True,
        manual_ack: bool = False,
    ) -> None:
        """Register `handler` for `topic_filter` (a `$share/...` filter too), renewed on reconnect.

        With manual_ack (on a Bus made with manual_ack=True) the handler must call ack(message)
        once the message is safe; the broker redelivers it otherwise.
        """
        if manual_ack and not self.manual_ack:
            raise BusError("manual_ack subscriptions need a Bus made with manual_ack=True")
        match_filter = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        sub = _Subscription(topic_filter, match_filter, qos, handler, no_local, send_retained, manual_ack)
        self._subscriptions.add(sub)
        if self.connected and self._client is not None:
            self._client.subscribe(topic_filter, options=sub.options())

    def subscribe_decoded(
        self, topic_filter: str, decode: Callable[[Message], T], handler: Callable[[T], None], **options: Any
    ) -> None:
        """Register `handler` for what `decode` makes of each message (see decoding()), renewed on reconnect."""
        self.subscribe(topic_filter, decoding(topic_filter, decode, handler, self.refused), **options)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop every registration of `topic_filter`."""
        self._subscriptions.remove(topic_filter)
        if self._client is not None:
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        expiry: int | None = None,
        block: bool = True,
        timeout: float = 30.0,
    ) -> bool:
        """Queue a publish; at most `max_unconfirmed` QoS 1 publishes wait for their ack.

        When that many wait, block up to `timeout` (raising BusError), or with block=False
        return False at once so the caller can repair state later instead.
        """
        info = self._publish(topic, payload, qos, retain, correlation, block, timeout, response_topic, expiry)
        return info is not None

    def publish_confirmed(
        self, messages: list[tuple[str, bytes]], *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish (topic, payload) pairs at QoS 1; return once the broker has acknowledged all."""
        if not messages:
            return
        if not self.connected:  # not queued for the reconnect: a caller that retries would pile them up
            raise BusError("publish not confirmed: not connected")
        sent = [(topic, self._publish(topic, payload, 1, retain, None, True, timeout)) for topic, payload in messages]
        _wait_published(sent, timeout)

    def _publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int,
        retain: bool,
        correlation: bytes | None,
        block: bool,
        timeout: float,
        response_topic: str | None = None,
        expiry: int | None = None,
    ) -> paho.MQTTMessageInfo | None:
        if is_wildcard(topic):
            raise BusError(f"cannot publish to the wildcard topic {topic!r}")
        client = self._client
        if client is None:
            raise BusError("bus is not started")
        if isinstance(payload, str):
            payload = payload.encode()
        size = _size_over(self.max_packet, topic, payload, correlation, response_topic)
        if size:
            self.too_large += 1
            log.warning(
                "dropped a %d-byte publish to %s: the broker accepts at most %d bytes", size, topic, self.max_packet
            )
            raise MessageTooLarge(
                f"{size} bytes for {topic} is more than the broker's limit of {self.max_packet} bytes"
            )
        properties = _publish_properties(correlation, response_topic, expiry)
        return self._in_flight.publish(client, topic, payload, qos, retain, properties, block, timeout)

    def ack(self, message: Message) -> None:
        """Acknowledge a message received through a manual_ack subscription."""
        client = self._client
        if client is not None and message.qos > 0:
            client.ack(message.mid, message.qos)

    @property
    def unconfirmed(self) -> int:
        """How many QoS 1 publishes wait for the broker's acknowledgement."""
        return len(self._in_flight)

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every message the broker queued for us before this call has been handled.

        Retained messages sent on subscribe are queued before our own later publish, so the
        arrival of a marker published to ourselves tells that they have all been dispatched.
        Raises BusError when `timeout` seconds pass with no message arriving at all (a big
        retained table may take longer than that in total).
        """
        topic = self.topics.build("client_sync", self.client_id)
        self._markers.wait(lambda token: self.publish(topic, token, qos=1), lambda: self.messages_received, timeout)

    # --- paho callbacks (paho's thread: never block, never raise) --------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused %s: %s", self.address.host, self.address.port, self.client_id, reason)
            return
        self.max_packet = getattr(properties, "MaximumPacketSize", None) or MQTT_MAX_PACKET
        subscriptions = self._subscriptions.all()
        if subscriptions:
            client.subscribe([(s.topic_filter, s.options()) for s in subscriptions])
        if self.presence_topic:
            client.publish(self.presence_topic, self.birth, qos=1, retain=True)
        log.info(
            "%s connected to %s:%s (session present: %s)",
            self.client_id,
            self.address.host,
            self.address.port,
            flags.session_present,
        )
        self._connected.set()
        self._call(self._connect_hooks, flags.session_present)

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._connected.clear()
        self._in_flight.disconnected()
        if self._client is None:
            return
        _log_disconnect(self.client_id, reason)

    def _on_publish(
        self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._in_flight.acknowledged(mid)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.messages_received += 1
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=msg.payload,
            retain=bool(msg.retain),
            qos=msg.qos,
            correlation=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
            mid=msg.mid,
        )
        acked_by_handler, failed = self._subscriptions.dispatch(message)
        self.handler_errors += failed
        if self.manual_ack and not acked_by_handler and message.qos > 0:
            client.ack(msg.mid, msg.qos)


def _new_client(address: BrokerAddress, client_id: str, manual_ack: bool, session_expiry: int) -> _Client:
    """A paho client for `address`, not connected yet."""
    client = _Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
        transport="websockets" if address.transport == "websockets" else "tcp",
        reconnect_on_failure=True,
        manual_ack=manual_ack,
    )
    if address.transport == "websockets":
        client.ws_set_options(path=address.path)
    if address.tls:
        client.tls_set(ca_certs=address.ca_file, cert_reqs=ssl.CERT_REQUIRED)
    if address.username:
        client.username_pw_set(address.username, address.password)
    client.reconnect_delay_set(min_delay=0.1, max_delay=5)  # type: ignore[arg-type]
    client.max_inflight_messages_set(1000)
    client.connect_properties = Properties(PacketTypes.CONNECT)
    client.connect_properties.SessionExpiryInterval = session_expiry
    return client


def _log_disconnect(client_id: str, reason: ReasonCode) -> None:
    if reason == "Session taken over":
        log.error(
            "another client connected with the id %s: each process needs its own id "
            "(set HACER_RUNNER_ID for a second runner on one host)",
            client_id,
        )
    else:
        log.warning("%s lost the broker (%s); reconnecting", client_id, reason)


def _publish_properties(correlation: bytes | None, response_topic: str | None, expiry: int | None) -> Properties | None:
    """A publish's MQTT 5 properties; None when it has none."""
    if correlation is None and response_topic is None and expiry is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    if correlation is not None:
        properties.CorrelationData = correlation
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if expiry is not None:  # seconds the broker keeps it for an absent subscriber
        properties.MessageExpiryInterval = expiry
    return properties


def _tune_socket(send_from_caller: bool, client: paho.Client, userdata: object, sock: object) -> None:
    """paho's on_socket_open: Nagle off (it stalled the first messages of a stream by ~40 ms), quick acks."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(client, _Client):
            client.quickack = True
            client.direct_writes = send_from_caller and type(sock) is socket.socket


def _size_over(limit: int, topic: str, payload: bytes, correlation: bytes | None, response_topic: str | None) -> int:
    """A publish's size in bytes if it is over the broker's `limit`, else 0."""
    size = len(payload) + len(correlation or b"") + len(response_topic or "") * 4 + PUBLISH_OVERHEAD
    # 4 bytes a character bound the topic's UTF-8 length: encode it only when that may matter.
    if size + 4 * len(topic) > limit and (size := size + len(topic.encode())) > limit:
        return size
    return 0


def _wait_published(sent: list[tuple[str, paho.MQTTMessageInfo | None]], timeout: float) -> None:
    """Wait until the broker acknowledged every (topic, publish); BusError when one is not within `timeout`."""
    deadline = time.monotonic() + timeout
    for topic, info in sent:
        assert info is not None  # blocking publishes return one or raise
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:  # disconnected since: paho sends it on reconnect
            raise BusError(f"publish to {topic} not confirmed: {exc}") from None
        if not info.is_published():
            raise BusError(f"publish to {topic} not confirmed within {timeout} s")
