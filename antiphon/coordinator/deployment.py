"""`CoordinatorServer`: the turn loop as a Ray Serve deployment, a thin shim over
`antiphon.coordinator.loop.Coordinator`.

Each replica holds a `ServeModelClient` per model deployment (a `CompletionsModel` for a
model behind a completions endpoint, which has no deployment; a session's calls go straight to
its replica after the first, except for an autoscaled model), the tokenizers (loaded from the
models' specs), the policies hosted in policy actors, and the turn sink it was given (the app
builder in `antiphon.deploy.app` makes it: a client of the turn log actor). Colocated
(`colocate=True`), a replica runs every model itself, each a `ModelServer` in this process (its
engine, metrics and health check): no model deployments, no process hop in a turn.

    from ray import serve
    app = build_coordinator_deployment(specs, model_apps, turn_sink=sink)
    handle = serve.run(app, name="antiphon", route_prefix=None)
    result = await handle.generate.remote(request)          # a GenerationResult
    async for event in handle.options(stream=True).stream.remote(request):
        ...                                                  # SegmentEvents, then a FinishEvent
    await handle.feedback.remote(request_id, 1.0)

Round trips per turn: one policy call (none for the rule policies, which run in-process) plus
the model calls of the decision (one `generate` for a write: it carries the tokens the writer
has not seen yet, or opens its session). After a request's last event, a background task
closes its sessions and sends its turn records to the sink in one batch, so the answer waits
for neither (`flush_turn_log` waits for both). Logs are JSON lines carrying the request id and
turn.

Metrics (`antiphon.coordinator.metering`, exported by Ray's metrics agent): turns per request
and each policy decision's latency by policy, and the committed tokens and segments by writer
and segment kind (deferred over all: the deferral rate), from every request's records, with or
without a turn log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from antiphon.actors.client import ServeModelClient
from antiphon.actors.protocol import SessionModel
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.metering import MeteredTurnSink, timed_policies
from antiphon.coordinator.records import FeedbackRecord, TurnSink
from antiphon.coordinator.request import GenerationRequest, GenerationResult, StreamEvent
from antiphon.coordinator.scoring import ScoredPrompt, prompt_logprobs
from antiphon.errors import InvalidRequest, NotFound
from antiphon.logging import configure_logging
from antiphon.policies.actor import HostedPolicy, PolicyClient
from antiphon.policies.base import Policy
from antiphon.policies.registry import PolicyCache, validate_policy_params

if TYPE_CHECKING:
    from antiphon.actors.server import ModelServer


class HostedPolicies:
    """Resolves a request's policy: a policy hosted in a `PolicyActor` by its registry name,
    every other policy built in-process, once per parameters (rule policies cost no round
    trip).

    A hosted policy decides the requests that give the parameters it was created with. A
    request that names it with other parameters gets a policy built in-process with those:
    what it asked for, e.g. a candidate switcher judged through the serving stack before it
    is published to the hosted one."""

    def __init__(self, actors: Mapping[str, ActorHandle]) -> None:
        self.local = PolicyCache()
        self.clients: dict[str, PolicyClient] = {}
        self.params = {}
        for name, actor in actors.items():
            self.clients[name] = PolicyClient.connect(actor)
            _, _, params = ray.get(actor.describe.remote())
            self.params[name] = validate_policy_params(name, params.model_dump())

    def __call__(
        self, name: str, params: Mapping[str, object], ensemble: tuple[str, ...]
    ) -> Policy:
        hosted = name in self.clients
        if hosted and validate_policy_params(name, params, ensemble) == self.params[name]:
            return self.clients[name]
        return self.local(name, params, ensemble)


def colocated_servers(specs: Sequence[ModelSpec]) -> dict[str, ModelServer]:
    """Each model served in this process (a colocated ensemble). The engine is imported here,
    not with this module: a replica that only calls model deployments never loads the model
    classes of transformers (seconds of import in every replica that starts)."""
    from antiphon.actors.server import ModelServer

    return {s.name: ModelServer(s) for s in specs}


class CoordinatorServer:
    """One coordinator replica. Stateless between requests: any replica serves any request."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        model_handles: Mapping[str, DeploymentHandle],
        turn_sink: TurnSink | None = None,
        policy_actors: Mapping[str, ActorHandle | HostedPolicy] | None = None,
        colocate: bool = False,
    ) -> None:
        configure_logging("json")
        policy_actors = {
            name: a.actor() if isinstance(a, HostedPolicy) else a
            for name, a in (policy_actors or {}).items()
        }
        served = [s for s in specs if s.endpoint is None]
        deployed = [] if colocate else served
        missing = sorted({s.name for s in deployed} - set(model_handles))
        if missing:
            raise ValueError(f"no deployment handle for models {missing}")
        self.turn_sink = turn_sink
        self.model_handles = {s.name: model_handles[s.name] for s in deployed}
        self.colocated = colocated_servers(served) if colocate else {}
        self.policy_actors = policy_actors
        models: dict[str, SessionModel] = {}
        for s in specs:
            if s.endpoint is not None:  # called from here: its sessions live in this replica
                from antiphon.actors.endpoint import CompletionsModel  # the openai client

                models[s.name] = CompletionsModel(s)
            else:
                # Direct session calls bypass Serve's request counting, which an
                # autoscaled deployment scales by: there every call goes through Serve.
                models[s.name] = self.colocated.get(s.name) or ServeModelClient(
                    model_handles[s.name], direct=s.deployment.autoscaling is None
                )
        self.coordinator = Coordinator(
            models=models,
            tokenizers={s.name: load_tokenizer(s.path, s.trust_remote_code) for s in specs},
            resolve_policy=timed_policies(HostedPolicies(policy_actors)),
            # every request's records feed the metrics, with or without a turn log
            turn_sink=MeteredTurnSink(turn_sink, serve.get_replica_context().replica_id.unique_id),
            close_in_background=True,  # the replica's event loop outlives every request
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.coordinator.generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Call with `handle.options(stream=True).stream.remote(request)`."""
        async for event in self.coordinator.run(request):
            yield event

    async def prompt_logprobs(self, model: str, prompt: str, top_k: int = 0) -> ScoredPrompt:
        """The prompt's token ids in `model`'s tokenizer, each one's log-prob given those
        before it (None for the first) and, top_k asked, the most likely tokens there."""
        models, tokenizers = self.coordinator.models, self.coordinator.tokenizers
        if model not in models:
            raise NotFound(f"unknown model {model!r}; known models: {sorted(models)}")
        return await prompt_logprobs(models[model], tokenizers[model], prompt, top_k)

    async def gates(self) -> dict[str, str]:
        """Model -> the fingerprint of its deferral gate, for the models that carry one (a
        model that does not answer now is left out)."""
        models = self.coordinator.models
        infos = await asyncio.gather(*(m.info() for m in models.values()), return_exceptions=True)
        return {name: info.gate_fingerprint for name, info in zip(models, infos, strict=True)
                if not isinstance(info, BaseException) and info.gate_fingerprint}  # fmt: skip

    async def feedback(self, request_id: str, reward: float, comment: str = "") -> None:
        """Log a client's reward beside the request's turns; returns once it has landed.
        NotFound when the turn log holds no request of that id."""
        if not request_id:
            raise InvalidRequest("request_id must be non-empty")
        if self.turn_sink is None:
            raise InvalidRequest("this deployment has no turn log to record feedback in")
        await self.coordinator.drain()  # requests of this replica that ended: records sent
        await self.turn_sink.feedback(FeedbackRecord(request_id, float(reward), comment))

    async def health(self) -> dict[str, str]:
        """What of this replica's dependencies is degraded, by component ("turn_log",
        "model:NAME", "policy:NAME"); {} when none is."""
        checks = [self._models_degraded(), self._policies_degraded()]
        if self.turn_sink is not None:
            checks.append(self._turn_log_degraded())
        degraded: dict[str, str] = {}
        for found in await asyncio.gather(*checks):
            degraded.update(found)
        return degraded

    async def _turn_log_degraded(self) -> dict[str, str]:
        assert self.turn_sink is not None
        problem = await self.turn_sink.problem()
        return {"turn_log": problem} if problem else {}

    async def _models_degraded(self) -> dict[str, str]:
        """Model deployments Serve does not report healthy (a replica that died and is being
        replaced, a failed deploy); one that is only scaling while a replica runs is fine. A
        model behind an endpoint has no deployment to report on."""
        status = await asyncio.to_thread(serve.status)
        degraded = {}
        for name, handle in self.model_handles.items():
            app = status.applications.get(handle.app_name)
            deployment = app.deployments.get(handle.deployment_name) if app else None
            if deployment is None:
                degraded[f"model:{name}"] = "its deployment is not running"
                continue
            running = deployment.replica_states.get("RUNNING", 0)
            scaling = deployment.status in ("UPSCALING", "DOWNSCALING") and running > 0
            if deployment.status != "HEALTHY" and not scaling:
                states = deployment.replica_states.items()
                replicas = ", ".join(f"{n} {state.lower()}" for state, n in states)
                degraded[f"model:{name}"] = (
                    f"deployment {deployment.status.lower()} ({replicas or 'no replicas'})"
                )
        return degraded

    async def _policies_degraded(self, timeout_s: float = 2.0) -> dict[str, str]:
        """Policy actors that do not answer (Ray restarts one that crashed)."""

        async def check(name: str, actor: ActorHandle) -> tuple[str, str | None]:
            try:
                await asyncio.wait_for(actor.describe.remote(), timeout_s)
            except TimeoutError:
                return name, f"the policy actor did not answer within {timeout_s:g} s"
            except RayActorError as e:
                return name, f"the policy actor is unavailable ({type(e).__name__})"
            return name, None

        found = await asyncio.gather(*(check(n, a) for n, a in self.policy_actors.items()))
        return {f"policy:{name}": problem for name, problem in found if problem}

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s: a colocated model whose engine
        stopped makes the replica unhealthy, and Serve replaces it."""
        for model in self.colocated.values():
            model.check_health()

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown.
        for model in self.colocated.values():
            await model.engine.shutdown()

    async def flush_turn_log(self) -> None:
        """Wait until every record of this replica's finished requests is in the turn log
        (and their sessions are closed)."""
        await self.coordinator.drain()
        if self.turn_sink is not None:
            await self.turn_sink.flush()


def build_coordinator_deployment(
    specs: Sequence[ModelSpec],
    model_apps: Mapping[str, Application],
    turn_sink: TurnSink | None = None,
    policy_actors: Mapping[str, ActorHandle | HostedPolicy] | None = None,
    *,
    num_replicas: int = 1,
    max_ongoing_requests: int = 256,
    colocate: bool = False,
) -> Application:
    """The coordinator bound to its model deployments (bound apps become handles in Serve);
    `colocate`: running the models itself, with the resources they ask for."""
    from antiphon.actors.server import actor_options

    options = {
        "name": "coordinator",
        "num_replicas": num_replicas,
        "max_ongoing_requests": max_ongoing_requests,  # waits on models, not CPU-bound
        "ray_actor_options": (
            actor_options([s for s in specs if s.endpoint is None]) if colocate
            else {"num_cpus": 0}
        ),
    }  # fmt: skip
    return serve.deployment(CoordinatorServer, **options).bind(
        list(specs), dict(model_apps), turn_sink, dict(policy_actors or {}), colocate
    )
