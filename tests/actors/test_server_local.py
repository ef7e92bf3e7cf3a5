"""The deployment under Serve's local testing mode: no cluster, the replica in this process.

python -m pytest tests/actors/test_server_local.py -q
"""

from __future__ import annotations

import asyncio

import pytest
from ray import serve

from antiphon.actors.affinity import home_replica_of
from antiphon.actors.client import ServeModelClient
from antiphon.actors.server import build_model_deployment
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest, SessionLost
from antiphon.messages import SamplingParams


def test_local_testing_mode_serves_sessions_and_typed_errors(tiny_model_dir):
    spec = ModelSpec(name="tiny-local", path=str(tiny_model_dir))
    handle = serve.run(
        build_model_deployment(spec), name="local", route_prefix=None, _local_testing_mode=True
    )
    model = ServeModelClient(handle)

    async def go():
        s = await model.open([5, 6, 7])
        g = await model.generate(s.session_id, SamplingParams(max_new_tokens=3, ignore_eos=True))
        with pytest.raises(InvalidRequest, match="vocabulary"):
            await model.append(s.session_id, [10**6])
        with pytest.raises(SessionLost):
            await model.generate("no-such-session", SamplingParams())
        return s, g

    s, g = asyncio.run(go())
    # One in-process replica and no router: session ids carry no replica name.
    assert home_replica_of(s.session_id) is None
    assert g.length == 6 and len(g.token_ids) == 3
