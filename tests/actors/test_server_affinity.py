"""Session affinity on a real local Ray cluster: two replicas of a tiny checkpoint.

A replica only knows its own sessions (any other raises SessionLost), so many sessions'
calls all succeeding proves each call reached its session's replica. Then one replica is
killed: its sessions' next calls raise SessionLost, the others carry on. Session calls go
over a direct channel to their replica after the first; where no channel can be made they go
through Serve, with the same answers.

    python -m pytest tests/actors/test_server_affinity.py -q
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray
from ray import serve

from antiphon.actors.affinity import home_replica_of
from antiphon.actors.client import ServeModelClient
from antiphon.actors.direct import DirectChannel
from antiphon.actors.server import build_model_deployment
from antiphon.config import ModelSpec
from antiphon.errors import SessionLost
from antiphon.messages import SamplingParams

pytestmark = pytest.mark.slow

APP = "test-affinity"
N_SESSIONS = 12
STEP = SamplingParams(max_new_tokens=2, ignore_eos=True)
NEVER_HANG_S = 60.0  # a guard, not a timing assertion: the call must answer, not wait forever


@pytest.fixture(scope="module")
def model(ray_cluster, tiny_model_dir):
    spec = ModelSpec(name="tiny2", path=str(tiny_model_dir), deployment={"num_replicas": 2})
    handle = serve.run(build_model_deployment(spec), name=APP, route_prefix=None)
    yield ServeModelClient(handle)
    serve.delete(APP)


def kill_replica(unique_id: str) -> None:
    """ray.kill the Serve replica actor whose id ends with this replica id, and wait until its
    process is gone (ray.kill returns at once; until then a direct channel still answers)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    [actor] = [a for a in named if a["name"].endswith(f"#{unique_id}")]
    replica = ray.get_actor(actor["name"], namespace=actor["namespace"])
    pid = ray.get(replica.__ray_call__.remote(lambda _: os.getpid()))
    ray.kill(replica, no_restart=True)
    deadline = time.monotonic() + NEVER_HANG_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"replica {unique_id} (pid {pid}) still alive {NEVER_HANG_S}s after kill")


async def open_sessions(model: ServeModelClient) -> list[str]:
    """N_SESSIONS sessions opened at once, then more until both replicas hold some.

    Opens are spread by Serve's queue-length estimates, which may send a burst of them all to
    one replica (the other's estimate is stale); the test needs sessions on both.
    """
    infos = await asyncio.gather(*[model.open([5, 6, 7, 10 + i]) for i in range(N_SESSIONS)])
    sessions = [i.session_id for i in infos]
    for _ in range(50):
        if len({home_replica_of(s) for s in sessions}) == 2:
            break
        sessions.append((await model.open([5, 6, 7, 8])).session_id)
        await asyncio.sleep(0.1)
    return sessions


async def one_round(model: ServeModelClient, session_id: str) -> int:
    await model.append(session_id, [20, 21])
    g = await model.generate(session_id, STEP)
    await model.score(session_id, [30, 31])
    [child] = await model.fork(session_id, 1)
    assert home_replica_of(child) == home_replica_of(session_id)
    await model.truncate(child, 3)
    await model.close(child)
    return g.length


def test_every_call_reaches_its_sessions_replica(model):
    async def go():
        sessions = await open_sessions(model)
        lengths = []
        for _ in range(3):  # concurrent rounds over all sessions at once
            lengths.append(await asyncio.gather(*[one_round(model, s) for s in sessions]))
        return sessions, lengths

    sessions, lengths = asyncio.run(go())
    homes = {home_replica_of(s) for s in sessions}
    assert len(homes) == 2 and None not in homes  # sessions spread over both replicas
    assert lengths == [[4 + 4] * len(sessions), [4 + 8] * len(sessions), [4 + 12] * len(sessions)]


