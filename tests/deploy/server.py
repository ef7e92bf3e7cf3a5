"""One real antiphon HTTP server for the deploy, client and CLI tests.

`ensure_server(...)` deploys the app on the suite's Ray cluster once and returns its URL;
later calls reuse it while it answers (and redeploy if another test tore Serve down). The
app: two tiny random checkpoints "a" and "b"; ensembles "pair" (round robin), "solo" and
"switched", whose `switch` policy calls the trained test switcher (it prefers model 1),
listed as a third model of the config and so a deployment of the same app, "trio" (a, b
and the switcher's checkpoint writing, for policies of three models) and "deferred" (b carries
a random deferral gate and defers to a); an API key; a turn log in a temp dir; Serve's HTTP
proxy on 127.0.0.1 and a free port.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from ray import serve

from antiphon.actors.gate import save_gate
from antiphon.deploy.app import free_port
from antiphon.deploy.config import AppConfig, parse_config

APP_NAME = "antiphon-test"
ROUTE_PREFIX = "/antiphon-test"  # not "/": other tests' apps may hold the root
API_KEY = "test-key"
MAX_CONCURRENT = 2  # small, so the overload test can fill it with two streams
DEFER_ETA = 0.5  # the random gate of b crosses it on some tokens, not all


@dataclass(frozen=True)
class RunningServer:
    url: str
    config: AppConfig
    turn_log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


_server: RunningServer | None = None


def server_config(
    model_a: Path, model_b: Path, switcher: Path, turn_log: Path, gate_b: Path | None = None
) -> AppConfig:
    """`gate_b`: a deferral gate for model b (the "deferred" ensemble defers from b to a)."""
    gate = {"gate_path": str(gate_b)} if gate_b is not None else {}
    return parse_config(
        {
            "models": [
                {"name": "a", "path": str(model_a), "deployment": {"max_ongoing_requests": 16}},
                {
                    "name": "b",
                    "path": str(model_b),
                    "deployment": {"max_ongoing_requests": 16},
                    **gate,
                },
                {"name": "switcher", "path": str(switcher)},
            ],
            "ensembles": [
                {
                    "name": "pair",
                    "models": ["a", "b"],
                    "policy": {"name": "round_robin", "params": {"segment_len": 4}},
                },
                {
                    "name": "solo",
                    "models": ["a"],
                    "policy": {"name": "fixed", "params": {"model": "a"}},
                },
                {
                    "name": "switched",
                    "models": ["a", "b"],
                    "policy": {
                        "name": "switch",
                        "params": {
                            "switcher_path": str(switcher),
                            "switcher_deployment": "switcher",
                            "segment_len": 4,
                        },
                    },
                },
                {  # three models: what a weak-to-strong search step needs
                    "name": "trio",
                    "models": ["a", "b", "switcher"],
                    "policy": {"name": "round_robin", "params": {"segment_len": 4}},
                },
                {  # Co-LLM: b drafts until its gate fires, a writes the gated token
                    "name": "deferred",
                    "models": ["b", "a"],
                    "policy": {
                        "name": "defer",
                        "params": {"base": "b", "assistant": "a", "eta": DEFER_ETA},
                    },
                },
            ],  # fmt: skip
            "serving": {
                "api_key": API_KEY,
                "max_concurrent_requests": MAX_CONCURRENT,
                "default_max_tokens": 12,
                "turn_log_path": str(turn_log),
            },
        }
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def http_url(route_prefix: str) -> str:
    """The URL of an app at `route_prefix`, on the port Serve's proxy really listens on
    (Serve may have been started before us)."""
    from ray.serve.context import _get_global_client

    return f"http://127.0.0.1:{_get_global_client().http_config.port}{route_prefix}"


def ensure_server(model_a: Path, model_b: Path, switcher: Path, work_dir: Path) -> RunningServer:
    global _server
    if _server is not None and _answers(_server.url):
        return _server
    from antiphon.deploy.app import build_app

    turn_log = work_dir / "turns.atl"
    gate = save_gate(work_dir / "gate_b.safetensors",
                     torch.randn(64, generator=torch.Generator().manual_seed(11)))  # fmt: skip
    config = server_config(model_a, model_b, switcher, turn_log, gate)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    url = http_url(ROUTE_PREFIX)
    assert _answers(url), f"test server at {url} does not answer"
    _server = RunningServer(url=url, config=config, turn_log=turn_log)
    return _server
