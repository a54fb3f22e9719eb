"""Point a running Serve application at a new champion and index: only `user_config` changes, through
the dashboard's REST API, so replicas reload in place without a redeploy."""

from __future__ import annotations

import json
import time

from pipelines.ops.jobs import target
from pipelines.ops.night_records import note
from pipelines.ops.nightly_config import NightlyConfig


# ----------------------------------------------------------------------------- Serve
def retarget_serve_config(app_config: dict, model_uri: str, index_path: str) -> dict:
    """A copy of a deployed raybind application's config that serves `model_uri` and `index_path`.
    Only the deployments' user_config changes, so Serve reconfigures the running replicas in place
    (no restart); the old model keeps answering until the new one is loaded."""
    new = json.loads(json.dumps(app_config))
    deployments = {d.get("name"): d for d in new.setdefault("deployments", [])}
    for name, key, value in (("Embedder", "model_uri", model_uri), ("Searcher", "index_path", index_path)):
        if not value:
            continue
        dep = deployments.get(name)
        if dep is None:
            dep = {"name": name}
            new["deployments"].append(dep)
        dep["user_config"] = {**(dep.get("user_config") or {}), key: value}
    return new


def serve_request(url: str, headers: dict[str, str], method: str = "GET", body: dict | None = None) -> dict:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**headers, **({"Content-Type": "application/json"} if data else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip() else {}


def reconfigure_serve(cfg: NightlyConfig, run_id: str, model_uri: str, index_path: str) -> str:
    """Point the running Serve app (if any) at the new champion through the dashboard's REST API,
    exactly what `serve deploy` does; wait until it is RUNNING again. Returns what happened."""

    try:
        url, headers, _ = target(cfg.serve.dashboard_url)
        details = serve_request(f"{url}/api/serve/applications/", headers)
    except (OSError, ValueError, RuntimeError) as exc:
        return skip_serve(run_id, f"no Ray dashboard to ask ({exc})")
    apps = details.get("applications") or {}
    app = apps.get(cfg.serve.app)
    if app is None or not app.get("deployed_app_config"):
        return skip_serve(run_id, f"no declaratively deployed Serve app {cfg.serve.app!r} running "
                                  f"(apps: {sorted(apps) or 'none'})")
    configs = [retarget_serve_config(a["deployed_app_config"], model_uri, index_path) if name == cfg.serve.app
               else a["deployed_app_config"] for name, a in apps.items() if a.get("deployed_app_config")]
    body = {"applications": configs, "proxy_location": details.get("proxy_location") or "HeadOnly",
            "http_options": details.get("http_options") or {}}
    serve_request(f"{url}/api/serve/applications/", headers, "PUT", body)
    deadline = time.monotonic() + cfg.serve.timeout_s
    while time.monotonic() < deadline:
        status = (serve_request(f"{url}/api/serve/applications/", headers).get("applications", {})
                  .get(cfg.serve.app, {}).get("status", ""))
        if status == "RUNNING":
            note(run_id, f"Serve app {cfg.serve.app!r} now serves {model_uri} (index {index_path or 'unchanged'})",
                 **{"raybind.nightly.serve": "reconfigured"})
            return "reconfigured"
        if status == "DEPLOY_FAILED":
            break
        time.sleep(2)
    note(run_id, f"Serve app {cfg.serve.app!r} did not come back RUNNING (last status {status!r})",
         **{"raybind.nightly.serve": f"failed: {status}"})
    return f"failed: {status}"


def skip_serve(run_id: str, why: str) -> str:
    note(run_id, f"serve: skipped, {why}", **{"raybind.nightly.serve": "skipped"})
    return "skipped"


