"""Helpers of the serving tests: constants, media makers, a short-trained model, a local index,
the in-process API server (uvicorn + Serve's local testing mode) and request helpers."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import requests

REGISTERED = "serve-test"
TOKEN = "test-token-0123456789abcdef"
TRAIN_STEPS = 100  # colour is learned by ~25 steps, size by ~125 (measured); tests assert colour

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def png(width: int = 48, height: int = 40, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def mp4(frames: int, fps: int = 8, size: int = 32) -> bytes:
    from PIL import Image

    from pipelines.data.write.media import encode_mp4

    return encode_mp4([Image.new("RGB", (size, size), (10 * (i % 20), 80, 160)) for i in range(frames)], fps)


def train_quick_model(out: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """The `tiny` twin trained contrastively on rendered ShapesWorld images + captions (plain torch:
    ~10 s here vs ~90 s for a Ray Train run); the other towers stay at their initialisation."""
    import torch

    from models.binding import BindingModel
    from models.checkpoint import save_model
    from models.config import ModelConfig
    from models.decode import normalize_pixels, tokenize
    from models.losses import ContrastiveLoss
    from pipelines.data.write import shapesworld

    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny").tiny_twin()
    scenes = [shapesworld.make_scene(1000 + seed, i) for i in range(384)]
    size = config.inputs.image_size
    images = np.stack([normalize_pixels(np.asarray(shapesworld.render_frame(s, 0.5, size).convert("RGB")))
                       for s in scenes])
    data = {"image": torch.as_tensor(images), "text": torch.as_tensor(tokenize([s.caption for s in scenes],
                                                                              config.inputs.context_length))}
    model, loss_fn = BindingModel(config), ContrastiveLoss()
    optim = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    for _ in range(steps):
        pick = torch.randint(0, len(scenes), (64,))
        loss = loss_fn(model({m: x[pick] for m, x in data.items()})).total
        optim.zero_grad()
        loss.backward()
        optim.step()
        model.clamp_logit_scale_()
    return save_model(model.eval(), out)


def write_local_index(model_dir: Path, out: Path, count: int = 24) -> Path:
    """An index in the `raybind index build` format, written without Ray: the job's own actor
    (pipelines.eval.index.IndexEmbedder) on locally decoded ShapesWorld samples, for the in-process tests."""
    import json

    import pyarrow.parquet as pq

    from models.checkpoint import load_model
    from models.decode import decode_sample, stack_samples
    from pipelines.data.write import shapesworld
    from pipelines.eval.index import FORMAT, META_FILE, IndexEmbedder

    spec = load_model(model_dir).config.inputs
    mods = ("image", "text", "audio", "video")
    attrs = tuple(shapesworld.ATTRIBUTES)
    rows = []
    for i in range(count):
        members = shapesworld.render_sample(shapesworld.make_scene(0, i), shapesworld.MediaSpec(), f"{i:09d}")
        rows.append(decode_sample(members, mods, spec, label_fields=attrs, key=f"{i:09d}").sample)
    actor = IndexEmbedder(str(model_dir), mods, attrs, [(0, "local", "local")])
    table = actor(stack_samples(rows, mods, spec, attrs))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "part-0.parquet")
    (out / META_FILE).write_text(json.dumps({"format": FORMAT, "model_name": model_dir.name, "model_version": "",
                                             "embed_dim": 64, "rows": {}}))
    return out


def set_local_replica_context():
    """Serve's local testing mode does not set the replica context yet (ray-project/ray#48477 lists
    it as a follow-up), and `@serve.batch` reads it when a batch queue starts. Set the context
    Serve itself would set in a replica; reset by the caller."""
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.context import ReplicaRank

    context._set_internal_replica_context(
        replica_id=ReplicaID("local", DeploymentID("Embedder", "local")), servable_object=None,
        _deployment_config=DeploymentConfig(max_ongoing_requests=256),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0), world_size=1)


class LocalServer:
    """The gateway's FastAPI app on 127.0.0.1 (uvicorn in a thread) over local-mode Serve handles."""

    def __init__(self, embedder_config: dict, searcher_config: dict, gateway_config: dict):
        import uvicorn
        from ray import serve

        from serving.api import Services, build_api
        from serving.auth import load_token
        from serving.embedder import Embedder
        from serving.metrics import RequestMetrics
        from serving.searcher import Searcher
        from serving.settings import GatewayConfig

        set_local_replica_context()
        self.embedder = serve.run(Embedder.options(user_config=embedder_config).bind(), name="local-embedder",
                                  _local_testing_mode=True)
        self.searcher = serve.run(Searcher.options(user_config=searcher_config).bind(), name="local-searcher",
                                  _local_testing_mode=True)
        cfg = GatewayConfig.model_validate(gateway_config)
        services = Services(self.embedder, self.searcher, cfg, load_token(cfg.token_file, cfg.token_env),
                            RequestMetrics())
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_api(services), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Local testing mode starts `reconfigure` (the model load) without waiting for it, where a
        replica would not report ready before it finished: wait on /readyz like a client would."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if requests.get(self.url + "/readyz", timeout=10).status_code == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"in-process API not ready: {requests.get(self.url + '/readyz').text}")

    def close(self) -> None:
        from ray.serve import context

        self.server.should_exit = True
        self.thread.join(timeout=10)
        context._INTERNAL_REPLICA_CONTEXT = None


def post(url: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers = {**auth(token), **headers}
    return requests.post(url + path, headers=headers, timeout=60, **kwargs)
