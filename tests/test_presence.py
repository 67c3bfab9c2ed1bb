"""The presence tracker alone, with a recording publisher and a hand-driven clock."""

from bridge.presence import PresenceTracker
from hacer.messages import OFFLINE, ONLINE, bus_time
from hacer.nodewire import Beacon


class RecordingPublisher:
    def __init__(self):
        self.presences, self.value_updates = [], []

    def presence(self, presence):
        self.presences.append(presence)

    def values(self, node_id, values):
        self.value_updates.append((node_id, values))


def beacon(node_id=1, type="toggle", **fields):
    return Beacon(node_id, type, **fields)


def test_announces_on_change_only():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(), "10.0.0.5", 100.0)
    for t in range(101, 160):
        tracker.observe(beacon(), "10.0.0.5", float(t))
    assert [(p.state, p.ip) for p in pub.presences] == [(ONLINE, "10.0.0.5")]
    tracker.observe(beacon(), "10.0.0.6", 161.0)  # new address
    tracker.observe(beacon(type="light_rgb"), "10.0.0.6", 162.0)  # new type
    assert [(p.ip, p.type) for p in pub.presences[1:]] == [("10.0.0.6", "toggle"), ("10.0.0.6", "light_rgb")]
    assert tracker.get(1).last_seen == 162.0


def test_offline_after_three_intervals_then_back():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(), "10.0.0.5", 0.0)
    tracker.observe(beacon(), "10.0.0.5", 60.0)
    assert tracker.expire(179.0) == 180.0  # first deadline re-armed from the newer beacon
    assert tracker.expire(239.9) == 240.0
    assert len(pub.presences) == 1
    tracker.expire(240.0)
    assert pub.presences[-1].state == OFFLINE and pub.presences[-1].since == bus_time(240.0)
    tracker.observe(beacon(), "10.0.0.5", 300.0)
    assert pub.presences[-1].state == ONLINE and pub.presences[-1].since == bus_time(300.0)


def test_announced_interval_and_global_setting():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(interval=10.0), "10.0.0.5", 0.0)
    assert tracker.expire(29.0) == 30.0
    fixed = PresenceTracker(pub, 5.0, clock=lambda: 0)
    fixed.observe(beacon(interval=10.0), "10.0.0.5", 0.0)
    assert fixed.expire(1.0) == 5.0


def test_beacon_state_and_command_values_publish_on_change():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(state={"on": 1}), "10.0.0.5", 0.0)
    tracker.observe(beacon(state={"on": 1}), "10.0.0.5", 1.0)
    tracker.update_values(1, {"on": 0})
    tracker.update_values(2, {"on": 0})  # unknown node: nothing
    assert pub.value_updates == [(1, {"on": 1}), (1, {"on": 0})]


def test_restore_keeps_timers_and_announces_nothing_twice():
    first = RecordingPublisher()
    before = PresenceTracker(first, None, clock=lambda: 0)
    before.observe(beacon(1), "10.0.0.5", 0.0)
    before.observe(beacon(2), "10.0.0.6", 0.0)
    before.expire(200.0)  # both offline
    before.observe(beacon(2), "10.0.0.6", 250.0)  # node 2 back online
    retained = {p.id: p for p in first.presences}.values()

    pub = RecordingPublisher()
    after = PresenceTracker(pub, None, clock=lambda: 0)
    republished = after.reconcile(retained, {}, started_at=260.0, last_seen_hints={2: 300.0})
    assert republished == 0 and pub.presences == []
    assert not after.get(1).online and after.get(2).online
    # node 2 keeps its deadline from the checkpointed last beacon: 300 + 180
    assert after.expire(470.0) == 480.0
    after.expire(480.0)
    assert [(p.id, p.state) for p in pub.presences] == [(2, OFFLINE)]


def test_restore_gives_one_interval_of_grace_after_a_long_outage():
    first = RecordingPublisher()
    before = PresenceTracker(first, None, clock=lambda: 0)
    before.observe(beacon(1), "10.0.0.5", 0.0)
    pub = RecordingPublisher()
    after = PresenceTracker(pub, None, clock=lambda: 0)
    after.reconcile(first.presences, {}, started_at=1000.0)
    assert after.expire(1000.0) == 1060.0  # not offline at once: its beacons were missed
    after.observe(beacon(1), "10.0.0.5", 1030.0)
    assert after.expire(1060.0) == 1210.0 and pub.presences == []


def test_reconcile_republishes_what_the_broker_lost():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(1, state={"on": 1}), "10.0.0.5", 0.0)
    tracker.observe(beacon(2), "10.0.0.6", 0.0)
    pub.presences.clear()
    pub.value_updates.clear()
    kept = tracker.get(2).presence()
    assert tracker.reconcile([kept], {}, started_at=5.0) == 1
    assert [p.id for p in pub.presences] == [1] and pub.value_updates == [(1, {"on": 1})]
