"""Colocated ensembles (`serving.colocate_models`): the coordinator replica runs every model
itself, so the app has no model deployments, and answers what one deployment per model
answers, over HTTP and through the `openai` client, streaming included."""

from __future__ import annotations

import httpx
import openai
import pytest
from ray import serve

from antiphon.deploy.app import build_app
from antiphon.deploy.config import parse_config
from tests.deploy.server import API_KEY, http_url

pytestmark = pytest.mark.slow

APP = "antiphon-colocated"
PROMPTS = ("Once upon a time", "Q: What is the capital of France?\nA:")


@pytest.fixture(scope="module")
def colocated(server, tmp_path_factory):
    """The shared test server's models and ensembles, colocated: the switcher runs in the
    coordinator's process instead of in its deployment."""
    raw = server.config.model_dump(mode="json")
    for ensemble in raw["ensembles"]:
        ensemble["policy"]["params"].pop("switcher_deployment", None)
    raw["serving"].update(
        colocate_models=True, api_key=API_KEY,
        turn_log_path=str(tmp_path_factory.mktemp("colocated") / "turns.atl"),
    )  # fmt: skip
    serve.run(build_app(parse_config(raw)), name=APP, route_prefix=f"/{APP}")
    yield http_url(f"/{APP}")
    serve.delete(APP)


def generate(url: str, ensemble: str, prompt: str) -> dict:
    body = {"ensemble": ensemble, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def writers(answer: dict) -> list[tuple[str, str]]:
    return [(s["model"], s["text"]) for s in answer["segments"]]


def test_the_app_has_no_model_deployments(colocated):
    deployments = serve.status().applications[APP].deployments
    assert "coordinator" in deployments
    assert not {"a", "b", "switcher"} & set(deployments)


@pytest.mark.parametrize("ensemble", ["pair", "switched", "deferred", "trio"])
def test_colocated_answers_are_the_deployed_ones(server, colocated, ensemble):
    for prompt in PROMPTS:
        ours, theirs = generate(colocated, ensemble, prompt), generate(server.url, ensemble, prompt)
        assert writers(ours) == writers(theirs)


def test_the_openai_client_streams_from_a_colocated_app(server, colocated):
    client = openai.OpenAI(base_url=f"{colocated}/v1", api_key=API_KEY)
    whole = client.completions.create(model="pair", prompt=PROMPTS[0], max_tokens=16,
                                      temperature=0)  # fmt: skip
    stream = client.completions.create(model="pair", prompt=PROMPTS[0], max_tokens=16,
                                       temperature=0, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == (
        whole.choices[0].text
    )
    answer = generate(colocated, "pair", PROMPTS[0])
    assert whole.choices[0].text == "".join(t for _, t in writers(answer))
    assert {m for m, _ in writers(answer)} == {"a", "b"}  # both took turns, in one process
    health = httpx.get(f"{colocated}/health", timeout=30)
    assert health.status_code == 200, health.text
