"""`raybind index build`: embed a shard data set with a registered model into a search index.

    build_index("models:/raybind-shapesworld@champion", ".raybind/data/shapesworld", ".raybind/index/shapesworld")

Ray Data batch inference: `read_shards` decodes the shards (the reader's tasks), `map_batches`
with a fixed actor pool (`concurrency=N`) loads the model once per actor and embeds every present
modality of each batch, and `write_parquet` writes one row per (sample, modality):
key, modality, embedding (float32 list, L2-normalised), caption, shard, url, labels (JSON).
`index.json` (written last: its presence marks a complete index) records the exact model version,
so serving can tell whether the index matches the model it serves (serving/index_store.py reads it).
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.checkpoint import load_model
from models.config import ModelConfig
from pipelines.core import storage, tracking, workspace
from pipelines.core.config import require
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read import ReaderConfig, load_index, read_shards, resolve_shards
from pipelines.registry.model_registry import check_reference, local_model_dir

FORMAT = "raybind-index/1"
META_FILE = "index.json"


@dataclass(frozen=True)
class IndexConfig:
    model: str = "models:/raybind-shapesworld@champion"  # models:/NAME@ALIAS, models:/NAME/VERSION, a folder
    data: str = ""  # "" = <work folder>/data/shapesworld
    out: str = ""  # "" = <work folder>/index/shapesworld
    modalities: tuple[str, ...] = ()  # () = every modality the model encodes
    split: str = ""  # "" = every sample
    batch_size: int = 64
    concurrency: int = 1  # embedding actors (each holds one copy of the model)
    num_cpus_per_actor: float = 1.0
    read_cpus_per_task: float = 0.5  # leaves CPU for the actors on a small machine
    overwrite: bool = False
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or the local store

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.concurrency >= 1, "concurrency", "must be >= 1")
        require(self.num_cpus_per_actor > 0 and self.read_cpus_per_task > 0, "num_cpus_per_actor",
                "CPU shares must be > 0")


# ----------------------------------------------------------------------------- inputs
def resolve_model(model: str, tracking_uri: str) -> tuple[str, str, str, str]:
    """(local model folder, name, version, uri of that exact version); aliases are pinned first so
    the index records the version whose weights it was built with."""

    if not model.startswith("models:/"):
        folder = local_model_dir(model)
        return folder, folder.rstrip("/").rsplit("/", 1)[-1], "", model
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    check_reference(model)  # a clear "no alias X" instead of a registry stack trace
    ref = model[len("models:/"):]
    client = MlflowClient(tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None)
    if "@" in ref:
        name, _, alias = ref.partition("@")
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = ref.partition("/")
    pinned = f"models:/{name}/{version}"
    return local_model_dir(pinned, tracking_uri), name, version, pinned


def shard_ranges(data: str) -> list[tuple[int, str, str]]:
    """[(first global key, shard name, shard url)] in key order, from the folders' manifest /
    sizes.json: raybind keys are global sample indices in shard order (docs/architecture.md)."""

    ranges = []
    for shard in resolve_shards(data):
        folder = shard.url.rstrip("/").rsplit("/", 1)[0]
        index = load_index(folder)
        names, counts = index.get("names", []), index.get("counts", {})
        if shard.name not in names or any(counts.get(n) is None for n in names):
            return []  # counts unknown: the shard column stays empty rather than guessed
        first = sum(counts[n] for n in names[:names.index(shard.name)])
        ranges.append((first, shard.name, shard.url))
    return sorted(ranges)


def label_fields(data: str) -> tuple[str, ...]:
    """The data set's attribute names (manifest.json `attributes`), kept as each row's labels."""

    folder = resolve_shards(data)[0].url.rstrip("/").rsplit("/", 1)[0]
    fs, path = storage.filesystem(folder)
    try:
        with fs.open(f"{path}/manifest.json", "rb") as f:
            attributes = json.load(f).get("attributes", {})
    except (OSError, ValueError):
        return ()
    return tuple(attributes) if isinstance(attributes, dict) else ()


# ----------------------------------------------------------------------------- the actor
class IndexEmbedder:
    """A Ray Data actor: loads the model once, turns decoded batches into index rows."""

    def __init__(self, model_dir: str, modalities: tuple[str, ...], labels: tuple[str, ...],
                 ranges: list[tuple[int, str, str]], threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_dir).eval()
        self.modalities, self.labels = modalities, labels
        self.starts = [r[0] for r in ranges]
        self.ranges = ranges

    def locate(self, key: str) -> tuple[str, str]:
        """(shard name, url) of a key: the sample's own .json url if any, else a tar locator."""
        if not key.isdigit() or not self.ranges:
            return "", ""
        i = bisect.bisect_right(self.starts, int(key)) - 1
        return (self.ranges[i][1], f"{self.ranges[i][2]}#{key}") if i >= 0 else ("", "")

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        columns: dict[str, list] = {k: [] for k in ("key", "modality", "caption", "shard", "url", "labels")}
        vectors = []
        for modality in self.modalities:
            present = np.flatnonzero(batch[f"{modality}_mask"])
            if present.size == 0:
                continue
            with torch.inference_mode():
                emb = self.model.encode(modality, torch.as_tensor(np.ascontiguousarray(batch[modality][present])))
            vectors.append(emb.float().numpy())
            for i in present:
                key = str(batch["key"][i])
                shard, locator = self.locate(key)
                own_url = str(batch["url"][i]) if "url" in batch else ""
                columns["key"].append(key)
                columns["modality"].append(modality)
                columns["caption"].append(str(batch["caption"][i]))
                columns["shard"].append(shard)
                columns["url"].append(own_url or locator)
                columns["labels"].append(json.dumps({f: str(batch[f][i]) for f in self.labels if batch[f][i]}))
        dim = self.model.embed_dim
        flat = np.concatenate(vectors).reshape(-1) if vectors else np.zeros(0, np.float32)
        table = {k: pa.array(v, pa.string()) for k, v in columns.items()}
        table["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
        return pa.table(table)


# ----------------------------------------------------------------------------- the job
def prepare_out(out: str, overwrite: bool) -> None:
    fs, path = storage.filesystem(out)
    if fs.exists(f"{path}/{META_FILE}") and not overwrite:
        raise FileExistsError(f"{out}: an index exists there; pass --overwrite to replace it")
    if fs.exists(path):
        for old in fs.glob(f"{path}/*.parquet") + [f"{path}/{META_FILE}"]:
            if fs.exists(old):
                fs.rm(old)
    fs.makedirs(path, exist_ok=True)


def count_rows(out: str) -> dict[str, int]:
    import pyarrow.dataset as pads

    fs = storage.pyarrow_filesystem(out)
    path = out[len("s3://"):] if out.startswith("s3://") else storage.filesystem(out)[1]
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["modality"])
    values, counts = np.unique(np.asarray(table.column("modality").to_pylist(), dtype=object), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts, strict=True)}


