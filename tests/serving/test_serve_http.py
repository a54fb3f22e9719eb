"""The real thing: `raybind index build` on ShapesWorld shards (Ray Data actors), then
serving/config.yaml deployed with `serve_from_config` (Serve proxy on 127.0.0.1, Gateway ->
Embedder / Searcher replicas), called over HTTP. Search quality, alias swap under load."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from serving_helpers import TOKEN, auth, b64, free_port, post

pytestmark = [pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> str:
    from pipelines.data.write.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("serving_shards") / "ds"
    synthesize(SynthConfig(out=str(out), samples=96, shard_size=32, seed=0))
    return str(out)


@pytest.fixture(scope="module")
def index(shards, registry, tmp_path_factory) -> tuple[str, dict]:
    from pipelines.eval.index import build_index

    out = str(tmp_path_factory.mktemp("serving_index") / "index")
    summary = build_index(registry["champion"], shards, out, batch_size=32, num_cpus_per_actor=0.5,
                          read_cpus_per_task=0.5, tracking_uri=registry["tracking_uri"])
    return out, summary


def serve_config(registry: dict, index_path: str, token_file: Path, port: int, **embedder) -> dict:
    """serving/config.yaml as shipped, pointed at the test registry / index, small CPU shares."""
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["gateway"]["token_file"] = str(token_file)
    for dep in app["deployments"]:
        dep["ray_actor_options"] = {"num_cpus": 0.1}
        if dep["name"] == "Embedder":
            dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)
            dep["user_config"].update({"model_uri": registry["champion"], "tracking_uri": registry["tracking_uri"],
                                       "refresh_s": 0, **embedder})
        if dep["name"] == "Searcher":
            dep["user_config"]["index_path"] = index_path
    return config


def deploy(config: dict, tmp_path: Path) -> dict:
    from serving.run import serve_from_config

    path = tmp_path / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return serve_from_config(str(path), blocking=False)


@pytest.fixture(scope="module")
def served(ray_cluster, registry, index, token_file, tmp_path_factory):
    from ray import serve

    port = free_port()
    summary = deploy(serve_config(registry, index[0], token_file, port), tmp_path_factory.mktemp("serve_configs"))
    yield {"url": summary["urls"]["raybind"], "index_path": index[0], "token_file": token_file, "port": port}
    serve.shutdown()


def redeploy(served: dict, registry: dict, tmp_path: Path, **embedder) -> dict:
    """The same config deployed again with other Embedder user_config values."""
    config = serve_config(registry, served["index_path"], served["token_file"], served["port"], **embedder)
    return deploy(config, tmp_path)


# ----------------------------------------------------------------------------- the index job
def test_index_build_from_shapesworld_shards(index, registry, model_dirs):
    import pyarrow.parquet as pq
    import torch

    from models.checkpoint import load_model
    from models.decode import tokenize

    out, summary = index
    assert summary["rows"] == {"image": 96, "text": 96, "audio": 96, "video": 96}
    meta = json.loads((Path(out) / "index.json").read_text())
    assert (meta["model_name"], meta["model_version"]) == (registry["name"], registry["versions"]["trained"])
    assert meta["model_uri"] == f"models:/{registry['name']}/{registry['versions']['trained']}"
    table = pq.ParquetDataset(sorted(str(p) for p in Path(out).glob("*.parquet"))).read()
    assert {"key", "modality", "embedding", "caption", "shard", "url", "labels"} <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["shard"] for r in rows} == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}
    first = next(r for r in rows if r["key"] == "000000040" and r["modality"] == "text")
    assert first["shard"] == "shard-000001.tar" and first["url"].endswith("shard-000001.tar#000000040")
    assert set(json.loads(first["labels"])) >= {"shape", "color", "size", "direction", "pitch", "rhythm"}
    model = load_model(model_dirs["trained"]).eval()  # the job's embedding = the library's
    with torch.no_grad():
        expected = model.encode("text", torch.as_tensor(tokenize([first["caption"]], 32)))[0].numpy()
    assert np.allclose(first["embedding"], expected, atol=1e-5)


# ----------------------------------------------------------------------------- over HTTP
def caption(color: str, shape: str, size: str) -> str:
    from pipelines.data.write import shapesworld

    attrs = {"shape": shape, "color": color, "size": size, "direction": "left",
             "pitch": shapesworld.PITCH_OF_COLOR[color], "rhythm": "steady"}
    return shapesworld.caption_for(attrs, False, np.random.default_rng(0))


def test_search_top_hit_has_the_captions_attributes(served):
    """The short-trained model reliably learns colour (text <-> image); the top image for a caption
    must show that colour. (Shape needs far longer training than a test can afford.)"""
    for color, shape, size in (("red", "circle", "large"), ("green", "square", "small"),
                               ("blue", "triangle", "large"), ("yellow", "cross", "small")):
        resp = post(served["url"], "/v1/search", json={"query": {"modality": "text", "text": caption(color, shape, size)},
                                                       "target": "image", "k": 5})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert "warning" not in body and body["index"]["rows"]["image"] == 96
        assert body["results"][0]["labels"]["color"] == color, (color, body["results"][0])
        # Locations inside the data set, not the server's paths to the shards or the index.
        assert all(hit["uri"] == f"{hit['shard']}#{hit['key']}" for hit in body["results"]), body["results"]
        assert served["index_path"] not in resp.text
        assert sum(hit["labels"]["color"] == color for hit in body["results"]) >= 4


def test_every_endpoint_over_the_serve_proxy(served, media, registry):
    url = served["url"]
    ready = requests.get(url + "/readyz", timeout=30).json()
    assert ready["ready"] and ready["index"]["matches_model"], ready
    assert requests.get(url + "/docs", timeout=30).status_code == 404  # off by default
    assert "/v1/embed" in requests.get(url + "/openapi.json", timeout=30).json()["paths"]
    info = requests.get(url + "/v1/model", headers=auth(), timeout=30).json()
    assert (info["version"], info["alias"]) == (registry["versions"]["trained"], "champion")
    items = [{"modality": "text", "text": "a red circle"}] + [{"modality": m, "data": b64(media[m])}
                                                              for m in ("image", "audio", "video")]
    resp = post(url, "/v1/embed", json={"items": items})
    assert resp.status_code == 200 and len(resp.json()["data"]) == 4, resp.text
    resp = post(url, "/v1/embed", files=[("video", ("v.mp4", media["video"], "video/mp4")), ("text", (None, "x"))])
    assert [d["modality"] for d in resp.json()["data"]] == ["video", "text"], resp.text
    for modality in ("image", "audio", "video"):
        resp = post(url, "/v1/zero-shot", json={"item": items[["image", "audio", "video"].index(modality) + 1],
                                                "labels": ["red", "green", "blue", "yellow"]})
        assert resp.status_code == 200 and len(resp.json()["labels"]) == 4, resp.text
    for target in ("text", "audio", "video"):
        resp = post(url, "/v1/search", files={"image": ("i.jpg", media["image"], "image/jpeg"),
                                              "target": (None, target), "k": (None, "3")})
        assert resp.status_code == 200 and len(resp.json()["results"]) == 3, resp.text


def test_auth_and_hostile_inputs_over_http(served, media):
    url = served["url"]
    body = {"items": [{"modality": "text", "text": "a red circle"}]}
    assert post(url, "/v1/embed", token=None, json=body).status_code == 401
    assert post(url, "/v1/embed", token="wrong-wrong-wrong-wrong", json=body).status_code == 401
    assert post(url, "/v1/embed", token=TOKEN, json=body).status_code == 200
    hostile = [{"data": "{" * 50_000, "headers": {"Content-Type": "application/json"}},
               {"json": {"items": [{"modality": "video", "data": b64(media["video"][: len(media["video"]) // 2])}]}},
               {"json": {"items": [{"modality": "audio", "data": b64(b"RIFF" + b"\xff" * 5000)}]}},
               {"json": {"items": [{"modality": "image", "data": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)}]}},
               {"data": b"\0" * 40_000_000, "headers": {"Content-Type": "application/json"}},
               {"data": "x", "headers": {"Content-Type": "application/xml"}}]
    for kwargs in hostile:
        resp = post(url, "/v1/embed", **kwargs)
        assert 400 <= resp.status_code < 500, resp.text
        assert "error" in resp.json()
    assert requests.get(url + "/readyz", timeout=30).json()["ready"]
    assert post(url, "/v1/embed", json=body).status_code == 200


def test_metrics_per_endpoint_and_modality_and_serves_own(served):
    text = requests.get(served["url"] + "/metrics", timeout=30).text
    assert 'raybind_requests_total{endpoint="/v1/embed",modality="text",status="200"}' in text
    assert 'raybind_requests_total{endpoint="/v1/search",modality="text",status="200"}' in text
    deadline = time.monotonic() + 60  # Ray's metrics agent exports on an interval
    while "ray_serve_num_http_requests" not in text and time.monotonic() < deadline:
        time.sleep(2)
        text = requests.get(served["url"] + "/metrics", timeout=30).text
    assert "ray_serve_num_http_requests" in text


def readme_example(kind: str) -> str:
    """The fenced block that follows `<!-- readme-example:KIND` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- readme-example:{kind}")
    fence = text.index("```", start)
    body = text.index("\n", fence) + 1
    return text[body:text.index("```", body)]


