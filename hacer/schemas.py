"""The JSON schemas of every payload, derived from their declarations (bus messages, automations).

A module of its own because it needs both: hacer/automations.py builds on hacer/messages.py, so
neither may import the other back.
"""

from __future__ import annotations

from typing import Any

import msgspec

from hacer.automations import DECLARATIONS as AUTOMATIONS
from hacer.messages import DECLARATIONS as MESSAGES


def json_schemas(ref_template: str = "#/$defs/{name}") -> dict[str, dict[str, Any]]:
    """Every payload's JSON schema by name, with the structs they refer to; refs use `ref_template`."""
    declarations = {**MESSAGES, **AUTOMATIONS}
    names = list(declarations)
    schemas, components = msgspec.json.schema_components(declarations.values(), ref_template=ref_template)
    for name, schema in zip(names, schemas, strict=True):
        if "$ref" not in schema:  # declared as a type rather than a struct: named here
            components[name] = {"title": name, **schema}
    return dict(sorted(components.items()))
