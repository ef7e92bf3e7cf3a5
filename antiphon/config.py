"""Validated, frozen configuration of one checkpoint: `ModelSpec`.

A `ModelSpec` is everything needed to host one checkpoint: where its weights are, how to run
them (device, dtype), how much session state a replica may keep (the engine's knobs), and,
apart in its `DeploymentSpec`, how Serve deploys it (replicas, resources, placement); or,
with an `EndpointSpec`, a model reached over an OpenAI-compatible
completions endpoint, which has no deployment (`path` names only its tokenizer). The whole
app's config (ensembles, policies, the HTTP server) and the YAML loader are
`antiphon.deploy.config`'s: it validates policy parameters, which needs the policy registry,
a layer above this one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


class FrozenModel(BaseModel):
    """Base of every config: unknown keys are errors, and nothing changes after validation."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class EndpointSpec(FrozenModel):
    """A model reached over any OpenAI-compatible completions endpoint: a black box, text in
    and text out, with no log-probs to score with (it can write or propose, not score or carry
    a deferral gate). No deployment is made for it; the coordinator calls the endpoint."""

    base_url: str = Field(description="The API root, e.g. 'http://host:8000/v1'.")
    model: str = Field(min_length=1, description="The model id the endpoint serves it under.")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the endpoint's API key (set "
        "where the coordinator runs); None: the endpoint takes no key.",
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="Longest wait for one completion, connecting included."
    )
    max_context: int | None = Field(
        default=None,
        ge=2,
        description="The model's context in tokens of the tokenizer `path` names; default: the "
        "context in the config of the checkpoint at `path` (needed when it is a tokenizer alone).",
    )
    logprobs: bool = Field(
        default=True,
        description="Ask for each written token's log-prob (`logprobs: 0`); off for an endpoint "
        "that refuses it, whose tokens then carry 0.0 (unknown, not a measurement).",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1]) == 0:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")


# What only a deployment of the model's own weights uses: set beside an endpoint, an error.
DEPLOYMENT_FIELDS = (
    "device",
    "dtype",
    "gate_path",
    "max_cached_tokens",
    "session_idle_timeout_s",
    "max_batch_size",
    "prefix_reuse",
    "deployment",
)

# Ray's own resources have options of their own (num_cpus, num_gpus): Ray refuses them here.
_RESERVED_RESOURCES = ("CPU", "GPU")


class DeploymentSpec(FrozenModel):
    """How Serve deploys one checkpoint: its replicas and what each needs, where it may run."""

    num_replicas: int = Field(default=1, ge=1, description="Serve replicas of this deployment.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica needs, e.g. {'node_a': 1} to run it "
        "only on the nodes started with that resource (those that hold the checkpoint).",
    )
    accelerator_type: str | None = Field(
        default=None,
        min_length=1,
        description="Ray's accelerator_type of the replicas' node (e.g. 'A100', 'H100'); "
        "None: any node.",
    )
    autoscaling: dict[str, JsonValue] | None = Field(
        default=None,
        description="Serve's autoscaling_config (min_replicas, max_replicas, "
        "target_ongoing_requests, ...), checked by Serve's AutoscalingConfig; replaces "
        "num_replicas. None: a fixed num_replicas.",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests a replica accepts at once before Serve queues."
    )

    @model_validator(mode="after")
    def _autoscaling_or_fixed_replicas(self) -> DeploymentSpec:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            if self.num_replicas > 1:
                raise ValueError(
                    f"num_replicas ({self.num_replicas}) and autoscaling "
                    "exclude each other (autoscaling's min_replicas and max_replicas bound "
                    "the replicas): give one of them"
                )
        return self

    @field_validator("resources")
    @classmethod
    def _resources_are_custom(cls, v: dict[str, float]) -> dict[str, float]:
        reserved = [name for name in v if name in _RESERVED_RESOURCES]
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} cannot be a custom resource: use num_cpus / num_gpus "
                "(Ray refuses them in resources)"
            )
        for name, quantity in v.items():
            if not name:
                raise ValueError("a resource name must be non-empty")
            if quantity < 0:
                raise ValueError(f"resource {name!r}: quantity must be >= 0, got {quantity}")
            if quantity > 1 and quantity != int(quantity):
                # Ray schedules a quantity above 1 in whole units only.
                raise ValueError(
                    f"resource {name!r}: a quantity above 1 must be whole, got {quantity}"
                )
        return v

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling_is_valid_for_serve(
        cls, v: dict[str, JsonValue] | None
    ) -> dict[str, JsonValue] | None:
        if v is None:
            return v
        # Imported here: the client imports this module and must not need Ray.
        from pydantic import ValidationError
        from ray.serve.config import AutoscalingConfig

        # Serve's model ignores keys it does not know; a misspelt key must not vanish.
        unknown = sorted(set(v) - set(AutoscalingConfig.model_fields))
        if unknown:
            known = ", ".join(AutoscalingConfig.model_fields)
            raise ValueError(f"unknown autoscaling keys {unknown}; Serve's keys: {known}")
        try:
            AutoscalingConfig.model_validate(v)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"])
                message = err["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {message}" if where else message)
            refusal = "; ".join(problems)
            raise ValueError(f"Serve's AutoscalingConfig refuses it: {refusal}") from None
        return v


