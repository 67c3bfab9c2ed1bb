"""The topic tree: building, parsing, prefixes and wildcard refusal."""

import pytest

from hacer.topics import TOPIC_SPECS, TopicError, Topics, is_wildcard


def test_every_topic_builds_and_parses_back():
    topics = Topics("home/hacer")
    for spec in TOPIC_SPECS:
        arg = "42" if "{arg}" in spec.pattern else None
        topic = topics.build(spec.name, arg)
        assert topic.startswith("home/hacer/")
        assert topics.parse(topic) == (spec.name, arg)


def test_contract_examples():
    topics = Topics()
    assert topics.build("node_presence", 1234567) == "hacer/nodes/1234567/presence"
    assert topics.build("bridge_state") == "hacer/bridge/state"
    assert topics.filter("node_set") == "hacer/nodes/+/set"
    assert topics.shared("runners", topics.build("run_request")) == "$share/runners/hacer/runs/request"
    assert topics.node_id("hacer/nodes/77/get") == 77


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x\0"])
def test_levels_cannot_inject_topics(bad):
    with pytest.raises(TopicError):
        Topics().build("node_set", bad)


@pytest.mark.parametrize(
    "topic", ["other/nodes/1/set", "hacer/nodes/1/unknown", "hacer/nodes//set", "hacer/nodes/1/set/extra", "hacer"]
)
def test_foreign_topics_do_not_parse(topic):
    with pytest.raises(TopicError):
        Topics().parse(topic)


def test_node_id_needs_digits():
    with pytest.raises(TopicError):
        Topics().node_id("hacer/nodes/abc/set")
    with pytest.raises(TopicError):
        Topics().node_id("hacer/runs/5/log")
    with pytest.raises(TopicError):  # full-width digits: str.isdigit() says yes, int() reads 1000
        Topics().node_id("hacer/nodes/\uff11\uff10\uff10\uff10/set")


def test_wildcards_detected():
    assert is_wildcard("hacer/+/x") and is_wildcard("hacer/#") and not is_wildcard("hacer/a")
