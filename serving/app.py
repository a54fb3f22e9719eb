"""The Serve application: Gateway (FastAPI ingress) -> Embedder (model, dynamic batching) and
Searcher (index). `build_app(args)` is the application builder named by `import_path` in
serving/config.yaml (`serving.app:build_app`), for `raybind serve` and `serve deploy` alike.

Where settings live, and why: the model and index are the Embedder's / Searcher's `user_config`
(set under `deployments:` in the config file), so changing the alias and redeploying reconfigures
the running replicas in place; `args` (gateway auth and limits) are part of Serve's code version,
so changing them restarts the replicas (a rolling update).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.api import Services, build_api
from serving.auth import load_token
from serving.embedder import Embedder
from serving.metrics import RequestMetrics
from serving.searcher import Searcher
from serving.settings import AppArgs, GatewayConfig


@serve.deployment(name="Gateway", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Gateway:
    """The HTTP ingress. Fails to start without a usable token: it never serves unauthenticated."""

    def __init__(self, embedder: DeploymentHandle, searcher: DeploymentHandle, config: dict[str, Any]):
        cfg = GatewayConfig.model_validate(config)
        self._services = Services(embedder, searcher, cfg, load_token(cfg.token_file, cfg.token_env),
                                  RequestMetrics())

    def __serve_build_asgi_app__(self):
        return build_api(self._services)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder; `args` follow `serving.settings.AppArgs`. The `embedder` and
    `searcher` sections are defaults that a config file's `deployments[].user_config` replaces."""
    cfg = AppArgs.model_validate(args or {})
    embedder = Embedder.options(user_config=cfg.embedder.model_dump()).bind()
    searcher = Searcher.options(user_config=cfg.searcher.model_dump()).bind()
    return Gateway.bind(embedder, searcher, cfg.gateway.model_dump())
