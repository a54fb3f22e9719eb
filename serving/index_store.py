"""The search index on the serving side: load a folder written by `raybind index build`
(pipelines/eval/index.py) and answer top-k queries per target modality.

Format ("raybind-index/1"): `*.parquet` files with columns key, modality, embedding (list of
float32, L2-normalised), caption, shard, url, labels (JSON object as a string), and `index.json`
with the model the embeddings came from. Exact search is one matrix-vector product and an
argpartition (O(N·D), ~1 ms per 100k x 64 rows here); `faiss-hnsw` is the optional ANN backend.

What clients see carries no server paths: a hit's `uri` is the row's URL when it is a remote one
(`s3://bucket/ds/shard-000001.tar#000000040`, a sample's own https URL) and, for local data, its
path relative to the data set folder (`shard-000001.tar#000000040`); the summary names the index
folder by its last part only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "raybind-index/1"
META_FILE = "index.json"


class IndexLoadError(RuntimeError):
    """The index folder is missing, empty or not in the expected format; `reason` says which in
    words that name no path (what the unauthenticated /readyz shows)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


NO_INDEX = "no index at the configured index_path (build one with `raybind index build`)"
NOT_AN_INDEX = f"the folder at the configured index_path is not a {FORMAT} index"


@dataclass
class ModalityIndex:
    vectors: np.ndarray  # (N, D) float32, C-contiguous
    keys: list[str]
    captions: list[str]
    shards: list[str]
    uris: list[str]  # public locations (see public_uri), never server paths
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
        return {"name": self.meta.get("name", ""), "model_name": self.meta.get("model_name", ""),
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
    except FileNotFoundError as exc:
        raise IndexLoadError(f"{path}: not a raybind index ({exc})", NO_INDEX) from None
    except (OSError, ValueError) as exc:
        raise IndexLoadError(f"{path}: not a raybind index ({exc})", NOT_AN_INDEX) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not files:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise IndexLoadError(f"{path}: expected format {FORMAT} with Parquet files, got {found!r}, "
                             f"{len(files)} files", NOT_AN_INDEX)
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in sorted(files)])
    meta = {**meta, "name": path.rstrip("/").rsplit("/", 1)[-1]}
    index = VectorIndex(meta)
    data_root = dataset_root(str(meta.get("data", "")))
    modalities = table.column("modality").to_pylist()
    for modality in sorted(set(modalities)):
        rows = np.flatnonzero(np.asarray(modalities) == modality)
        index.parts[modality] = modality_part(table.take(pa.array(rows)), int(meta["embed_dim"]), data_root)
    return index


def dataset_root(data: str) -> str:
    """The local folder of the data set an index was built from (`index.json`'s `data`: a folder,
    a manifest / shard file or a glob), "" when it is remote or unknown."""
    if not data or ("://" in data and not data.startswith("file://")):
        return ""
    root = data[len("file://"):] if data.startswith("file://") else data
    cut = min((root.index(c) for c in "*?[{" if c in root), default=None)
    if cut is not None:
        root = root[:cut].rsplit("/", 1)[0]
    elif root.endswith((".json", ".tar")):
        root = root.rsplit("/", 1)[0]
    return root.rstrip("/")


def public_uri(url: str, data_root: str) -> str:
    """A row's location as clients may see it: remote URLs as they are; local paths relative to the
    data set folder (or, outside it, the file's own name), never an absolute server path."""
    if not url:
        return ""
    if "://" in url and not url.startswith("file://"):
        return url  # s3://bucket/..., https://...: the data set's public address
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path.startswith("/"):
        return path
    if data_root.startswith("/") and path.startswith(data_root + "/"):
        return path[len(data_root) + 1:]
    return path.rsplit("/", 1)[-1]


def modality_part(table, dim: int, data_root: str = "") -> ModalityIndex:
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size != len(table) * dim:
        raise IndexLoadError(f"embedding column holds {values.size} values for {len(table)} rows of dim {dim}")
    vectors = np.ascontiguousarray(values.reshape(len(table), dim))
    text = {name: [v or "" for v in table.column(name).to_pylist()] for name in ("key", "caption", "shard", "url", "labels")
            if name in table.column_names}
    n = len(table)
    # `shard` holds shard names; an index whose writer put paths there is shortened the same way.
    shards = [public_uri(shard, data_root) for shard in text.get("shard", [""] * n)]
    uris = [public_uri(url, data_root) for url in text.get("url", [""] * n)]
    return ModalityIndex(vectors, text["key"], text.get("caption", [""] * n), shards, uris,
                         text.get("labels", ["{}"] * n))


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
             "shard": part.shards[i], "uri": part.uris[i], "labels": parse_labels(part.labels[i])}
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
