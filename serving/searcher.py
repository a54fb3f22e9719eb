"""The search deployment: holds the index in memory and answers top-k queries for a query vector.

A new `index_path` in user_config loads the new index in a thread while the old one keeps
answering, then swaps; a failed load keeps the old index and is reported in `info()`: the full
error as `last_error` (for the log), and as `reason` in words that name no path (for clients).
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from serving import index_store
from serving.settings import SearcherConfig

log = logging.getLogger("ray.serve")


def load_with_backend(cfg: SearcherConfig) -> index_store.VectorIndex:
    index = index_store.load_index(cfg.index_path)
    if cfg.ann == "faiss-hnsw":
        for part in index.parts.values():
            if len(part.keys) >= cfg.ann_min_rows:
                part.ann = index_store.build_hnsw(part.vectors, cfg.hnsw_m, cfg.hnsw_ef_construction,
                                                  cfg.hnsw_ef_search)
    return index


class SearcherCore:
    def __init__(self) -> None:
        self._index: index_store.VectorIndex | None = None
        self._config: SearcherConfig | None = None
        self._last_error = ""
        self._reason = ""

    async def reconfigure(self, user_config: dict | None) -> None:
        cfg = SearcherConfig.model_validate(user_config or {})
        old, self._config = self._config, cfg
        if old is not None and (old.index_path, old.ann, old.hnsw_m, old.hnsw_ef_search) == \
                (cfg.index_path, cfg.ann, cfg.hnsw_m, cfg.hnsw_ef_search):
            return
        if not cfg.index_path:
            self._index, self._last_error, self._reason = None, "", ""
            return
        try:
            index = await asyncio.to_thread(load_with_backend, cfg)
        except Exception as exc:
            self._last_error = f"{cfg.index_path}: {exc}"
            self._reason = getattr(exc, "reason", "") or f"the index could not be loaded ({type(exc).__name__})"
            if self._index is None and old is None:
                # No index yet: start anyway (search answers 503, /readyz says why) so a missing
                # index never keeps the embedding endpoints down.
                log.error("index not loaded: %s", self._last_error)
                return
            log.error("index reload failed, keeping the previous one: %s", self._last_error)
            return
        self._index, self._last_error, self._reason = index, "", ""
        log.info("index %s loaded: %s", cfg.index_path, index.summary()["rows"])

    def info(self) -> dict:
        cfg = self._config
        return {"configured": bool(cfg and cfg.index_path), "ready": self._index is not None,
                "index": self._index.summary() if self._index else None, "last_error": self._last_error,
                "reason": self._reason}

    def search(self, query: np.ndarray, target: str, k: int) -> dict:
        """{"index": summary, "results": [...]} or {"error": (code, message)} for the gateway to map."""
        index = self._index
        if index is None:
            return {"error": ("index_not_loaded", self._reason or "no index configured")}
        if query.shape != (index.dim,):
            return {"error": ("index_model_mismatch",
                              f"query has dimension {query.shape[0]}, the index {index.dim}: rebuild the index "
                              "with the served model")}
        part = index.parts.get(target)
        if part is None:
            return {"error": ("target_not_indexed", f"the index holds {sorted(index.parts)}, not {target}")}
        return {"index": index.summary(), "results": index_store.search(part, query.astype(np.float32), k)}


Searcher = serve.deployment(SearcherCore, name="Searcher", max_ongoing_requests=256,
                            ray_actor_options={"num_cpus": 0.25})
