"""`raybind serve --config serving/config.yaml`: deploy the Serve config file on a local (loopback)
or existing Ray cluster, wait until it runs, print the URL and how to call it.

The file is deployed declaratively, exactly as `serve deploy` / `serve run CONFIG` do (Serve's own
CLI goes through the same `serve_start` + `deploy_apps`), so deploying it again with only a
changed `user_config` (a new model alias) reconfigures the running replicas in place.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import yaml

from serving.auth import check_token_file
from serving.settings import AppArgs

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
READY_TIMEOUT_S = 300.0


class ServeDeployError(RuntimeError):
    """An application did not reach RUNNING (the message carries Serve's reason, e.g. no token)."""


DEFAULT_HOME = ".raybind"


def work_home() -> Path:
    """The work folder (`.raybind/` or $RAYBIND_HOME), as pipelines/core/workspace.py defines it."""
    return Path(os.environ.get("RAYBIND_HOME", DEFAULT_HOME)).resolve()


def in_work_home(path: str) -> str:
    """A config file's path made absolute: relative paths name files in the work folder (where
    `raybind index build` and the demo write), whatever the current folder. A leading `.raybind/`
    names the default work folder, so it follows $RAYBIND_HOME as well."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given.resolve())
    parts = given.parts
    if parts and parts[0] == DEFAULT_HOME:
        given = Path(*parts[1:]) if len(parts) > 1 else Path()
    return str((work_home() / given).resolve())


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_home() / 'mlflow' / 'mlflow.db'}"


def ensure_token_file(gateway: dict) -> str:
    """Where the token comes from. Without a token file or variable, one is generated into
    <work folder>/serve/token (mode 0600), so a fresh `raybind serve` is protected, not open.
    A token file that group or others can read is refused here, before anything starts."""
    env = gateway.get("token_env", "RAYBIND_SERVE_TOKEN")
    if gateway.get("token_file"):
        gateway["token_file"] = in_work_home(gateway["token_file"])
        check_token_file(Path(gateway["token_file"]))
        return f"file {gateway['token_file']}"
    if os.environ.get(env):
        return f"${env}"
    path = work_home() / "serve" / "token"
    if path.is_file():
        check_token_file(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    gateway["token_file"] = str(path)
    return f"file {path} (generated)"


def localize(config: dict) -> dict[str, str]:
    """Absolute paths and a concrete tracking URI in every raybind application of the config
    (replicas do not share the caller's working directory or environment); relative paths resolve
    against the work folder (see `in_work_home`). Returns where each application's token comes from."""
    token_sources = {}
    for app in config.get("applications", []):
        if app.get("import_path") != "serving.app:build_app":
            continue
        args = app.setdefault("args", {})
        token_sources[app.get("name", "default")] = ensure_token_file(args.setdefault("gateway", {}))
        users = {dep.get("name"): dep["user_config"] for dep in app.get("deployments", []) if dep.get("user_config")}
        # A deployment's user_config replaces the builder's args section, so localize whichever is used.
        embedder = users.get("Embedder") or args.setdefault("embedder", {})
        searcher = users.get("Searcher") or args.setdefault("searcher", {})
        localize_embedder(embedder)
        localize_searcher(searcher)
        # Fail here, in one line naming the field, rather than later in a replica's log.
        AppArgs.model_validate({**args, "embedder": embedder, "searcher": searcher})
    return token_sources


def localize_embedder(user: dict) -> None:
    user["tracking_uri"] = user.get("tracking_uri") or default_tracking_uri()
    uri = user.get("model_uri", "")
    if uri and not uri.startswith("models:/") and "://" not in uri:
        user["model_uri"] = in_work_home(uri)


def localize_searcher(user: dict) -> None:
    path = user.get("index_path", "")
    if path and "://" not in path:
        user["index_path"] = in_work_home(path)


def start_ray() -> bool:
    """Join $RAY_ADDRESS / a running driver's Ray, or start a loopback-only local one. True when
    this process owns the cluster (then serving lasts only as long as this process)."""
    import ray

    if ray.is_initialized():
        return not os.environ.get("RAY_ADDRESS")
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway in-process cluster (see STACK-NOTES)
    ray.init(include_dashboard=False, logging_level="WARNING")
    return True


def wait_running(names: list[str], timeout: float = READY_TIMEOUT_S) -> dict[str, str]:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        apps = serve.status().applications
        states = {n: str(getattr(apps.get(n), "status", "NOT_STARTED")) for n in names}
        failed = {n: apps[n].message for n, s in states.items() if s.endswith("DEPLOY_FAILED")}
        if failed:
            raise ServeDeployError(f"deploy failed: {failed}")
        if all(s.endswith("RUNNING") for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout:.0f} s: {states}")
        time.sleep(1.0)


def deploy(config: dict) -> dict[str, str]:
    """Deploy a Serve config dict (already localized); returns {app name: status} once running."""
    from ray.serve._private import api as serve_private
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_private.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    return wait_running([app.name for app in schema.applications])


def docs_path(app: dict) -> str:
    """Where an application documents its API: the interactive page when the config turns it on,
    else the OpenAPI schema."""
    gateway = (app.get("args") or {}).get("gateway") or {}
    return "/docs" if gateway.get("interactive_docs") else "/openapi.json"


def usage(url: str, token_source: str, docs: str = "/openapi.json") -> str:
    token = f"$(cat {token_source.split()[1]})" if token_source.startswith("file") else token_source
    return "\n".join([
        f"raybind serving at {url}  (API docs: {url}{docs})",
        f"token: {token_source}",
        f'  curl -s {url}/v1/embed -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\',
        '       -d \'{"items": [{"modality": "text", "text": "a small red circle moving left"}]}\'',
        f'  curl -s {url}/v1/search -H "Authorization: Bearer {token}" -F text="a blue square" -F target=image -F k=5',
        f"  curl -s {url}/readyz"])


def serve_from_config(path: str, blocking: bool | None = None) -> dict[str, Any]:
    """Deploy `path` (a Serve config file), print how to call it; block while this process owns
    the Ray cluster (`blocking=None`), so the server lives until Ctrl-C."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    config.setdefault("http_options", {}).setdefault("host", "127.0.0.1")
    token_sources = localize(config)
    owns_cluster = start_ray()
    states = deploy(config)
    http = config["http_options"]
    urls = {app["name"]: f"http://{http['host']}:{http.get('port', 8000)}{app.get('route_prefix', '/').rstrip('/')}"
            for app in config["applications"]}
    docs = {app["name"]: docs_path(app) for app in config["applications"]}
    for name, url in urls.items():
        print(usage(url, token_sources.get(name, "$RAYBIND_SERVE_TOKEN"), docs[name]), flush=True)
    summary = {"job": "serve", "urls": urls, "docs": {n: u + docs[n] for n, u in urls.items()}, "status": states,
               "token": token_sources, "config": str(path)}
    if blocking if blocking is not None else owns_cluster:
        wait_for_interrupt()
    return summary


def wait_for_interrupt() -> None:
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
