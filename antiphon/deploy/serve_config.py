"""A standard Ray Serve config file for an antiphon config: what `antiphon build` writes and
`serve deploy` / `serve run` (and KubeRay's RayService `serveConfigV2`) take unchanged.

    file = serve_config(load_config("antiphon.yaml"))
    # {"proxy_location": ..., "http_options": {...},
    #  "applications": [{"name": "antiphon", "route_prefix": "/",
    #                    "import_path": "antiphon.deploy.app:app_builder",
    #                    "args": {"config": {...the antiphon config itself...}}}]}

The antiphon config goes inline (as the fields it set, nothing defaulted added), so the file
stands alone: a cluster node needs antiphon installed, not the YAML next to it. The file is
checked against Serve's own schema (`ServeDeploySchema`) before it is returned. An API key
written in the config would be copied into the file: it is refused, `serving.api_key_env`
names the environment variable the ingress reads it from instead.
"""

from __future__ import annotations

from typing import Any

from ray.serve.schema import ServeDeploySchema

from antiphon.deploy.config import AppConfig
from antiphon.errors import ConfigError

APP_BUILDER = "antiphon.deploy.app:app_builder"


def serve_config(
    config: AppConfig, *, app_name: str = "antiphon", route_prefix: str = "/"
) -> dict[str, Any]:
    """The Serve config file (as a mapping) deploying `config` as application `app_name`."""
    if config.serving.api_key is not None:
        raise ConfigError(
            "serving.api_key would be written into the Serve config file in clear; set "
            "serving.api_key_env (the name of an environment variable holding the key) instead"
        )
    file = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.serving.host, "port": config.serving.port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": APP_BUILDER,
                "args": {"config": config.model_dump(mode="json", exclude_unset=True)},
            }
        ],
    }
    ServeDeploySchema.model_validate(file)  # what `serve deploy` checks, checked here first
    return file
