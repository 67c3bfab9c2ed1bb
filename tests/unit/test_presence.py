"""The presence tracker and the poller alone, with a recording publisher and a hand-driven clock."""

import pytest

from bridge.poller import Poller
from bridge.presence import PresenceTracker
from hacer.messages import OFFLINE, ONLINE, bus_time
from hacer.nodewire import Beacon
from hacer.settings import PollPlan, SettingsError, parse_poll_plans


class RecordingPublisher:
    def __init__(self):
        self.presences, self.value_updates, self.readings_sent = [], [], []

    def presence(self, presence):
        self.presences.append(presence)

    def values(self, node_id, values):
        self.value_updates.append((node_id, values))

    def readings(self, readings):
        self.readings_sent.append(readings)


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
    tracker.update_values(1, {"on": 0}, 2.0)
    tracker.update_values(2, {"on": 0}, 2.0)  # unknown node: nothing
    assert pub.value_updates == [(1, {"on": 1}), (1, {"on": 0})]
    assert [{k: (r.value, r.at) for k, r in m.values.items()} for m in pub.readings_sent] == [
        {},  # readings exist from the node's first beacon
        {"on": (1, bus_time(0.0))},
        {"on": (0, bus_time(2.0))},
    ]


def test_each_value_keeps_the_time_it_was_first_read_as_it_is():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(type="thermostat"), "10.0.0.5", 0.0)
    tracker.update_values(1, {"temperature": 21, "target": 20}, 10.0)
    tracker.update_values(1, {"temperature": 21}, 40.0)  # read again, unchanged: nothing
    tracker.update_values(1, {"temperature": 22}, 70.0)
    last = pub.readings_sent[-1]
    assert len(pub.readings_sent) == 3  # the first beacon's, then two changes
    assert (last.values["temperature"].at, last.values["target"].at) == (bus_time(70.0), bus_time(10.0))


def test_a_deadband_keeps_noise_off_the_bus():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0, deadbands={"temperature": 1})
    tracker.observe(beacon(type="sensor_temp"), "10.0.0.5", 0.0)
    for now, temperature in enumerate([21, 22, 21, 22, 23, 22, 20], start=1):
        tracker.update_values(1, {"temperature": temperature, "name": "hall"}, float(now))
    assert [values["temperature"] for _, values in pub.value_updates] == [21, 23, 20]


def test_a_node_that_stops_answering_says_so_until_it_answers():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    tracker.observe(beacon(type="sensor_temp"), "10.0.0.5", 0.0)
    tracker.update_values(1, {"temperature": 21}, 1.0)
    tracker.answered(1, 2.0)  # answering already: nothing to say
    tracker.answered(1, 3.0, "no reply within 3 s")
    tracker.answered(1, 6.0, "no reply within 3 s")
    tracker.answered(1, 9.0)
    said = [(r.answering, r.since, r.error) for r in pub.readings_sent[2:]]
    assert said == [(False, bus_time(3.0), "no reply within 3 s"), (True, bus_time(9.0), None)]
    # The stale value kept its own time all along.
    assert pub.readings_sent[2].values["temperature"].at == bus_time(1.0)


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
    pub.readings_sent.clear()
    kept = tracker.get(2).presence()
    assert tracker.reconcile([kept], {}, started_at=5.0) == 1
    assert [p.id for p in pub.presences] == [1] and pub.value_updates == [(1, {"on": 1})]
    assert sorted(r.node_id for r in pub.readings_sent) == [1, 2]  # the broker kept no readings of either


def test_restore_keeps_the_times_of_values_that_did_not_change():
    first = RecordingPublisher()
    before = PresenceTracker(first, None, clock=lambda: 0)
    before.observe(beacon(1, type="thermostat"), "10.0.0.5", 0.0)
    before.update_values(1, {"temperature": 21, "target": 20}, 5.0)
    before.answered(1, 8.0, "no reply within 3 s")
    retained = first.readings_sent[-1]

    pub = RecordingPublisher()
    after = PresenceTracker(pub, None, clock=lambda: 0)
    # The broker kept a newer target than the readings say (published, readings lost).
    after.reconcile(first.presences, {1: {"temperature": 21, "target": 19}}, 20.0, None, {1: retained})
    restored = pub.readings_sent[-1]
    assert restored.values["temperature"].at == bus_time(5.0)
    assert restored.values["target"].value == 19 and restored.values["target"].at == bus_time(0.0)
    assert (restored.answering, restored.error) == (False, "no reply within 3 s")


# --- the poller: which nodes are read, when ---------------------------------------------------


def test_reads_are_spread_over_the_interval_then_come_on_it():
    polls = []
    fractions = iter([0.0, 0.5, 0.99])
    poller = Poller({"sensor_temp": PollPlan(("temperature",), 30.0)}, polls.extend, lambda: next(fractions))
    online = [(1, "sensor_temp"), (2, "sensor_temp"), (3, "sensor_temp"), (4, "toggle")]
    poller.run_due(online, 100.0)  # first sight: each gets its place in the interval
    assert polls == []
    for now in (100.0, 101.0, 115.0, 129.0, 130.0):
        poller.run_due(online, now)
    assert [node_id for node_id, _ in polls] == [1, 2, 1, 3]  # at 100, 115, then 130 (1's second, 3's first)
    assert polls[0] == (1, ("temperature",))


def test_a_set_of_a_read_key_is_read_back_and_an_offline_node_is_not_read():
    polls = []
    poller = Poller({"toggle": PollPlan(("on",), 60.0)}, polls.extend, lambda: 0.5)
    poller.run_due([(1, "toggle")], 0.0)
    poller.read_back(1, "name", 1.0)  # not a key it reads
    poller.run_due([(1, "toggle")], 2.5)
    assert polls == []
    poller.read_back(1, "on", 5.0)
    poller.run_due([(1, "toggle")], 6.0)
    assert polls == [(1, ("on",))]
    poller.run_due([], 7.0)  # offline: forgotten
    poller.read_back(1, "on", 7.0)
    poller.run_due([(1, "toggle")], 66.0)  # back: a new place in the interval
    assert polls == [(1, ("on",))]


def test_poll_plans_are_read_from_the_setting():
    plans = parse_poll_plans("thermostat:temperature,target@30; toggle:on@60")
    assert plans == {"thermostat": PollPlan(("temperature", "target"), 30.0), "toggle": PollPlan(("on",), 60.0)}
    assert parse_poll_plans("off") == {}
    for bad in ("thermostat", "toggle:on", "toggle:@5", "toggle:on@0.5", ":on@5", "toggle:on@x"):
        with pytest.raises(SettingsError, match="HACER_POLL"):
            parse_poll_plans(bad)


def test_a_flood_of_beacons_changes_a_nodes_values_at_most_once_per_ten_seconds():
    pub = RecordingPublisher()
    tracker = PresenceTracker(pub, None, clock=lambda: 0)
    for index in range(2000):  # 200 a second for 10 s, every one with new values
        tracker.observe(beacon(state={f"k{n}": index for n in range(32)}), "10.0.0.5", index / 200)
    assert len(pub.value_updates) == 1 and len(pub.presences) == 1  # the first; the next would be at 10 s
    assert tracker.held_back() == {"values_too_often": 1999}
    tracker.observe(beacon(state={"k0": -1}), "10.0.0.5", 10.0)
    tracker.update_values(1, {"k1": -1}, 10.1)  # a command's reply is not a beacon: taken at once
    assert [update[1]["k0"] for update in pub.value_updates] == [0, -1, -1]
