"""docs/nodes.md's example node, run as the page shows it (on 127.0.0.1), against a real bridge."""

import json
import re
import subprocess
import sys

from hacer.messages import CommandResult
from hacer.settings import PROJECT_DIR

from support import free_port, presence_of, target

MARK = "<!-- the example node: tests/component/test_node_example.py runs this block -->"


def example_node() -> str:
    page = (PROJECT_DIR / "docs" / "nodes.md").read_text()
    return re.search(r"```python\n(.*?)```", page.split(MARK, 1)[1], re.DOTALL).group(1)


def test_the_example_node_comes_online_and_answers_a_set_and_a_get(
    start_bridge, bridge_env, watch, topics, make_bus, tmp_path
):
    port = free_port()
    program = example_node()
    for line, local in (
        ('BEACON_TO = ("255.255.255.255", 7775)', f"BEACON_TO = {target(bridge_env)!r}"),
        ('LISTEN_ON = ("0.0.0.0", 7777)', f'LISTEN_ON = ("127.0.0.1", {port})'),
        ("INTERVAL = 60", "INTERVAL = 1"),
    ):
        assert line in program
        program = program.replace(line, local)
    (tmp_path / "mynode.py").write_text(program)
    start_bridge()
    presence = watch(topics.build("node_presence", 4242001))
    results = watch(topics.build("node_result", 4242001))
    node = subprocess.Popen([sys.executable, str(tmp_path / "mynode.py")])
    try:
        assert presence_of(presence.wait_for(lambda m: True, timeout=15)).state == "online"
        bus = make_bus()
        bus.publish(topics.build("node_set", 4242001), json.dumps({"on": 1}).encode(), correlation=b"set")
        bus.publish(topics.build("node_get", 4242001), b"on", correlation=b"get")
        replies = {}
        for _ in range(2):
            message = results.wait_for(lambda m: CommandResult.from_payload(m.payload).correlation not in replies)
            result = CommandResult.from_payload(message.payload)
            replies[result.correlation] = (result.ok, result.value, result.raw)
        assert replies == {"set": (True, 1, "+i1e"), "get": (True, 1, "+i1e")}
        assert node.poll() is None  # still serving
    finally:
        node.kill()
        node.wait(10)
