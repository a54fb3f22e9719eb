"""Load on the serving stack, on loopback only, bounded in count and time.

    python benchmarks/serve_load.py [--quick]

1. Dynamic batching: 32 concurrent clients embed one text each against the `tiny` model, first
   with the Embedder's text batching on (max_batch_size 64), then the SAME deployment reconfigured
   in place to max_batch_size 1; requests/s and p50 / p99 latency for both. The same pair again
   with the `small` model swapped in (a user_config change): where the model's own cost is larger.
2. 5,000 mixed requests over every endpoint and modality (JSON and multipart): counts per status
   class and dropped connections (target: zero 5xx, zero dropped).
3. A hostile / malformed suite (>= 40 requests): every answer must be 4xx, and the deployment must
   be healthy afterwards (same replicas, /readyz ready, a valid request answered).

Everything runs in a throwaway work folder: a local sqlite MLflow store with the tiny model
registered, 256 ShapesWorld samples, their index, Serve on 127.0.0.1. Writes
benchmarks/results/serve_load.json and .md. The client runs on the same 2 cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TOKEN = "bench-token-" + "x" * 24
MODEL = "bench-tiny"
SMALL = "bench-small"
CAPTIONS = ["a small red circle moving left", "a large blue square drifting up with a low hum",
            "a green triangle heading right", "a yellow cross sliding down, you hear a chirp"]


# ----------------------------------------------------------------------------- setup
def prepare(work: Path, samples: int) -> dict[str, str]:
    """Register the tiny model in a local MLflow store, write shards, build their index."""
    import mlflow
    import torch

    from models.binding import BindingModel
    from models.checkpoint import save_model
    from models.config import ModelConfig
    from pipelines.data.write.synth import SynthConfig, synthesize
    from pipelines.eval.index import build_index
    from pipelines.registry.model_registry import register_model

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("serve-load")
    torch.manual_seed(0)
    for name, size in ((MODEL, "tiny"), (SMALL, "small")):
        model_dir = save_model(BindingModel(ModelConfig.from_name(size)).eval(), work / size)
        with mlflow.start_run() as run:
            register_model(str(model_dir), name, run.info.run_id)
    synthesize(SynthConfig(out=str(work / "data"), samples=samples, shard_size=64))
    build_index(f"models:/{MODEL}@champion", str(work / "data"), str(work / "index"), tracking_uri=uri)
    (work / "token").write_text(TOKEN)
    (work / "token").chmod(0o600)  # the Gateway refuses a token file others can read
    return {"tracking_uri": uri, "index": str(work / "index"), "token_file": str(work / "token"),
            "data": str(work / "data")}


def serve_config(setup: dict, port: int, text_batch: int, model: str = MODEL) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["gateway"]["token_file"] = setup["token_file"]
    for dep in app["deployments"]:
        if dep["name"] == "Embedder":
            dep.pop("autoscaling_config")  # one fixed replica: both runs measure the same deployment
            dep["num_replicas"] = 1
            dep["user_config"].update(model_uri=f"models:/{model}@champion", tracking_uri=setup["tracking_uri"],
                                      refresh_s=0)
            dep["user_config"]["batching"]["text"]["max_batch_size"] = text_batch
        if dep["name"] == "Searcher":
            dep["user_config"]["index_path"] = setup["index"]
    return config


def deploy(config: dict, work: Path) -> str:
    import yaml

    from serving.run import serve_from_config

    path = work / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return serve_from_config(str(path), blocking=False)["urls"]["raybind"]


def sample_media(data: str) -> dict[str, bytes]:
    from pipelines.data.write import shapesworld

    sample = shapesworld.render_sample(shapesworld.make_scene(0, 3), shapesworld.MediaSpec(), "000000003")
    return {"image": sample["jpg"], "audio": sample["wav"], "video": sample["mp4"]}


# ----------------------------------------------------------------------------- the client
def form(parts: list[tuple[str, Any, str | None]]):
    import aiohttp

    data = aiohttp.FormData()
    for name, value, filename in parts:
        data.add_field(name, value, filename=filename)
    return data


async def send(session, url: str, spec: dict) -> tuple[int, float]:
    """One request; status -1 = connection dropped / reset / timed out."""
    import aiohttp

    kwargs = {k: v for k, v in spec.items() if k in ("json", "data", "headers")}
    if "form" in spec:
        kwargs["data"] = form(spec["form"])
    headers = {"Authorization": f"Bearer {TOKEN}"} if spec.get("auth", True) else {}
    kwargs["headers"] = {**headers, **kwargs.get("headers", {})}
    start = time.perf_counter()
    try:
        async with session.request(spec.get("method", "POST"), url + spec["path"], **kwargs) as resp:
            await resp.read()
            return resp.status, time.perf_counter() - start
    except (TimeoutError, aiohttp.ClientError):
        return -1, time.perf_counter() - start


async def run_load(url: str, specs: list[dict], concurrency: int, total: int, max_seconds: float) -> dict:
    """`concurrency` clients take specs in turn until `total` are sent or time is up."""
    import aiohttp

    results: list[tuple[int, float]] = []
    next_index = 0
    deadline = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(session) -> None:
        nonlocal next_index
        while next_index < total and time.monotonic() < deadline:
            spec = specs[next_index % len(specs)]
            next_index += 1
            results.append(await send(session, url, spec))

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[tuple[int, float]], seconds: float) -> dict:
    statuses = np.asarray([s for s, _ in results])
    ok = np.asarray([lat for s, lat in results if 200 <= s < 300]) * 1000
    return {"requests": len(results), "seconds": round(seconds, 2), "rps": round(len(results) / seconds, 1),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok.size else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok.size else None,
            "2xx": int(((statuses >= 200) & (statuses < 300)).sum()), "4xx": int(((statuses >= 400) & (statuses < 500)).sum()),
            "5xx": int((statuses >= 500).sum()), "dropped": int((statuses == -1).sum())}


# ----------------------------------------------------------------------------- CPU accounting
PROCESS_GROUPS = (("ServeReplica:raybind:Gateway", "gateway"), ("ServeReplica:raybind:Embedder", "embedder"),
                  ("ServeReplica:raybind:Searcher", "searcher"), ("ProxyActor", "proxy"),
                  ("ServeController", "serve controller"), ("raylet", "raylet"), ("gcs_server", "gcs"),
                  ("log_monitor", "log monitor"), ("dashboard", "dashboard + agent"))


def cpu_seconds_by_group() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the load client: `client`) and its
    descendants (the local Ray cluster it started: GCS, raylet, Serve proxy and replicas), by role,
    from /proc. Other jobs on the shared machine are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(pid)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)
    ours, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    out: dict[str, float] = {}
    for pid in ours:
        _, cmd, seconds = procs.get(pid, (0, "", 0.0))
        group = "client" if pid == os.getpid() else next(
            (name for key, name in PROCESS_GROUPS if key in cmd),
            "other ray processes")
        out[group] = out.get(group, 0.0) + seconds
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    diff = {g: (after.get(g, 0.0) - before.get(g, 0.0)) * 1000 / max(requests, 1) for g in after}
    ranked = sorted(((g, round(v, 2)) for g, v in diff.items() if v >= 0.05), key=lambda kv: -kv[1])
    return {**dict(ranked), "total": round(sum(diff.values()), 2)}


# ----------------------------------------------------------------------------- request sets
def text_specs() -> list[dict]:
    return [{"path": "/v1/embed", "json": {"items": [{"modality": "text", "text": c}]}} for c in CAPTIONS]


def mixed_specs(media: dict[str, bytes]) -> list[dict]:
    """Every endpoint x modality, JSON and multipart."""
    b64 = {m: base64.b64encode(v).decode() for m, v in media.items()}
    item = {"text": {"modality": "text", "text": CAPTIONS[1]}}
    item.update({m: {"modality": m, "data": b64[m]} for m in b64})
    files = {"image": ("f.jpg", media["image"]), "audio": ("a.wav", media["audio"]), "video": ("v.mp4", media["video"])}
    labels = ["red", "green", "blue", "yellow"]
    specs = [{"path": "/v1/embed", "json": {"items": [item[m]]}} for m in item]
    specs.append({"path": "/v1/embed", "json": {"items": list(item.values())}})
    specs += [{"path": "/v1/embed", "form": [(m, v, fn)]} for m, (fn, v) in files.items()]
    specs.append({"path": "/v1/embed", "form": [("text", CAPTIONS[0], None)]})
    specs += [{"path": "/v1/zero-shot", "json": {"item": item[m], "labels": labels, "template": "a {} shape"}}
              for m in item]
    specs += [{"path": "/v1/zero-shot", "form": [(m, v, fn), *[("labels", lab, None) for lab in labels]]}
              for m, (fn, v) in files.items()]
    specs += [{"path": "/v1/search", "json": {"query": item[q], "target": t, "k": 5}}
              for q in item for t in ("image", "text", "audio", "video")]
    specs += [{"path": "/v1/search", "form": [("audio", files["audio"][1], "a.wav"), ("target", "video", None)]}]
    specs += [{"method": "GET", "path": p, "auth": p == "/v1/model"} for p in ("/v1/model", "/healthz", "/readyz")]
    return specs


# ----------------------------------------------------------------------------- hostile suite
def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's calling card)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def long_wav(seconds: float) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), np.int16), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_channels(channels: int) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((1600, channels), np.int16), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def long_mp4(seconds: int) -> bytes:
    from PIL import Image

    from pipelines.data.write.media import encode_mp4

    return encode_mp4([Image.new("RGB", (16, 16), (i % 255, 0, 0)) for i in range(seconds)], 1)


def hostile_specs(media: dict[str, bytes]) -> list[tuple[str, dict]]:
    """(name, request) pairs; every one must be answered 4xx."""
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    j = {"Content-Type": "application/json"}
    text = {"modality": "text", "text": "ok"}
    emb = lambda items: {"path": "/v1/embed", "json": {"items": items}}  # noqa: E731
    zs = lambda **kw: {"path": "/v1/zero-shot", "json": {"item": text, "labels": ["a", "b"], **kw}}  # noqa: E731
    se = lambda **kw: {"path": "/v1/search", "json": {"query": text, "target": "image", **kw}}  # noqa: E731
    raw = lambda body, headers=j: {"path": "/v1/embed", "data": body, "headers": headers}  # noqa: E731
    cases = [
        ("no token", {**emb([text]), "auth": False}), ("wrong token", {**emb([text]), "headers": {"Authorization": "Bearer nope-nope-nope-nope"}}),
        ("basic scheme", {**emb([text]), "headers": {"Authorization": f"Basic {TOKEN}"}}),
        ("model info without token", {"method": "GET", "path": "/v1/model", "auth": False}),
        ("empty body", raw(b"")), ("truncated json", raw(b'{"items": [')), ("json array", raw(b"[]")), ("json null", raw(b"null")),
        ("invalid utf-8", raw(b'{"items": "\xff\xfe"}')), ("deep nesting", raw(b"[" * 200_000 + b"]" * 200_000)),
        ("items null", {"path": "/v1/embed", "json": {"items": None}}), ("items string", {"path": "/v1/embed", "json": {"items": "x"}}),
        ("items empty", emb([])), ("unknown modality", emb([{"modality": "smell", "text": "x"}])),
        ("text not a string", emb([{"modality": "text", "text": 5}])), ("unknown top field", {"path": "/v1/embed", "json": {"items": [text], "x": 1}}),
        ("unknown item field", emb([{**text, "x": 1}])), ("image given text", emb([{"modality": "image", "text": "x"}])),
        ("text given data", emb([{"modality": "text", "text": "x", "data": "aGk="}])), ("base64 bad chars", emb([{"modality": "image", "data": "***"}])),
        ("base64 bad padding", emb([{"modality": "image", "data": "aGVsbG8"}])), ("data url without base64", emb([{"modality": "image", "data": "data:image/png,xyz"}])),
        ("path traversal format", emb([{"modality": "audio", "data": enc(media["audio"]), "format": "../../etc/passwd"}])),
        ("garbage image", emb([{"modality": "image", "data": enc(os.urandom(2000))}])), ("truncated jpeg", emb([{"modality": "image", "data": enc(media["image"][:200])}])),
        ("png bomb header 30000x30000", emb([{"modality": "image", "data": enc(bomb_png(30000, 30000))}])),
        ("wav with 64 channels", emb([{"modality": "audio", "data": enc(wav_channels(64))}])),
        ("garbage audio", emb([{"modality": "audio", "data": enc(b"RIFF" + os.urandom(3000))}])), ("audio 70 s", emb([{"modality": "audio", "data": enc(long_wav(70))}])),
        ("garbage video", emb([{"modality": "video", "data": enc(os.urandom(3000)), "format": "mp4"}])),
        ("truncated mp4", emb([{"modality": "video", "data": enc(media["video"][: len(media["video"]) // 3])}])),
        ("video 70 s", emb([{"modality": "video", "data": enc(long_mp4(70))}])), ("empty media", emb([{"modality": "video", "data": ""}])),
        ("33 items", emb([text] * 33)), ("item of 17 MB", emb([{"modality": "image", "data": enc(b"\0" * (17 * 2**20))}])),
        ("body of 33 MB", raw(b" " * (33 * 2**20))), ("text of 2001 chars", emb([{"modality": "text", "text": "x" * 2001}])),
        ("content-type text/plain", raw(b"{}", {"Content-Type": "text/plain"})), ("no content-type", raw(b"{}", {})),
        ("zero-shot no labels", zs(labels=[])), ("zero-shot duplicate labels", zs(labels=["a", "a"])), ("zero-shot blank label", zs(labels=[" "])),
        ("zero-shot template without slot", zs(template="no slot")), ("zero-shot 129 labels", zs(labels=[f"l{i}" for i in range(129)])),
        ("zero-shot label of 2001 chars", zs(labels=["x" * 2001])), ("search unknown target", se(target="smell")), ("search k 0", se(k=0)),
        ("search k 101", se(k=101)), ("search k text", se(k="ten")), ("search k 1e400", se(k=10**400)), ("search without query", {"path": "/v1/search", "json": {"target": "image"}}),
        ("multipart without parts", {"path": "/v1/embed", "form": [("other", "x", None)]}),
        ("multipart broken", raw(b"--b\r\nContent-Disposition: form-data; name=", {"Content-Type": "multipart/form-data; boundary=b"})),
        ("multipart image as a text field", {"path": "/v1/embed", "form": [("image", "not a file", None)]}),
        ("multipart search with two queries", {"path": "/v1/search", "form": [("text", "a", None), ("text", "b", None), ("target", "image", None)]}),
        ("PUT on embed", {"method": "PUT", "path": "/v1/embed", "json": {}}), ("unknown route", {"method": "GET", "path": "/v1/nothing"}),
    ]
    return cases


async def run_hostile(url: str, cases: list[tuple[str, dict]]) -> list[dict]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for name, spec in cases:
            status, seconds = await send(session, url, spec)
            out.append({"name": name, "status": status, "ms": round(seconds * 1000, 1), "ok": 400 <= status < 500})
    return out


# ----------------------------------------------------------------------------- the model alone
def model_only(size: str = "tiny") -> dict:
    """Text encode time per item at batch 1 vs 64 in-process (torch 1 thread, as the Embedder):
    the most batching can save per request; the rest of a request's cost is the HTTP path."""
    import torch

    from models.binding import BindingModel
    from models.config import ModelConfig
    from models.decode import tokenize

    torch.set_num_threads(1)
    model = BindingModel(ModelConfig.from_name(size)).eval()
    out = {}
    for batch, reps in ((1, 300), (64, 30)) if size == "tiny" else ((1, 60), (64, 4)):
        x = torch.as_tensor(tokenize((CAPTIONS * 16)[:batch], model.config.inputs.context_length))
        with torch.inference_mode():
            model.encode("text", x)
            start = time.perf_counter()
            for _ in range(reps):
                model.encode("text", x)
        out[f"batch_{batch}_ms_per_item"] = round((time.perf_counter() - start) * 1000 / (reps * batch), 3)
    return out


