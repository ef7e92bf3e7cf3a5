"""Switch generation on the zoo through Ray: base, sft and aligned as model deployments, a
zoo checkpoint as the switcher in its own deployment behind a policy actor, the coordinator
deployment over them; every decision and segment equals the in-process run's."""

from __future__ import annotations

import asyncio

import pytest
import ray
from ray import serve
from transformers import AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import resolve_checkpoint_path
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.deploy.app import build_coordinator_app
from antiphon.deploy.switcher import SWITCHER_APP, deploy_switch_policy, switch_policy_params

pytestmark = pytest.mark.slow

APP = "test-switch-zoo"
NAMES = ("base", "sft", "aligned")
PARAMS = {"segment_len": 4, "last_model": "aligned"}
PROMPTS = ("Q: What is the capital of Gluku?\nA:", "Q: Write a short story about a fox.\nA:")


def request(prompt: str, params: dict) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, models=NAMES, policy="switch", policy_params=params,
                             max_tokens=24)  # fmt: skip


def in_process(params: dict) -> list:
    engines = {n: ModelEngine(ModelSpec(name=n, path=f"zoo:{n}")) for n in NAMES}
    toks = {n: AutoTokenizer.from_pretrained(resolve_checkpoint_path(f"zoo:{n}")) for n in NAMES}

    async def run():
        try:
            coord = Coordinator(engines, toks)
            return [await coord.generate(request(p, params)) for p in PROMPTS]
        finally:
            for e in engines.values():
                await e.shutdown()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def untuned_switcher(tmp_path_factory) -> str:
    """The zoo's sft checkpoint with room for the switcher prompt (the experiment's untuned
    switcher): any HF causal LM can switch."""
    from antiphon.training.switcher_training import load_init

    out = tmp_path_factory.mktemp("untuned-switcher")
    model, tok = load_init("zoo:sft", 1024)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_switch_on_the_zoo_through_ray_equals_the_in_process_run(ray_cluster, untuned_switcher):
    spec = ModelSpec(name="zoo-switcher", path=untuned_switcher)
    actor = deploy_switch_policy(spec, PARAMS)
    specs = [ModelSpec(name=n, path=f"zoo:{n}") for n in NAMES]
    try:
        handle = serve.run(build_coordinator_app(specs, None, {"switch": actor}), name=APP,
                           route_prefix=None)  # fmt: skip
        params = switch_policy_params(spec, PARAMS)
        served = [handle.generate.remote(request(p, params)).result() for p in PROMPTS]
    finally:
        serve.delete(APP)
        serve.delete(SWITCHER_APP)
        ray.kill(actor)
    local = in_process({"switcher_path": untuned_switcher, **PARAMS})
    for s, loc in zip(served, local, strict=True):
        assert s.policy == "switch" and s.segments
        assert [(x.model, x.text) for x in s.segments] == [(x.model, x.text) for x in loc.segments]
        assert s.text == "".join(x.text for x in s.segments)
    fact = served[0]  # this answer outruns the budget: its last segment is forced
    assert fact.finish_reason == "length" and fact.segments[-1].model == "aligned"
    assert served[1].finish_reason == "eos"  # a writer's end token ends the story early
    assert len({x.model for s in served for x in s.segments}) == 3  # it does switch
