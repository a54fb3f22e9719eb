"""The search index on the serving side: load a folder written by `raybind index build`
(pipelines/eval/index.py) and answer top-k queries per target modality.

Format ("raybind-index/1"): `*.parquet` files with columns key, modality, embedding (list of
float32, L2-normalised), caption, shard, url, labels (JSON object as a string), and `index.json`
with the model the embeddings came from. Exact search is one matrix-vector product and an
argpartition (O(N·D), ~1 ms per 100k x 64 rows here); `faiss-hnsw` is the optional ANN backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "raybind-index/1"
META_FILE = "index.json"


class IndexLoadError(RuntimeError):
    """The index folder is missing, empty or not in the expected format."""


@dataclass
class ModalityIndex:
    vectors: np.ndarray  # (N, D) float32, C-contiguous
    keys: list[str]
    captions: list[str]
    shards: list[str]
    urls: list[str]
    labels: list[str]  # JSON strings, parsed only for returned hits
    ann: Any = None  # a faiss index when the ANN backend is on


@dataclass
class VectorIndex:
    meta: dict
    parts: dict[str, ModalityIndex] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.meta.get("embed_dim", 0))

    def summary(self) -> dict:
        return {"path": self.meta.get("path", ""), "model_name": self.meta.get("model_name", ""),
                "model_version": str(self.meta.get("model_version", "")), "embed_dim": self.dim,
                "rows": {m: len(p.keys) for m, p in self.parts.items()},
                "backend": {m: ("faiss-hnsw" if p.ann is not None else "exact") for m, p in self.parts.items()}}


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def load_index(path: str) -> VectorIndex:
    """Read every Parquet file of the folder and group rows by modality."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = _filesystem(path)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{META_FILE}") as f:
            meta = json.loads(f.read())
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.is_file and i.path.endswith(".parquet")]
    except (OSError, ValueError) as exc:
        raise IndexLoadError(f"{path}: not a raybind index ({exc})") from None
    if meta.get("format") != FORMAT or not files:
        raise IndexLoadError(f"{path}: expected format {FORMAT} with Parquet files, got {meta.get('format')!r}, "
                          f"{len(files)} files")
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in sorted(files)])
    meta = {**meta, "path": path}
    index = VectorIndex(meta)
    modalities = table.column("modality").to_pylist()
    for modality in sorted(set(modalities)):
        rows = np.flatnonzero(np.asarray(modalities) == modality)
        index.parts[modality] = modality_part(table.take(pa.array(rows)), int(meta["embed_dim"]))
    return index


def modality_part(table, dim: int) -> ModalityIndex:
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size != len(table) * dim:
        raise IndexLoadError(f"embedding column holds {values.size} values for {len(table)} rows of dim {dim}")
    vectors = np.ascontiguousarray(values.reshape(len(table), dim))
    text = {name: [v or "" for v in table.column(name).to_pylist()] for name in ("key", "caption", "shard", "url", "labels")
            if name in table.column_names}
    n = len(table)
    return ModalityIndex(vectors, text["key"], text.get("caption", [""] * n), text.get("shard", [""] * n),
                         text.get("url", [""] * n), text.get("labels", ["{}"] * n))


def exact_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest inner products, best first."""
    scores = vectors @ query
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return top, scores[top]


def build_hnsw(vectors: np.ndarray, m: int, ef_construction: int, ef_search: int):
    """A faiss HNSW graph over inner product (= cosine on normalised rows)."""
    import faiss

    # One OpenMP thread: faiss's spinning workers stall badly when the cores are shared (a build on
    # busy cores was several times slower with the default threads than with one).
    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(vectors)
    index.hnsw.efSearch = ef_search
    return index


def ann_top_k(ann, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = ann.search(query[None, :].astype(np.float32), k)
    keep = ids[0] >= 0  # faiss pads with -1 when the graph returns fewer than k
    return ids[0][keep].astype(np.int64), scores[0][keep]


def search(part: ModalityIndex, query: np.ndarray, k: int) -> list[dict]:
    ids, scores = ann_top_k(part.ann, query, k) if part.ann is not None else exact_top_k(part.vectors, query, k)
    return [{"rank": r + 1, "key": part.keys[i], "score": round(float(s), 6), "caption": part.captions[i],
             "shard": part.shards[i], "url": part.urls[i], "labels": parse_labels(part.labels[i])}
            for r, (i, s) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True))]


def parse_labels(text: str) -> dict[str, str]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def recall_at_k(part: ModalityIndex, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k that the ANN backend returns (1.0 for the exact backend)."""
    if part.ann is None:
        return 1.0
    hits = 0
    for q in queries:
        exact, _ = exact_top_k(part.vectors, q, k)
        approx, _ = ann_top_k(part.ann, q, k)
        hits += len(set(exact.tolist()) & set(approx.tolist()))
    return hits / (len(queries) * min(k, len(part.keys)))
