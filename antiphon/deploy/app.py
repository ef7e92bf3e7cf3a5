"""The app builders: one validated `AppConfig` -> one Serve application; model specs -> the
models and a coordinator over them (no HTTP), for jobs and tests.

    from ray import serve
    from antiphon.deploy.config import load_config
    from antiphon.deploy.app import build_app, build_coordinator_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(load_config("antiphon.yaml")), name="antiphon", route_prefix="/")
    handle = serve.run(build_coordinator_app(specs, "runs/turns.atl"), name="c", route_prefix=None)

The application is: one model deployment per `ModelSpec` (none for a model behind a
completions endpoint: the coordinator calls it), the coordinator (the turn loop; rule policies
run in it; it logs to the turn-log actor, the one writer of the log file, which its sink finds
or starts on first use), and the HTTP ingress in front. Everything is
validated once, here, before any actor starts (like Ray Serve LLM's `build_openai_app`).

`serve run antiphon.deploy.app:app_builder config=antiphon.yaml` works too (Serve's builder
convention), as does a Serve config file naming `import_path: antiphon.deploy.app:app_builder`.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from ray.actor import ActorHandle
from ray.serve.deployment import Application

from antiphon.actors.server import build_model_deployment
from antiphon.config import ModelSpec
from antiphon.coordinator.deployment import build_coordinator_deployment
from antiphon.deploy.config import AppConfig, load_config, parse_config
from antiphon.deploy.ingress import build_ingress
from antiphon.policies.actor import HostedPolicy
from antiphon.training.turn_log import DEFAULT_SEGMENT_BYTES
from antiphon.training.turn_log_actor import TurnLogClient


def build_app(config: AppConfig | dict) -> Application:
    """The Serve application of a whole config (a dict is validated as an AppConfig first)."""
    if not isinstance(config, AppConfig):
        config = parse_config(config)
    # The turn log is opened by an actor whose working directory is not ours: pin the path.
    log_path = str(Path(config.serving.turn_log_path).expanduser().resolve())
    serving = config.serving.model_copy(update={"turn_log_path": log_path})
    config = config.model_copy(update={"serving": serving})
    coordinator = build_coordinator_app(
        config.models, log_path, hosted_policies(config), num_replicas=serving.coordinator_replicas,
        turn_log_segment_bytes=serving.turn_log_segment_bytes, colocate=serving.colocate_models,
    )  # fmt: skip
    return build_ingress(config, coordinator)


def hosted_policy_actor_name(ensemble: str) -> str:
    """The name of the policy actor of an ensemble whose policy is `hosted`."""
    return f"antiphon-policy-{ensemble}"


def hosted_policies(config: AppConfig) -> dict[str, HostedPolicy]:
    """The policy actor of each ensemble whose policy is hosted (the first coordinator
    replica starts it; a redeploy finds it running and keeps what was published to it)."""
    return {
        e.policy.name: HostedPolicy(
            e.policy.name, dict(e.policy.params), hosted_policy_actor_name(e.name)
        )
        for e in config.ensembles
        if e.policy.hosted
    }


def build_coordinator_app(
    specs: Sequence[ModelSpec],
    turn_log_path: str | None = None,
    policy_actors: Mapping[str, ActorHandle | HostedPolicy] | None = None,
    *,
    num_replicas: int = 1,
    turn_log_actor_name: str | None = None,
    turn_log_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    colocate: bool = False,
) -> Application:
    """Model deployments for `specs` plus a coordinator over them (logging to the turn log at
    `turn_log_path`, if given), as one Serve application. `colocate`: no model deployments;
    each coordinator replica runs the models itself."""
    sink = None
    if turn_log_path is not None:
        name = turn_log_actor_name or turn_log_actor_name_for(turn_log_path)
        sink = TurnLogClient(turn_log_path, name=name, segment_bytes=turn_log_segment_bytes)
    # a model behind an endpoint has no deployment: the coordinator calls the endpoint
    models = {} if colocate else {
        s.name: build_model_deployment(s) for s in specs if s.endpoint is None
    }  # fmt: skip
    return build_coordinator_deployment(
        specs, models, sink, policy_actors, num_replicas=num_replicas, colocate=colocate
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a server started on this machine)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def turn_log_actor_name_for(path: str) -> str:
    """One turn-log actor per log file: apps writing the same file share its one writer, apps
    writing different files never share an actor (the actor is named and cluster-wide)."""
    return f"antiphon-turn-log-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


class AppArgs(BaseModel):
    """Arguments of `app_builder`: `key=value` pairs from Serve's command line, or the `args`
    of an application in a Serve config file (`antiphon build` writes the config inline)."""

    config: str | dict[str, Any] | None = Field(
        default=None,
        description="A YAML config file, or the config itself; default: the default one.",
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's builder entry point: `serve run antiphon.deploy.app:app_builder config=FILE`,
    or a Serve config file's application (`antiphon.deploy.serve_config`)."""
    from antiphon.deploy.default import default_config

    parsed = AppArgs.model_validate(args)
    if isinstance(parsed.config, dict):
        return build_app(parse_config(parsed.config, source="the Serve config's args.config"))
    return build_app(load_config(parsed.config) if parsed.config else default_config())
