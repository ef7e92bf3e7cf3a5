"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis) and the config parser
(hypothesis): whatever arrives, a client mistake is a 4xx, never a 5xx, every answer comes
within 5 s, and the server answers a plain request afterwards."""

from __future__ import annotations

import contextlib
import copy
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from antiphon.deploy.config import parse_config
from antiphon.errors import AntiphonError

pytestmark = pytest.mark.slow

MAX_ANSWER_S = 5.0


def operations(server) -> list:
    """The API's operations, from the schema the running server publishes."""
    r = httpx.get(f"{server.url}/openapi.json", headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    schema = schemathesis.openapi.from_dict(r.json())
    return [result.ok() for result in schema.get_all_operations()]


# Strategies, not schemathesis' pytest plugin: that one breaks on pytest 9.2 (`_nodeid`).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_5xx_or_waits(server, mode):
    """POSITIVE: bodies the schema allows; NEGATIVE: bodies it forbids (wrong types,
    missing fields, out-of-range numbers)."""
    called = set()
    for operation in operations(server):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no forbidden form

        @given(operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def answers_in_time(case) -> None:
            # Budgets within the tiny models' context: an answer is a few dozen tokens.
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 64)
            started = time.monotonic()
            response = case.call(base_url=server.url, headers=server.headers, timeout=30)
            took = time.monotonic() - started
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            assert took < MAX_ANSWER_S, (case.method, case.path, case.body, took)
            called.add(f"{case.method} {case.path}")

        answers_in_time()
    assert {"POST /v1/generate", "POST /v1/chat/completions", "POST /v1/feedback"} <= called


def test_the_server_answers_after_the_fuzz(server):
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a", "max_tokens": 2},
                   headers=server.headers, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok", "degraded": {}}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
VALID = {
    "models": [{"name": "a", "path": "zoo:base"}, {"name": "b", "path": "zoo:aligned"}],
    "ensembles": [
        {"name": "e", "models": ["a", "b"], "policy": {"name": "round_robin", "params": {}}}
    ],
    "serving": {"port": 8000},
}
# Where one value of a valid config is replaced: near-valid configs reach the deep checks.
PLACES = [
    ("models",), ("models", 0), ("models", 0, "name"), ("models", 0, "path"),
    ("ensembles", 0, "models"), ("ensembles", 0, "policy", "name"),
    ("ensembles", 0, "policy", "params"), ("ensembles", 0, "policy", "params", "segment_len"),
    ("serving",), ("serving", "port"), ("serving", "max_body_bytes"),
]  # fmt: skip


@st.composite
def configs(draw) -> object:
    if draw(st.booleans()):
        return draw(JSON)
    config = copy.deepcopy(VALID)
    *parents, last = draw(st.sampled_from(PLACES))
    node = config
    for key in parents:
        node = node[key]
    node[last] = draw(JSON)
    return config


@given(configs())
@settings(max_examples=300, deadline=None)
def test_any_config_is_parsed_or_refused_with_antiphons_own_error(raw):
    with contextlib.suppress(AntiphonError):  # anything else (a TypeError, ...) fails
        parse_config(raw)
