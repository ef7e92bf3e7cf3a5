"""`ModelServer`: the Ray Serve deployment of one checkpoint, a thin shim over its engine.

Each replica hosts one `ModelEngine`; the methods here only forward to it, keep the replica's
metrics, and give the engine an id prefix so session ids name their replica (see
`antiphon.actors.affinity`). Everything about sessions, batching and errors is the engine's.
A replica also takes its sessions' calls straight from a caller that asked for its address
(`direct_address`, see `antiphon.actors.direct`), past Serve's handle path.

    from ray import serve
    from antiphon.actors.client import ServeModelClient
    from antiphon.actors.server import build_model_deployment

    handle = serve.run(build_model_deployment(spec), name=spec.name, route_prefix=None)
    model = ServeModelClient(handle)          # a SessionModel, like the engine itself
    session = await model.open("Once upon")
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.exceptions import RayServeException

from antiphon import metrics
from antiphon.actors.affinity import SessionAffinityRouter, session_id_prefix
from antiphon.actors.direct import DirectAddress, DirectServer
from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.logging import configure_logging
from antiphon.messages import Generation, ModelInfo, SamplingParams, SessionInfo, TeacherForced


def _own_replica_id() -> str | None:
    """This replica's Serve id, or None when the class runs outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


class ModelServer:
    """One replica of a model deployment: the engine plus metrics. Methods mirror SessionModel."""

    def __init__(self, spec: ModelSpec, engine_cls: type[ModelEngine] = ModelEngine) -> None:
        configure_logging("json")
        self.spec = spec
        replica_id = _own_replica_id()
        self.engine = engine_cls(
            spec, id_prefix=session_id_prefix(replica_id) if replica_id else ""
        )
        self._tokens_reported = 0  # engine's tokens_generated already added to the counter
        self._record_metrics()
        # in a Ray worker, on its node's address (callers on other nodes reach it there)
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        self._direct = DirectServer(self, host, replica_id or "")

    def _record_metrics(self) -> None:
        # The engine counts without Ray; its counters become the replica's metrics here
        # (which carry Serve's deployment and replica tags).
        stats, model = self.engine.stats(), self.spec.name
        new_tokens = stats.tokens_generated - self._tokens_reported
        if new_tokens > 0:
            metrics.record(metrics.TOKENS_GENERATED, new_tokens, model=model)
            self._tokens_reported = stats.tokens_generated
        metrics.record(metrics.LIVE_SESSIONS, stats.live_sessions, model=model)
        metrics.record(metrics.CACHED_TOKENS, stats.cached_tokens, model=model)

    async def info(self) -> ModelInfo:
        return await self.engine.info()

    async def direct_address(self) -> DirectAddress:
        """Where this replica takes its sessions' calls directly (listening from the first ask)."""
        return await self._direct.address()

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        try:
            return await self.engine.open(prompt)
        finally:
            self._record_metrics()

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        try:
            return await self.engine.append(session_id, token_ids)
        finally:
            self._record_metrics()

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        try:
            return await self.engine.generate(session_id, params, prefix_ids)
        finally:
            self._record_metrics()

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        return await self.engine.score(session_id, token_ids, keep)

    async def teacher_force(
        self, session_id: str, token_ids: list[int], top_k: int = 0
    ) -> TeacherForced:
        return await self.engine.teacher_force(session_id, token_ids, top_k)

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        return await self.engine.next_token_logprobs(session_id, candidate_ids)

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        try:
            return await self.engine.prompt_next_token_logprobs(prompt, candidate_ids)
        finally:
            self._record_metrics()

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        try:
            return await self.engine.fork(session_id, n, length)
        finally:
            self._record_metrics()

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        try:
            return await self.engine.truncate(session_id, length)
        finally:
            self._record_metrics()

    async def close(self, session_id: str) -> None:
        try:
            await self.engine.close(session_id)
        finally:
            self._record_metrics()

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy."""
        self.engine.check_health()
        # Sessions also expire between calls; refresh the gauges here too.
        self._record_metrics()

    async def __del__(self) -> None:
        # Serve awaits this on graceful replica shutdown.
        await self._direct.close()
        await self.engine.shutdown()


def actor_options(specs: Sequence[ModelSpec]) -> dict[str, object]:
    """`ray_actor_options` of a replica that runs these checkpoints (one, or several
    colocated): the sum of what each one's `deployment` asks for."""
    options: dict[str, object] = {
        "num_cpus": sum(s.deployment.num_cpus for s in specs),
        "num_gpus": sum(s.deployment.num_gpus for s in specs),
    }
    resources: dict[str, float] = {}
    for s in specs:
        for key, amount in s.deployment.resources.items():
            resources[key] = resources.get(key, 0.0) + amount
    if resources:
        options["resources"] = resources
    kinds = {s.deployment.accelerator_type for s in specs} - {None}
    if len(kinds) > 1:
        raise ValueError(f"one replica cannot run on accelerator types {sorted(kinds)} at once")
    if kinds:
        options["accelerator_type"] = kinds.pop()
    return options


def deployment_options(spec: ModelSpec) -> dict[str, object]:
    """The `serve.deployment` options of a checkpoint's deployment, all derived from its
    spec's `deployment` knobs (the engine's knobs go to the engine)."""
    d = spec.deployment
    # Serve refuses a replica count beside an autoscaling config: the config bounds it.
    replicas: dict[str, object] = (
        {"autoscaling_config": dict(d.autoscaling)}
        if d.autoscaling is not None
        else {"num_replicas": d.num_replicas}
    )
    return {
        "name": spec.name,
        **replicas,
        "max_ongoing_requests": d.max_ongoing_requests,
        "ray_actor_options": actor_options([spec]),
        # Session calls must reach the replica that holds the session's cache.
        "request_router_config": RequestRouterConfig(request_router_class=SessionAffinityRouter),
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }


def build_model_deployment(
    spec: ModelSpec, engine_cls: type[ModelEngine] = ModelEngine
) -> Application:
    """The Serve application of one checkpoint; run it with `serve.run(app, name=...)`."""
    return serve.deployment(ModelServer, **deployment_options(spec)).bind(spec, engine_cls)
