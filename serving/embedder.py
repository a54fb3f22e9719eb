"""The model deployment: loads a registered model, decodes inputs with `models.decode`, and encodes
them in dynamic batches, one `@serve.batch` queue per modality.

Model swaps never drop or mix requests: each request captures the model state it started with,
items carry that state into the batch queue, and a batch forwards each state's items with that
state's model. Loading happens in a worker thread while the old model keeps serving; a failed
reload (unknown alias, registry down) keeps the old model and is reported in `info()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import av  # noqa: F401  (decoders' lazy imports, done once here: see below)
import numpy as np
import soundfile  # noqa: F401
import torch
from ray import serve

from models.decode import DecodeError, DecodeLimits, decode_member, tokenize
from models.spec import MODALITIES
from serving import media_guard
from serving.errors import public_text
from serving.inputs import Item, is_valid_text
from serving.model_source import ModelRef, describe, fetch_and_load, resolve
from serving.settings import EmbedderConfig

log = logging.getLogger("ray.serve")
# torch, PyAV and soundfile are imported at module top, on the replica's main thread, and not left to
# the first request: `models.decode` imports them lazily, and two decode threads importing a large
# package at once can see it partially initialised (the "partially initialized module 'torch'"
# failure seen in Ray Data workers). Importing them here also moves their cost to replica start-up.


@dataclass(frozen=True)
class Loaded:
    """One model generation: immutable, so requests holding it are unaffected by a swap."""

    ref: ModelRef
    model: Any  # models.binding.BindingModel, in eval mode
    info: dict
    logit_scale: float


@dataclass(frozen=True)
class ItemError:
    field: str
    reason: str  # models.decode.REASONS key, or unsupported_modality / undecodable / non_finite
    detail: str


def non_finite(item: Item, what: str) -> ItemError:
    return ItemError(item.field, "non_finite", f"the {item.modality} {what} NaN or infinite values")


def forward(model: Any, modality: str, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.encode(modality, torch.from_numpy(x)).float().numpy()


def decode_item(item: Item, spec: Any, limits: DecodeLimits) -> np.ndarray | ItemError:
    """Runs in a decode thread. Any failure of the decoders is the item's error, never the replica's.
    Decoder messages name their input by repr (`<_io.BytesIO object at 0x...>`): cleaned here."""
    try:
        media_guard.check(item.modality, item.data, item.ext, limits)
        x = decode_member(item.modality, item.ext, item.data, spec, limits)
    except DecodeError as exc:
        return ItemError(item.field, exc.reason, public_text(exc.detail, 300))
    except Exception as exc:  # a decoder bug on hostile bytes must stay a 4xx for this item
        return ItemError(item.field, "undecodable", public_text(f"{type(exc).__name__}: {exc}", 300))
    # A float WAV may hold NaN / inf samples: they would give a NaN embedding, which JSON cannot carry.
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        return non_finite(item, "decodes to")
    return x


class EmbedderCore:
    """The deployment's logic; `Embedder` below is this class as a Serve deployment."""

    def __init__(self) -> None:
        self._state: Loaded | None = None
        self._config: EmbedderConfig | None = None
        self._queues: dict[str, Callable[[tuple[Loaded, np.ndarray]], Awaitable[np.ndarray]]] = {}
        self._decode_pool: ThreadPoolExecutor | None = None
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="raybind-forward")
        self._swap_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task | None = None
        self._generation = 0
        self._last_error = ""

    # --- configuration ---------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict | None) -> None:
        cfg = EmbedderConfig.model_validate(user_config or {})
        old, self._config = self._config, cfg
        torch.set_num_threads(cfg.torch_threads)
        if self._decode_pool is None or old is None or old.decode_threads != cfg.decode_threads:
            self._decode_pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="raybind-decode")
        self._configure_queues(cfg)
        if self._state is None or (old.model_uri, old.tracking_uri) != (cfg.model_uri, cfg.tracking_uri):
            await self._load(cfg, initial=self._state is None)
        self._restart_refresh(cfg)

    def _configure_queues(self, cfg: EmbedderConfig) -> None:
        for modality in MODALITIES:
            batch = cfg.batch(modality)
            queue = self._queues.get(modality)
            if queue is None:
                self._queues[modality] = self._make_queue(modality, batch.max_batch_size, batch.batch_wait_timeout_s)
            else:  # live replicas: retune the existing queue, requests in it stay queued
                queue.set_max_batch_size(batch.max_batch_size)
                queue.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)

    def _make_queue(self, modality: str, size: int, wait: float):
        # One queue per instance (not a class-level decorator): its asyncio objects belong to this
        # replica's loop, also when several instances share a process (Serve's local testing mode).
        async def encode_batch(jobs: list[tuple[Loaded, np.ndarray]]) -> list[np.ndarray]:
            return await self._encode_batch(modality, jobs)

        encode_batch.__name__ = f"encode_{modality}"
        return serve.batch(max_batch_size=size, batch_wait_timeout_s=wait)(encode_batch)

    async def _load(self, cfg: EmbedderConfig, initial: bool) -> None:
        async with self._swap_lock:
            try:
                ref = await asyncio.to_thread(resolve, cfg.model_uri, cfg.tracking_uri)
                current = self._state
                if current and not ref.local_dir and (ref.name, ref.version) == (current.ref.name, current.ref.version):
                    info = {**current.info, "alias": ref.alias, "uri": ref.uri}  # same weights, new name
                    self._state = Loaded(ref, current.model, info, current.logit_scale)
                    return
                model = await asyncio.to_thread(fetch_and_load, ref, cfg.tracking_uri)
            except Exception as exc:
                self._last_error = f"{cfg.model_uri}: {exc}"
                if initial:
                    raise
                log.error("model reload failed, still serving the previous one: %s", self._last_error)
                return
            self._generation += 1
            scale, _ = model.logit_params()
            self._state = Loaded(ref, model, describe(ref, model, self._generation), float(scale.detach()))
            self._last_error = ""
            log.info("serving %s version %s (generation %d)", ref.name, ref.version, self._generation)

    def _restart_refresh(self, cfg: EmbedderConfig) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if cfg.refresh_s > 0 and "@" in cfg.model_uri:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop(cfg))

    async def _refresh_loop(self, cfg: EmbedderConfig) -> None:
        """Follow a moving alias: re-resolve it every refresh_s and swap when its version changes."""
        while True:
            await asyncio.sleep(cfg.refresh_s)
            try:
                ref = await asyncio.to_thread(resolve, cfg.model_uri, cfg.tracking_uri)
            except Exception as exc:
                self._last_error = f"{cfg.model_uri}: {exc}"
                continue
            if self._state is None or ref.version != self._state.ref.version:
                await self._load(cfg, initial=False)

    # --- encoding --------------------------------------------------------------------------------
    async def _encode_batch(self, modality: str, jobs: list[tuple[Loaded, np.ndarray]]) -> list[np.ndarray]:
        by_generation: dict[int, list[int]] = {}
        for i, (state, _) in enumerate(jobs):
            by_generation.setdefault(state.info["generation"], []).append(i)
        out: list[Any] = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for indices in by_generation.values():
            model = jobs[indices[0]][0].model
            x = np.stack([jobs[i][1] for i in indices])
            emb = await loop.run_in_executor(self._forward_pool, forward, model, modality, x)
            for row, i in enumerate(indices):
                out[i] = emb[row]
        return out

    async def _decode(self, state: Loaded, item: Item, limits: DecodeLimits) -> np.ndarray | ItemError:
        if item.modality not in state.model.modalities:
            return ItemError(item.field, "unsupported_modality",
                             f"model {state.ref.name} encodes {list(state.model.modalities)}")
        spec = state.model.config.inputs
        if item.modality == "text":
            if not is_valid_text(item.text):  # the Gateway refuses these; other callers might not
                return ItemError(item.field, "invalid_text", "not valid Unicode text")
            return tokenize([item.text], spec.context_length, spec.tokenizer)[0]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decode_pool, decode_item, item, spec, limits)

    def _require(self) -> Loaded:
        if self._state is None:
            raise RuntimeError("model not loaded")
        return self._state

    async def embed(self, items: list[Item], limits: DecodeLimits) -> dict:
        """Items -> {"embeddings": (N, D) float32, "model": info}, or {"errors": [...], "model": info}."""
        state = self._require()
        decoded = await asyncio.gather(*(self._decode(state, item, limits) for item in items))
        errors = [d for d in decoded if isinstance(d, ItemError)]
        if errors:
            return {"errors": [e.__dict__ for e in errors], "model": state.info}
        vectors = await asyncio.gather(*(self._queues[item.modality]((state, x)) for item, x in zip(items, decoded, strict=True)))
        errors = [non_finite(item, "input's embedding has") for item, v in zip(items, vectors, strict=True)
                  if not np.isfinite(v).all()]
        if errors:  # finite inputs at the edge of float32's range can still overflow in the model
            return {"errors": [e.__dict__ for e in errors], "model": state.info}
        return {"embeddings": np.stack(vectors), "model": state.info}

    async def zero_shot(self, item: Item, prompts: list[str], limits: DecodeLimits) -> dict:
        """Cosine scores of one item against each prompt, plus the model's logit scale."""
        state = self._require()
        decoded = await self._decode(state, item, limits)
        if isinstance(decoded, ItemError):
            return {"errors": [decoded.__dict__], "model": state.info}
        spec = state.model.config.inputs
        tokens = tokenize(prompts, spec.context_length, spec.tokenizer)
        text_queue = self._queues["text"]
        vectors = await asyncio.gather(self._queues[item.modality]((state, decoded)),
                                       *(text_queue((state, row)) for row in tokens))
        if not np.isfinite(vectors[0]).all():
            return {"errors": [non_finite(item, "input's embedding has").__dict__], "model": state.info}
        scores = np.stack(vectors[1:]) @ vectors[0]
        return {"scores": scores.tolist(), "logit_scale": state.logit_scale, "model": state.info}

    def info(self) -> dict:
        cfg = self._config
        return {"ready": self._state is not None, "model": self._state.info if self._state else None,
                "last_error": self._last_error, "model_uri": cfg.model_uri if cfg else "",
                "refresh_s": cfg.refresh_s if cfg else 0.0,
                "batching": {m: cfg.batch(m).model_dump() for m in MODALITIES} if cfg else {}}

    def check_health(self) -> None:
        self._require()


Embedder = serve.deployment(EmbedderCore, name="Embedder", max_ongoing_requests=256,
                            ray_actor_options={"num_cpus": 0.5})
