"""docs/topics.md documents exactly the topics of hacer/topics.py and the payloads of hacer/messages.py."""

import re
from dataclasses import fields

from hacer.schemas import json_schemas
from hacer.settings import PROJECT_DIR, Settings
from hacer.topics import TOPIC_SPECS
from ops.schemadoc import SETTINGS_DOC, with_schemas, with_settings_table

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

    text = "".join((PROJECT_DIR / path).read_text() for path in ("README.md", "docs/automations.md"))
    examples = re.findall(r"manage\.py automation add '(.+?)'", text, flags=re.S)
    assert len(examples) >= 6
    scripts = ScriptDir(PROJECT_DIR / "scripts")
    for example in examples:
        spec = AutomationSpec.from_json(example, location_of(40.4, -3.7))
        for script, path in spec.scripts():
            assert scripts.find(script) is not None, (script, path)
    assert any(AutomationSpec.from_json(example, location_of(40.4, -3.7)).steps for example in examples)


def test_the_asyncapi_document_is_current_and_valid():
    import json

    import jsonschema

    from ops.asyncapi import parameter
    from ops.schemadoc import ASYNCAPI, asyncapi_json

    assert ASYNCAPI.read_text() == asyncapi_json(), "docs/asyncapi.json is stale: run `manage.py schemas --write`"
    document = json.loads(ASYNCAPI.read_text())
    schema = json.loads((PROJECT_DIR / "tests" / "data" / "asyncapi-3.0.0.json").read_text())
    jsonschema.Draft7Validator(schema).validate(document)
    # Against the other account of the bus, docs/topics.md: the same topics, flags and publishers.
    rows = documented_rows()
    names = dict(re.findall(r"\| `hacer/([^`]*?)<([a-z_]+)>[^`]*` \|", DOC))
    for spec in TOPIC_SPECS:
        retained, qos, publisher, _ = rows[spec.pattern]
        operation = document["operations"][f"publish_{spec.name}"]
        assert operation["bindings"]["mqtt"] == {"qos": qos, "retain": retained, "bindingVersion": "0.2.0"}
        assert operation["summary"] == f"published by: {publisher}"
        named = parameter(spec)
        if named is not None:
            assert names[spec.pattern.split("{arg}")[0]] == named[0], spec.pattern


def test_every_line_of_the_readmes_trust_section_names_tests_that_exist():
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme.split("## Trust: a hostile home network", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| who", "| ---"))]
    assert len(rows) >= 10
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert named, f"a Trust line names no test: {row[:80]}"
        for path, test in named:
            source = (PROJECT_DIR / path).read_text()
            assert re.search(rf"^def {test}\(", source, re.MULTILINE), f"{path}::{test} does not exist"


def test_the_settings_table_is_the_declared_one():
    doc = SETTINGS_DOC.read_text()
    assert with_settings_table(doc) == doc, "stale: run `manage.py schemas --write`"
    assert doc.count("| `HACER_") == len(fields(Settings))


# Handed by hacer to its own children and scripts, not set by people (docs/architecture.md).
INTERNAL_VARIABLES = {"HACER_SETTINGS", "HACER_RUN_ID", "HACER_PARENT_PID", "HACER_LAUNCH", "HACER_BUS"}


def test_every_variable_the_code_names_is_declared():
    declared = {
        name for field in fields(Settings) for name in (field.metadata["setting"].env, *field.metadata["setting"].also)
    }
    named = set()
    for folder in ("hacer", "ops", "api", "bridge", "runner", "recorder", "scheduler", "emulator"):
        for path in (PROJECT_DIR / folder).glob("*.py"):
            named.update(re.findall(r"""["'](HACER_[A-Z_]+|HADB_PATH)["']""", path.read_text()))
    assert "HACER_MQTT_URL" in named
    assert named - INTERNAL_VARIABLES == declared


def test_every_relative_link_of_the_readme_and_docs_names_a_file_that_exists():
    broken = []
    for document in [PROJECT_DIR / "README.md", *(PROJECT_DIR / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target and not (document.parent / target).exists():
                broken.append(f"{document.relative_to(PROJECT_DIR)}: {target}")
    assert broken == []
