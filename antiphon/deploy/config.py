"""The whole app's config, validated and frozen, and the YAML loader.

An `AppConfig` is a whole deployment: the checkpoints (`antiphon.config.ModelSpec`; one with an
`endpoint` is a black box reached over an OpenAI-compatible completions endpoint), the
ensembles over them (each with a default `PolicySpec`, whose parameters the policy registry
checks), and the HTTP server (`ServingSpec`). Load one with

    from antiphon.deploy.config import load_config
    config = load_config("antiphon.yaml")     # ConfigError names the file and each bad field
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from antiphon.config import FrozenModel, ModelSpec, PolicyParamValue
from antiphon.errors import AntiphonError, ConfigError, NotFound
from antiphon.policies import validate_policy_params
from antiphon.training.turn_log import DEFAULT_SEGMENT_BYTES


class PolicySpec(FrozenModel):
    """A policy by registry name and its parameters; validated by building it once."""

    name: str = Field(
        default="round_robin",
        min_length=1,
        description="Registry name of the policy (e.g. 'fixed', 'round_robin', 'random_switch').",
    )
    params: dict[str, PolicyParamValue] = Field(
        default_factory=dict,
        description="Keyword parameters of the policy; the policy's registry entry checks them.",
    )
    hosted: bool = Field(
        default=False,
        description="Decide in one policy actor shared by every coordinator replica (named "
        "'antiphon-policy-<ensemble>'), which an online trainer reloads when it publishes a "
        "new switcher; off: each coordinator replica builds the policy itself.",
    )

    @model_validator(mode="after")
    def _builds(self) -> PolicySpec:
        # The registry is the one place that knows each policy's parameters.
        try:
            validate_policy_params(self.name, self.params)
        except AntiphonError as e:
            raise ValueError(e.message) from None
        return self


class EnsembleSpec(FrozenModel):
    """Models that write one response together, and the default policy that picks who writes."""

    name: str = Field(min_length=1, description="Name of the ensemble in the API ('model' field).")
    models: list[str] = Field(
        min_length=1, description="Names of the models (ModelSpec.name) that take turns."
    )
    policy: PolicySpec = Field(
        default_factory=PolicySpec,
        description="Policy used when a request names none (requests may override it).",
    )
    description: str = Field(default="", description="Free text shown by GET /v1/models.")

    @field_validator("models")
    @classmethod
    def _models_unique(cls, v: list[str]) -> list[str]:
        repeated = sorted({m for m in v if v.count(m) > 1})
        if repeated:
            raise ValueError(f"models listed twice: {', '.join(repeated)}")
        return v

    @model_validator(mode="after")
    def _policy_names_own_models(self) -> EnsembleSpec:
        try:
            validate_policy_params(self.policy.name, self.policy.params, tuple(self.models))
        except AntiphonError as e:
            raise ValueError(e.message) from None
        return self


class ServingSpec(FrozenModel):
    """The HTTP front door: where it listens, who may call it, how much it takes at once."""

    host: str = Field(
        default="127.0.0.1", description="Interface the HTTP server binds; 0.0.0.0 exposes it."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    api_key: SecretStr | None = Field(
        default=None,
        description="If set, every /v1 request needs 'Authorization: Bearer <api_key>'.",
    )
    api_key_env: str | None = Field(
        default=None, min_length=1,
        description="Instead of api_key: the environment variable that holds it, read where "
        "the ingress runs (a cluster's secret; a Serve config file carries only the name).",
    )  # fmt: skip
    max_concurrent_requests: int = Field(
        default=64, ge=1, description="Generation requests in flight at once; beyond this: 503."
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Largest request body accepted (bytes); beyond: 413 before it is parsed. "
        "1 MiB holds a prompt longer than any model's context.",
    )
    default_max_tokens: int = Field(
        default=128, ge=1, description="Token budget of a request that names none."
    )
    turn_log_path: str = Field(
        default="runs/turns.atl",
        description="File the turn log (turns, outcomes, feedback) is appended to.",
    )
    turn_log_segment_bytes: int = Field(
        default=DEFAULT_SEGMENT_BYTES,
        ge=4096,
        description="The turn log rotates into a new segment file past this size; a segment "
        "every trainer has read past is removed.",
    )
    coordinator_replicas: int = Field(
        default=1, ge=1, description="Replicas of the coordinator (any one serves any request)."
    )
    colocate_models: bool = Field(
        default=False,
        description="Run every model (not behind an endpoint) inside each coordinator replica "
        "instead of one deployment per model: the turn loop calls them with no process hop. "
        "For checkpoints that fit on one device together; the replica takes the sum of their "
        "resources. Default: one deployment per model.",
    )
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas of the HTTP ingress; each admits max_concurrent_requests.",
    )

    @model_validator(mode="after")
    def _one_api_key(self) -> ServingSpec:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    @property
    def has_api_key(self) -> bool:
        return self.api_key is not None or self.api_key_env is not None

    def api_key_value(self) -> str | None:
        """The API key in clear, or None when the API is open (ConfigError: `api_key_env`
        names a variable this process does not have)."""
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"serving.api_key_env: the environment variable {self.api_key_env!r} that "
                    "should hold the API key is not set (or empty) where the ingress runs"
                )
            return key
        return self.api_key.get_secret_value() if self.api_key is not None else None


class AppConfig(FrozenModel):
    """A whole antiphon deployment: the checkpoints, the ensembles over them, the HTTP server."""

    models: list[ModelSpec] = Field(
        min_length=1,
        description="Checkpoints, one deployment each (none for a model behind an endpoint).",
    )
    ensembles: list[EnsembleSpec] = Field(
        min_length=1, description="Ensembles served; the first is the default."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="HTTP server settings.")

    @field_validator("models")
    @classmethod
    def _model_names_unique(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return v

    @field_validator("ensembles")
    @classmethod
    def _ensembles_known_models(
        cls, v: list[EnsembleSpec], info: ValidationInfo
    ) -> list[EnsembleSpec]:
        names = [e.name for e in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"ensemble names must be unique; repeated: {', '.join(repeated)}")
        if "models" not in info.data:
            return v  # models already failed; their error says why
        known = [m.name for m in info.data["models"]]
        for i, ensemble in enumerate(v):
            for j, model in enumerate(ensemble.models):
                if model not in known:
                    raise ValueError(
                        f"ensembles[{i}].models[{j}]: unknown model {model!r} in ensemble "
                        f"{ensemble.name!r}; known models: {', '.join(known)}"
                    )
            params = validate_policy_params(ensemble.policy.name, ensemble.policy.params)
            behind_endpoints = {m.name for m in info.data["models"] if m.endpoint is not None}
            for deployment in params.referenced_deployments():
                if deployment not in known:
                    raise ValueError(
                        f"ensembles[{i}].policy.params: policy {ensemble.policy.name!r} calls "
                        f"the deployment {deployment!r}, which is not a model of this config; "
                        f"known models: {', '.join(known)}"
                    )
                if deployment in behind_endpoints:
                    raise ValueError(
                        f"ensembles[{i}].policy.params: policy {ensemble.policy.name!r} calls "
                        f"the deployment {deployment!r}, which is reached through its "
                        "endpoint and has no deployment"
                    )
        hosted = [e.policy.name for e in v if e.policy.hosted]
        twice = sorted({n for n in hosted if hosted.count(n) > 1})
        if twice:  # a coordinator finds a hosted policy by its name
            raise ValueError(f"policy hosted by more than one ensemble: {', '.join(twice)}")
        return v

    @model_validator(mode="after")
    def _colocated_models_have_no_deployments(self) -> AppConfig:
        if not self.serving.colocate_models:
            return self
        for i, m in enumerate(self.models):
            d = m.deployment
            if m.endpoint is None and (d.num_replicas != 1 or d.autoscaling is not None):
                raise ValueError(
                    f"models[{i}].deployment: with serving.colocate_models, model {m.name!r} "
                    "runs inside each coordinator replica: scale it with "
                    "serving.coordinator_replicas, not with replicas of its own"
                )
        kinds = {m.deployment.accelerator_type for m in self.models} - {None}
        if len(kinds) > 1:
            raise ValueError(
                f"serving.colocate_models: the models ask for different accelerator types "
                f"({', '.join(sorted(kinds))}) but run in one replica"
            )
        for i, e in enumerate(self.ensembles):
            params = validate_policy_params(e.policy.name, e.policy.params)
            for deployment in params.referenced_deployments():
                raise ValueError(
                    f"ensembles[{i}].policy.params: policy {e.policy.name!r} calls the "
                    f"deployment {deployment!r}, but with serving.colocate_models no model has "
                    "a deployment; leave it out and the policy runs its model in the "
                    "coordinator's process"
                )
        return self

    @property
    def default_ensemble(self) -> EnsembleSpec:
        """The ensemble a request gets when it names none: the first one."""
        return self.ensembles[0]

    def ensemble(self, name: str | None) -> EnsembleSpec:
        """The ensemble called `name` (None: the default); NotFound names the known ones."""
        if name is None:
            return self.default_ensemble
        for ensemble in self.ensembles:
            if ensemble.name == name:
                return ensemble
        known = ", ".join(e.name for e in self.ensembles)
        raise NotFound(f"unknown ensemble {name!r}; known ensembles: {known}")

    def model(self, name: str) -> ModelSpec:
        """The model called `name`; NotFound names the known ones."""
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.models)
        raise NotFound(f"unknown model {name!r}; known models: {known}")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _resolve_relative_paths(raw: object, base: Path) -> object:
    """Make `models[*].path` relative to the config file's directory when it names one there."""
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        return raw
    models = []
    for m in raw["models"]:
        if isinstance(m, dict) and isinstance(m.get("path"), str):
            p = m["path"]
            if not p.startswith("zoo:") and not Path(p).is_absolute() and (base / p).exists():
                m = {**m, "path": str((base / p).resolve())}
        models.append(m)
    return {**raw, "models": models}


def parse_config(raw: object, source: str = "<config>") -> AppConfig:
    """Validate a config mapping (as read from YAML); ConfigError names the source and fields."""
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | Path) -> AppConfig:
    """Read and validate a YAML config file. Errors are `ConfigError`s that name the file and,
    for invalid values, each offending field (e.g. `ensembles.0.models: ...`).

    Relative model paths are taken relative to the file's directory when they exist there.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {path} must be a mapping with keys models, ensembles, serving; "
            f"got {type(raw).__name__}"
        )
    return parse_config(_resolve_relative_paths(raw, path.parent), source=str(path))