def build_index(model: str, data: str, out: str, modalities: tuple[str, ...] = (), split: str = "",
                batch_size: int = 64, concurrency: int = 1, num_cpus_per_actor: float = 1.0,
                read_cpus_per_task: float = 0.5, overwrite: bool = False, tracking_uri: str = "") -> dict:
    """Embed every sample of `data` (or of `split`) with `model` into a Parquet index at `out`."""

    start = time.perf_counter()
    folder, name, version, pinned = resolve_model(model, tracking_uri)
    config = ModelConfig.from_file(f"{folder}/config.json")
    mods = tuple(m for m in (modalities or config.modalities) if m in config.modalities)
    require(bool(mods), "modalities", f"none of {list(modalities)} is encoded by {model} ({list(config.modalities)})")
    prepare_out(out, overwrite)
    labels = label_fields(data)
    ensure_ray()
    reader = ReaderConfig(modalities=mods, split=split or None, shuffle_shards=False, shuffle_window=0,
                          label_fields=(*labels, "url"), num_cpus_per_task=read_cpus_per_task)
    ds = read_shards(data, config=reader, spec=config.inputs)
    ds = ds.map_batches(IndexEmbedder, batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus_per_actor,
                        batch_format="numpy", fn_constructor_kwargs={
                            "model_dir": folder, "modalities": mods, "labels": labels,
                            "ranges": shard_ranges(data), "threads": int(num_cpus_per_actor)})
    ds.write_parquet(out if not out.startswith("s3://") else out[len("s3://"):],
                     filesystem=storage.pyarrow_filesystem(out))
    rows = count_rows(out)
    meta = {"format": FORMAT, "model_uri": pinned, "model_name": name, "model_version": version,
            "requested_model": model, "embed_dim": config.embed_dim, "modalities": list(mods), "rows": rows,
            "data": data, "split": split, "label_fields": list(labels),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "created_by": "raybind index build"}
    fs, path = storage.filesystem(out)
    with fs.open(f"{path}/{META_FILE}", "w") as f:
        json.dump(meta, f, indent=1)
    return {"job": "index build", "out": out, "model": pinned, "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def run_index_build(cfg: IndexConfig) -> dict[str, Any]:
    """The CLI job (`raybind index build`): defaults under the work folder, tracking as every job."""

    uri = tracking.resolve_uri(tracking.TrackingConfig(tracking_uri=cfg.tracking_uri))
    data = cfg.data or str(workspace.home() / "data" / "shapesworld")
    out = cfg.out or str(workspace.home() / "index" / "shapesworld")
    summary = build_index(cfg.model, data, out, cfg.modalities, cfg.split, cfg.batch_size, cfg.concurrency,
                          cfg.num_cpus_per_actor, cfg.read_cpus_per_task, cfg.overwrite, uri)
    return {**summary, "tracking_uri": uri, "serve_with": f"searcher user_config index_path: {out}"}
