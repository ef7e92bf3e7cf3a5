"""Validated, frozen configuration of one checkpoint: `ModelSpec`.

A `ModelSpec` is everything needed to host one checkpoint: where its weights are, how to run
them (device, dtype), how much session state a replica may keep, and the Ray Serve resources
of its deployment; or, with an `EndpointSpec`, a model reached over an OpenAI-compatible
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
    "num_replicas",
    "num_gpus",
    "num_cpus",
    "max_ongoing_requests",
)


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
    num_replicas: int = Field(default=1, ge=1, description="Serve replicas of this deployment.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests a replica accepts at once before Serve queues."
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
