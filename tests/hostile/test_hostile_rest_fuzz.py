"""Requests generated from the api's own OpenAPI document (schemathesis) against a live api.

Pass: no response is a server error, and every error is JSON with a message, for requests that
fit the document and for requests that break it. /api/health is left out: its 503 is its
answer when parts are missing, as they are here.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 20  # per operation and mode; a longer run is `pytest tests/hostile -k fuzz` with more
# No shrinking: a failing request is reported as it was sent, at once. Shrinking one through a live
# server ran past the suite's timeout once (2026-12-08), which hid what had failed.
PHASES = (Phase.explicit, Phase.generate)


def calls_of(operation, mode, base_url, tried):
    """A Hypothesis test calling `operation` with cases of `mode` and checking each answer."""

    @settings(
        max_examples=EXAMPLES, phases=PHASES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(operation.as_strategy(generation_mode=mode))
    def call(case):
        response = case.call(base_url=base_url, timeout=30)
        tried[operation.label] = tried.get(operation.label, 0) + 1
        what = (
            case.method,
            case.formatted_path,
            case.query,
            case.headers,
            case.body,
            response.status_code,
            dict(response.headers),
            response.text[:200],
        )
        assert response.status_code < 500, what
        # 414: eventlet's server refuses a URL over 8 KiB before the app sees the request.
        if response.status_code >= 400 and response.status_code != 414:
            assert response.headers.get("content-type", [""])[0].startswith("application/json"), what
            body = response.json()
            assert isinstance(body.get("message"), str) and body["message"], what

    return call


def test_generated_requests_get_no_server_error_and_json_errors(live_api):
    schema = schemathesis.openapi.from_url(live_api.url + "/api/openapi.json")
    tried: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/api/health":
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            call = calls_of(operation, mode, live_api.url, tried)
            try:
                call()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                assert mode == GenerationMode.NEGATIVE, operation.label
    print(f"\n{sum(tried.values())} generated requests over {len(tried)} operations, 0 server errors")
    assert len(tried) >= 15
