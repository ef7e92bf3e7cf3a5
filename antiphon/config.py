"""Validated, frozen configuration of one checkpoint: `ModelSpec`.

A `ModelSpec` is everything needed to host one checkpoint: where its weights are, how to run
them (device, dtype), how much session state a replica may keep, and the Ray Serve resources
of its deployment. The whole app's config (ensembles, policies, the HTTP server) and the YAML
loader are `antiphon.deploy.config`'s: it validates policy parameters, which needs the policy
registry, a layer above this one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

Dtype = Literal["float32", "bfloat16", "float16"]


class FrozenModel(BaseModel):
    """Base of every config: unknown keys are errors, and nothing changes after validation."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ModelSpec(FrozenModel):
    """One checkpoint and the deployment that serves it."""

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

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, v: str) -> str:
        if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {v!r}")


# A policy parameter: any JSON value (nested rules of rule_router, lists of model names, ...);
# each policy's own pydantic model in the registry says which keys and types it takes.
PolicyParamValue = JsonValue