# ----------------------------------------------------------------------------- ANN vs exact
def ann_measurement(rows: int = 50_000, dim: int = 64, queries: int = 200) -> dict:
    """Exact scan vs faiss HNSW (the optional backend) on normalised random vectors: a hard case
    for a graph index (no cluster structure), so recall here is a floor, not a typical value."""
    from serving import index_store

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    qs = vectors[:queries] + 0.05 * rng.standard_normal((queries, dim)).astype(np.float32)
    part = index_store.ModalityIndex(vectors, [""] * rows, [], [], [], [])
    start = time.perf_counter()
    for q in qs:
        index_store.exact_top_k(vectors, q, 10)
    exact_ms = (time.perf_counter() - start) * 1000 / queries
    out = {"rows": rows, "dim": dim, "exact_ms_per_query": round(exact_ms, 3)}
    try:
        start = time.perf_counter()
        part.ann = index_store.build_hnsw(vectors, 32, 200, 128)
        out["hnsw_build_s"] = round(time.perf_counter() - start, 1)
    except ImportError:
        return {**out, "hnsw": "faiss-cpu not installed"}
    start = time.perf_counter()
    for q in qs:
        index_store.ann_top_k(part.ann, q, 10)
    out["hnsw_ms_per_query"] = round((time.perf_counter() - start) * 1000 / queries, 3)
    out["hnsw_recall_at_10"] = round(index_store.recall_at_k(part, qs, 10), 4)
    return out