def test_readme_curl_and_requests_examples_work(served, shards, tmp_path):
    """The README's examples, run as written against the served app: a user's first calls work."""
    import os
    import subprocess
    import sys

    (tmp_path / ".raybind" / "data").mkdir(parents=True)
    (tmp_path / ".raybind" / "data" / "shapesworld").symlink_to(shards)
    env = {**os.environ, "RAYBIND_URL": served["url"], "RAYBIND_SERVE_TOKEN": TOKEN}
    bash = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example("bash")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert bash.returncode == 0, bash.stdout + bash.stderr
    decoder, rest, outputs = json.JSONDecoder(), bash.stdout, []
    for _ in range(6):  # six JSON bodies (curl adds no newline), then the metrics lines
        body, end = decoder.raw_decode(rest.lstrip())
        outputs.append(body)
        rest = rest.lstrip()[end:]
    assert outputs[0]["ready"] and len(outputs[1]["data"]) == 1, outputs[:2]
    assert [d["modality"] for d in outputs[2]["data"]] == ["image", "audio", "text"]
    assert len(outputs[3]["labels"]) == 4 and len(outputs[4]["results"]) == 5
    assert outputs[5]["alias"] == "champion" and "raybind_requests_total{" in rest
    py = subprocess.run([sys.executable, "-c", readme_example("python")], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert py.returncode == 0, py.stdout + py.stderr
    lines = py.stdout.strip().splitlines()
    assert lines[0].startswith("text . image =") and "probability" in lines[1] and len(lines) == 5, lines


# ----------------------------------------------------------------------------- model swaps
class Load:
    """Light concurrent load: 3 clients embedding text + image, recording statuses and versions."""

    def __init__(self, url: str, media: dict):
        self.url, self.media = url, media
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(3)]

    def run(self) -> None:
        body = {"items": [{"modality": "text", "text": "a small blue square"},
                          {"modality": "image", "data": b64(self.media["image"])}]}
        while not self.stop.is_set():
            try:
                resp = post(self.url, "/v1/embed", json=body)
                self.statuses.append(resp.status_code)
                self.versions.append(resp.json()["model"]["version"] if resp.ok else "")
            except requests.RequestException:
                self.statuses.append(-1)  # a dropped connection

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def wait_version(url: str, version: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = requests.get(url + "/v1/model", headers=auth(), timeout=30).json()
        if info["version"] == version:
            return info
        time.sleep(0.5)
    raise TimeoutError(f"still serving {info['version']}, expected {version}: {info}")


def test_alias_swap_without_dropping_requests(served, registry, media, tmp_path):
    """Redeploying the config with another alias reconfigures the running Embedder in place; with
    refresh_s the Embedder also follows an alias moved in the registry. No request fails."""
    from mlflow.tracking import MlflowClient

    url, versions = served["url"], registry["versions"]
    client = MlflowClient(registry["tracking_uri"])
    first = requests.get(url + "/v1/model", headers=auth(), timeout=30).json()
    try:
        with Load(url, media) as load:
            redeploy(served, registry, tmp_path, model_uri=registry["candidate"])
            swapped = wait_version(url, versions["other"])
            time.sleep(1)
            redeploy(served, registry, tmp_path, refresh_s=0.5)
            wait_version(url, versions["trained"])
            client.set_registered_model_alias(registry["name"], "champion", versions["other"])
            wait_version(url, versions["other"])  # followed the registry, no redeploy
            time.sleep(1)
    finally:
        client.set_registered_model_alias(registry["name"], "champion", versions["trained"])
    wait_version(url, versions["trained"])
    # Same replica, next generation: reconfigured in place (a restarted replica starts at 1 again).
    assert swapped["generation"] == first["generation"] + 1 and swapped["alias"] == "candidate"
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    assert {versions["trained"], versions["other"]} <= set(load.versions)