def test_lost_replica_fails_its_sessions_fast(model):
    async def go():
        sessions = await open_sessions(model)
        for s in sessions:  # a call first, so each home replica has its direct channel
            await model.generate(s, STEP)
        by_home: dict[str, list[str]] = {}
        for s in sessions:
            by_home.setdefault(home_replica_of(s), []).append(s)
        assert len(by_home) == 2
        victim, survivor = sorted(by_home)
        kill_replica(victim)
        outcomes = []
        for s in by_home[victim]:
            try:
                await asyncio.wait_for(model.generate(s, STEP), NEVER_HANG_S)
                outcomes.append("served")
            except SessionLost:
                outcomes.append("lost")
        survivors = [
            await asyncio.wait_for(model.generate(s, STEP), NEVER_HANG_S) for s in by_home[survivor]
        ]
        fresh = await asyncio.wait_for(model.open([5, 6, 7]), NEVER_HANG_S)
        return victim, survivor, outcomes, survivors, fresh

    victim, survivor, outcomes, survivors, fresh = asyncio.run(go())
    assert outcomes and all(o == "lost" for o in outcomes)
    assert all(g.length == 4 + 2 + 2 for g in survivors)
    assert home_replica_of(fresh.session_id) != victim


GREEDY = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs_top_k=2)


async def greedy_rounds(model: ServeModelClient, sessions: list[str]) -> list:
    """Per session: a generate, a score and a teacher_force after an append."""
    out = []
    for s in sessions:
        await model.append(s, [20, 21])
        g = await model.generate(s, GREEDY)
        out.append((g.token_ids, g.logprobs, g.top_logprobs, g.length,
                    await model.score(s, [30, 31], keep=True),
                    await model.teacher_force(s, [40, 41], top_k=2)))  # fmt: skip
    return out


def test_session_calls_go_over_a_channel_to_their_replica_and_answer_as_through_serve(model):
    via_serve = ServeModelClient(model.handle, direct=False)

    async def go():
        # opened one at a time on both clients: a batched prefill's floats may differ a little
        prompts = [[5, 6, 7, 10 + i] for i in range(N_SESSIONS)]
        sessions = [(await model.open(p)).session_id for p in prompts]
        while len({home_replica_of(s) for s in sessions}) < 2 and len(prompts) < 60:
            prompts.append([5, 6, 7, 10 + len(prompts)])
            sessions.append((await model.open(prompts[-1])).session_id)
        twins = [(await via_serve.open(p)).session_id for p in prompts]
        direct = await greedy_rounds(model, sessions)
        served = await greedy_rounds(via_serve, twins)
        homes = {home_replica_of(s) for s in sessions}
        channels = {r: c for r, c in model._channels.items() if r in homes}
        return direct, served, homes, channels

    direct, served, homes, channels = asyncio.run(go())
    assert direct == served
    assert set(channels) == homes and all(c is not None for c in channels.values())
    assert via_serve._channels == {}  # direct=False never asks for an address


def test_a_replica_that_cannot_be_reached_directly_is_called_through_serve(model, monkeypatch):
    async def unreachable(address, timeout_s=5.0):
        raise ConnectionRefusedError(f"{address.host}:{address.port} refused")

    monkeypatch.setattr(DirectChannel, "connect", unreachable)
    fallback = ServeModelClient(model.handle)

    async def go():
        sessions = await open_sessions(fallback)
        return sessions, await asyncio.gather(*[one_round(fallback, s) for s in sessions])

    sessions, lengths = asyncio.run(go())
    assert lengths == [4 + 4] * len(sessions)
    homes = {home_replica_of(s) for s in sessions}
    assert fallback._channels == dict.fromkeys(homes)  # asked once each, then through Serve


class RoundsFromAReplica:
    """Calls a model deployment from inside a replica, as the coordinator does: every call
    made while serving one request shares that request's internal request id."""

    def __init__(self, model_handle) -> None:
        self.model = ServeModelClient(model_handle)

    async def rounds(self) -> tuple[list[str], list[int]]:
        sessions = await open_sessions(self.model)
        lengths = await asyncio.gather(*[one_round(self.model, s) for s in sessions])
        return sessions, lengths


def test_concurrent_calls_made_while_serving_one_request_each_reach_their_replica(
    ray_cluster, tiny_model_dir
):
    spec = ModelSpec(name="tiny2-inner", path=str(tiny_model_dir), deployment={"num_replicas": 2})
    caller = serve.deployment(RoundsFromAReplica, ray_actor_options={"num_cpus": 0})
    handle = serve.run(caller.bind(build_model_deployment(spec)), name=f"{APP}-inner",
                       route_prefix=None)  # fmt: skip
    try:
        sessions, lengths = handle.rounds.remote().result(timeout_s=NEVER_HANG_S)
    finally:
        serve.delete(f"{APP}-inner")
    assert len({home_replica_of(s) for s in sessions}) == 2  # both replicas hold sessions
    assert lengths == [4 + 4] * len(sessions)  # every call found its session: none was lost