# ----------------------------------------------------------------------------- orchestration
def model_info(url: str) -> dict:
    import requests

    return requests.get(url + "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()


def wait_batch_size(url: str, size: int, model: str = MODEL, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = model_info(url)
        if info["batching"]["text"]["max_batch_size"] == size and info.get("name") == model:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"never served {model} with text max_batch_size {size}: {info}")
        time.sleep(0.5)


def health(url: str, before: dict) -> dict:
    import requests
    from ray import serve

    after = model_info(url)
    deployments = serve.status().applications["raybind"].deployments
    ok = requests.post(url + "/v1/embed", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                       json={"items": [{"modality": "text", "text": "still here"}]}).status_code
    return {"readyz": requests.get(url + "/readyz", timeout=30).status_code, "valid_request": ok,
            "same_model_generation": after["generation"] == before["generation"],
            "deployments": {name: str(d.status) for name, d in deployments.items()}}


def batching_runs(url: str, setup: dict, work: Path, plan: dict, model: str = MODEL) -> dict:
    runs = {}
    for label, size in (("batching on (max_batch_size 64)", 64), ("batching off (max_batch_size 1)", 1)):
        deploy(serve_config(setup, plan["port"], size, model), work)  # same deployment, reconfigured in place
        wait_batch_size(url, size, model)
        asyncio.run(run_load(url, text_specs(), 32, 100, 60))  # warm-up
        before = cpu_seconds_by_group()
        runs[label] = asyncio.run(run_load(url, text_specs(), 32, plan["text_requests"], plan["text_seconds"]))
        runs[label]["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds_by_group(), runs[label]["requests"])
        print("batching", model, label, runs[label], flush=True)
    deploy(serve_config(setup, plan["port"], 64), work)
    wait_batch_size(url, 64)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run, not a measurement")
    args = parser.parse_args()
    plan = {"text_requests": 300 if args.quick else 3000, "text_seconds": 60 if args.quick else 120,
            "mixed_requests": 300 if args.quick else 5000, "mixed_seconds": 900, "samples": 64 if args.quick else 256}
    work = Path(tempfile.mkdtemp(prefix="raybind-serve-load-"))
    os.environ["RAYBIND_HOME"] = str(work / "home")
    from pipelines.core.ray_runtime import ensure_ray

    load_before = os.getloadavg()
    ensure_ray(num_cpus=2)
    setup = prepare(work, plan["samples"])
    plan["port"] = free_port()
    url = deploy(serve_config(setup, plan["port"], 64), work)
    runs = batching_runs(url, setup, work, plan)
    small_runs = batching_runs(url, setup, work, {**plan, "text_requests": plan["text_requests"] // 3}, SMALL)
    before = model_info(url)
    mixed = asyncio.run(run_load(url, mixed_specs(sample_media(setup["data"])), 16, plan["mixed_requests"],
                                 plan["mixed_seconds"]))
    print("mixed", mixed, flush=True)
    hostile = asyncio.run(run_hostile(url, hostile_specs(sample_media(setup["data"]))))
    after = health(url, before)
    print("hostile", sum(h["ok"] for h in hostile), "/", len(hostile), "4xx; health", after, flush=True)
    from ray import serve

    serve.shutdown()  # the ANN measurement gets the cores to itself
    ann = ann_measurement(rows=10_000 if args.quick else 50_000)
    alone = {"tiny": model_only("tiny"), "small": model_only("small")}
    print("ann", ann, "model alone", alone, flush=True)
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(load_before),
              "quick": args.quick, "plan": plan, "text_embed_32_clients": runs,
              "text_embed_32_clients_small": small_runs, "mixed": mixed,
              "mixed_kinds": len(mixed_specs(sample_media(setup["data"]))), "hostile": hostile, "health_after": after,
              "ann": ann, "model_alone": alone}
    write_results(report)
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(load_before: tuple[float, float, float]) -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def write_results(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "serve_load.md").write_text(markdown(report))


def markdown(r: dict) -> str:
    m = r["machine"]
    on, off = r["text_embed_32_clients"].values()
    ratio = on["rps"] / off["rps"] if off["rps"] else float("nan")
    hostile_ok = sum(h["ok"] for h in r["hostile"])
    lines = [
        "# Serving under load (`python benchmarks/serve_load.py`)", "",
        f"Measured {r['date']} on {m['cpus']} CPU cores ({m['cpu']}), Ray {m['ray']}, torch {m['torch']}; "
        f"load average {m['load_avg_before']} before, {m['load_avg_after']} after (cores shared with other jobs). "
        "Client (aiohttp) and server share the same cores, on 127.0.0.1. Model: `tiny` (untrained weights; "
        "speed does not depend on them), one Embedder replica (torch 1 thread), one Gateway, one Searcher.", "",
        "## Dynamic batching: 32 concurrent clients, one text each", "",
        "| run | requests | req/s | p50 ms | p99 ms | 5xx | dropped |", "|---|---|---|---|---|---|---|"]
    for name, run in r["text_embed_32_clients"].items():
        lines.append(f"| tiny: {name} | {run['requests']} | {run['rps']} | {run['p50_ms']} | {run['p99_ms']} | "
                     f"{run['5xx']} | {run['dropped']} |")
    small_on, small_off = r["text_embed_32_clients_small"].values()
    for name, run in r["text_embed_32_clients_small"].items():
        lines.append(f"| small: {name} | {run['requests']} | {run['rps']} | {run['p50_ms']} | {run['p99_ms']} | "
                     f"{run['5xx']} | {run['dropped']} |")
    small_ratio = small_on["rps"] / small_off["rps"] if small_off["rps"] else float("nan")
    lines += ["", "CPU time per request by process (ms; user + system, from /proc, during each run):", "",
              "| run | " + " | ".join(on["cpu_ms_per_request"]) + " |",
              "|---|" + "---|" * len(on["cpu_ms_per_request"])]
    for model, pair in (("tiny", r["text_embed_32_clients"]), ("small", r["text_embed_32_clients_small"])):
        for name, run in pair.items():
            lines.append(f"| {model}: {name} | " + " | ".join(str(run["cpu_ms_per_request"].get(g, 0.0))
                                                         for g in on["cpu_ms_per_request"]) + " |")
    mx = r["mixed"]
    lines += ["", f"Throughput ratio on/off, `tiny`: **{ratio:.2f}x** (target >= 3x); `small` (swapped in by "
              f"user_config): **{small_ratio:.2f}x**. Text encode per item, model alone (in-process, torch 1 "
              f"thread): {json.dumps(r['model_alone'])}.", "",
              f"## {mx['requests']} mixed requests ({r['mixed_kinds']} kinds: every endpoint and modality, JSON and "
              "multipart; 16 clients)", "",
              "| 2xx | 4xx | 5xx | dropped | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|",
              f"| {mx['2xx']} | {mx['4xx']} | {mx['5xx']} | {mx['dropped']} | {mx['rps']} | {mx['p50_ms']} | {mx['p99_ms']} |",
              "", f"## Hostile / malformed suite: {hostile_ok} of {len(r['hostile'])} answered 4xx", "",
              "| request | status | ms |", "|---|---|---|"]
    lines += [f"| {h['name']} | {h['status']} | {h['ms']} |" for h in r["hostile"]]
    lines += ["", f"Health after: {json.dumps(r['health_after'])}", "",
              "## Search backends (exact scan vs faiss HNSW, M 32, efSearch 128, one thread)", "",
              f"`{json.dumps(r['ann'])}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (as benchmarks/tuxpaint_retrieval.py): finalisers of Ray handles
    # can hang for minutes after the local cluster is gone; the results are written already.
    os._exit(code)