class ModelSpec(FrozenModel):
    """One checkpoint and the deployment that serves it, or (with `endpoint`) a model behind
    a completions endpoint, whose `path` names its tokenizer."""

    name: str = Field(description="Name the ensemble and the API use for this model.", min_length=1)
    path: str = Field(
        description="Local directory of an HF checkpoint, a hub id, or 'zoo:NAME' for a zoo model."
    )
    device: str = Field(default="cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    dtype: Dtype = Field(default="float32", description="Weights and activations dtype.")
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the checkpoint (off unless asked)."
    )
    gate_path: str | None = Field(
        default=None,
        description="safetensors file with the deferral gate ('weight' (hidden,), optional "
        "'bias' ()); default: 'gate.safetensors' in the checkpoint directory if present.",
    )
    max_sessions: int = Field(default=256, ge=1, description="Live sessions per replica (LRU).")
    max_cached_tokens: int = Field(
        default=262_144, ge=1, description="Tokens held in KV caches per replica (LRU beyond)."
    )
    session_idle_timeout_s: float = Field(
        default=600.0, gt=0, description="A session unused this long is closed."
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="Most sessions one batched forward pass serves."
    )
    prefix_reuse: bool = Field(
        default=True,
        description="A session sharing a prompt prefix with a live or recently closed one "
        "starts from that cache instead of feeding the prefix again.",
    )
    deployment: DeploymentSpec = Field(
        default_factory=DeploymentSpec,
        description="How Serve deploys it (replicas, resources, placement), apart from the "
        "engine's knobs above, as Ray Serve LLM keeps deployment_config apart from "
        "engine_kwargs.",
    )

    endpoint: EndpointSpec | None = Field(
        default=None,
        description="Reach this model over an OpenAI-compatible completions endpoint instead "
        "of deploying it; `path` then names only its tokenizer (budgets count in its tokens).",
    )

    @model_validator(mode="after")
    def _endpoint_has_no_deployment(self) -> ModelSpec:
        # Only the fields given count: a default is not a choice the config made.
        given = [f for f in DEPLOYMENT_FIELDS if f in self.model_fields_set]
        if self.endpoint is not None and given:
            raise ValueError(
                f"model {self.name!r} is reached through its endpoint and has no deployment: "
                f"{', '.join(given)} do not apply to it (remove them; `path` names only its "
                "tokenizer)"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, v: str) -> str:
        if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {v!r}")


# A policy parameter: any JSON value (nested rules of rule_router, lists of model names, ...);
# each policy's own pydantic model in the registry says which keys and types it takes.
PolicyParamValue = JsonValue
