"""docs/topics.md documents exactly the topics of hacer/topics.py and the payloads of hacer/messages.py."""

import re

from hacer.messages import json_schemas
from hacer.schemadoc import with_schemas
from hacer.settings import PROJECT_DIR
from hacer.topics import TOPIC_SPECS

DOC = (PROJECT_DIR / "docs" / "topics.md").read_text()


def documented_rows():
    rows = {}
    for line in DOC.splitlines():
        match = re.match(
            r"\| `hacer/([^`]+)` \| (yes|no) \| ([012]) \| (.+?) \| (text|\[`(\w+)`\]\(#(\w+)\)) \|$", line
        )
        if match:
            pattern = re.sub(r"<[a-z_]+>", "{arg}", match[1])
            assert match[6] is None or match[7] == match[6].lower(), f"the link of {match[6]} goes elsewhere"
            rows[pattern] = (match[2] == "yes", int(match[3]), match[4], match[6] or "")
    return rows


def test_table_matches_the_topic_module():
    expected = {spec.pattern: (spec.retained, spec.qos, spec.publisher, spec.payload) for spec in TOPIC_SPECS}
    assert documented_rows() == expected


def test_every_payload_named_has_a_schema():
    schemas = json_schemas()
    assert {spec.payload for spec in TOPIC_SPECS if spec.payload} <= set(schemas)


def test_the_schemas_shown_are_the_declared_ones():
    assert with_schemas(DOC) == DOC, "docs/topics.md's schemas are stale: run `manage.py schemas --write`"


def test_every_topic_has_a_section_with_an_example_command():
    sections = re.split(r"^### ", DOC, flags=re.M)[1:]
    by_pattern = {re.sub(r"<[a-z_]+>", "{arg}", s.split("`")[1].removeprefix("hacer/")): s for s in sections}
    for spec in TOPIC_SPECS:
        assert spec.pattern in by_pattern, f"no section for {spec.pattern}"
        if spec.name != "client_sync":
            assert "mosquitto_" in by_pattern[spec.pattern], f"no example command for {spec.pattern}"


def test_the_readme_automation_examples_are_valid_definitions():
    from hacer.automations import AutomationSpec, location_of
    from hacer.scriptdir import ScriptDir

    readme = (PROJECT_DIR / "README.md").read_text()
    examples = re.findall(r"manage\.py automation add '(.+?)'", readme, flags=re.S)
    assert len(examples) >= 5
    scripts = ScriptDir(PROJECT_DIR / "scripts")
    for example in examples:
        spec = AutomationSpec.from_json(example, location_of(40.4, -3.7))
        assert scripts.find(spec.script) is not None, spec.script
