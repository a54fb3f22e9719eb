"""Model configs: small frozen dataclasses, one JSON file per named size (open_clip model-config style).

The registry is the folder `models/configs/`: `ModelConfig.from_name("tiny")` reads `tiny.json`.
There is no global mutable registry; adding a size means adding a file. Every config is validated
when built: unknown keys and bad values raise `ValueError` naming the field (`image.heads: ...`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.spec import MODALITIES, OPEN_CLIP_TOKENIZER, AudioSpec, InputSpec

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROJECTIONS = ("linear", "mlp")
TOWER_KINDS = ("open_clip", "hf")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _positive_int(value: Any, name: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
           f"must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TowerConfig:
    """One transformer tower. `patch_size` is for image / audio / video frames, None for text.

    Pretrained towers (models/pretrained.py; local files only, never a hub):
    - kind "open_clip" (built here) with `pretrained` = an open_clip checkpoint file (.pt / .bin /
      .safetensors state dict; its visual or text part) or a raybind model folder (its tower of the
      same modality): the tower is initialised from it when the model is built;
    - kind "hf" (text only): a Hugging Face transformers model folder, or `package:NAME/sub/folder`
      inside an installed Python package; width / layers / heads must match its config.json, and
      the model's `inputs.tokenizer` must name the same folder.
    `locked` freezes the tower (LiT): no gradients, eval mode; its projection head still trains.
    `conv_stem` replaces the ViT's one-layer patchify with stride-2 3x3 convolutions down to the
    patch grid (Xiao et al. 2021, "Early convolutions help transformers see better"): small models
    on small images then tell outlines apart (ShapesWorld's shapes) that one linear patch blurs.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    patch_size: int | None = None
    ls_init_value: float | None = None  # LayerScale init (None = off), as in open_clip
    kind: str = "open_clip"
    pretrained: str = ""  # local weights to start from ("" = random init); required for kind "hf"
    locked: bool = False
    conv_stem: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads"):
            _positive_int(getattr(self, name), name)
        _check(self.width % self.heads == 0, "heads", f"width {self.width} is not divisible by {self.heads} heads")
        _check(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio!r}")
        if self.patch_size is not None:
            _positive_int(self.patch_size, "patch_size")
        if self.conv_stem:
            p = self.patch_size or 0
            _check(p >= 2 and p & (p - 1) == 0, "conv_stem",
                   f"needs a power-of-two patch_size >= 2 (stride-2 convolutions), got {self.patch_size!r}")
        _check(self.kind in TOWER_KINDS, "kind", f"must be one of {TOWER_KINDS}, got {self.kind!r}")
        _check(isinstance(self.pretrained, str), "pretrained", "must be a path string")
        _check(self.kind != "hf" or bool(self.pretrained), "pretrained",
               "is required for an hf tower (a local transformers model folder)")
        _check(isinstance(self.locked, bool), "locked", "must be true or false")


@dataclass(frozen=True)
class VideoTowerConfig:
    """Video = a per-frame ViT + learned temporal position embeddings + a temporal transformer + mean pool.

    With `share_image_tower` the frames go through the image tower itself (ImageBind shares weights the
    same way), so `frame` must be None; otherwise `frame` describes the video's own frame ViT.
    `temporal_layers=0` skips the temporal transformer (plain mean over frames).
    `motion` adds each frame's difference to the next one as 3 more input channels: a patch then sees
    which way its edge moved, which pooled per-frame embeddings alone barely keep (needs an own tower).
    `appearance_from_image` (SlowFast-style two pathways; needs an own frame tower) also runs the clip's
    middle frame through the image tower (shared weights); its projection joins the frame tokens as one
    more token: fine shape comes from the image tower's resolution, motion from the light frame tower.
    """

    share_image_tower: bool = True
    frame: TowerConfig | None = None
    temporal_layers: int = 1
    motion: bool = False
    appearance_from_image: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.share_image_tower, bool), "share_image_tower", "must be true or false")
        if self.share_image_tower:
            _check(self.frame is None, "frame", "must be omitted when share_image_tower is true")
        else:
            _check(self.frame is not None, "frame", "is required when share_image_tower is false")
            _check(self.frame.patch_size is not None, "frame.patch_size", "is required for video frames")
            _check(self.frame.kind == "open_clip", "frame.kind", "video frames need an open_clip tower")
        _check(isinstance(self.motion, bool), "motion", "must be true or false")
        _check(not (self.motion and self.share_image_tower), "motion",
               "needs the video's own frame tower (share_image_tower: false): frames get 6 channels")
        _check(isinstance(self.appearance_from_image, bool), "appearance_from_image", "must be true or false")
        _check(not (self.appearance_from_image and self.share_image_tower), "appearance_from_image",
               "needs the video's own frame tower (share_image_tower: false)")
        _check(isinstance(self.temporal_layers, int) and self.temporal_layers >= 0, "temporal_layers",
               f"must be an integer >= 0, got {self.temporal_layers!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole binding model: its decoded inputs, one tower per modality, the shared space.

    A tower set to None leaves that modality out of the model. `init_logit_scale` is the log of the
    initial temperature inverse (CLIP: log(1/0.07)); the applied scale is clamped to `max_logit_scale`.
    `use_logit_bias` adds SigLIP's learnable bias (SigLIP inits: logit scale log(10), bias -10).
    """

    name: str
    embed_dim: int
    inputs: InputSpec = field(default_factory=InputSpec)
    image: TowerConfig | None = None
    text: TowerConfig | None = None
    audio: TowerConfig | None = None
    video: VideoTowerConfig | None = None
    projection: str = "linear"
    vocab_size: int = 49408  # open_clip's tokenizer
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    use_logit_bias: bool = False
    init_logit_bias: float = -10.0

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "name", "must be a non-empty string")
        _positive_int(self.embed_dim, "embed_dim")
        _positive_int(self.vocab_size, "vocab_size")
        _check(self.projection in PROJECTIONS, "projection", f"must be one of {PROJECTIONS}, got {self.projection!r}")
        _check(self.max_logit_scale > 0, "max_logit_scale", f"must be > 0, got {self.max_logit_scale!r}")
        _check(self.init_logit_scale <= math.log(self.max_logit_scale), "init_logit_scale",
               f"exp({self.init_logit_scale}) exceeds max_logit_scale {self.max_logit_scale}")
        _check(bool(self.modalities), "modalities", "a model needs at least one tower")
        _check_inputs(self.inputs)
        self._check_towers()

    def _check_towers(self) -> None:
        for name in ("image", "audio"):
            tower = getattr(self, name)
            if tower is not None:
                _check(tower.patch_size is not None, f"{name}.patch_size", "is required")
                _check(tower.kind == "open_clip", f"{name}.kind", "hf towers are supported for text only")
        self._check_tokenizer()
        if self.image is not None:
            _check_divides(self.image.patch_size, self.inputs.image_size, "image.patch_size", "inputs.image_size")
        if self.audio is not None:
            # Like ImageBind (128 x 204 mels, 16 px patches), trailing mels / frames beyond the last
            # whole patch are dropped by the patch conv; a patch just must fit.
            size = min(self.inputs.audio.n_mels, self.inputs.audio.num_frames)
            _check(self.audio.patch_size <= size, "audio.patch_size", f"{self.audio.patch_size} exceeds the input {size}")
        if self.video is not None:
            self._check_video()

    def _check_tokenizer(self) -> None:
        """Token ids must come from the tokenizer the text tower was trained with."""
        if self.text is None:
            return
        if self.text.kind == "hf":
            _check(self.inputs.tokenizer == self.text.pretrained, "inputs.tokenizer",
                   f"must be the hf text tower's folder {self.text.pretrained!r}, got {self.inputs.tokenizer!r}")
        else:
            _check(self.inputs.tokenizer == OPEN_CLIP_TOKENIZER, "inputs.tokenizer",
                   f"an open_clip text tower needs {OPEN_CLIP_TOKENIZER!r}, got {self.inputs.tokenizer!r}")

    def _check_video(self) -> None:
        if self.video.share_image_tower:
            _check(self.image is not None, "video.share_image_tower", "needs an image tower")
            _check(self.inputs.video_size == self.inputs.image_size, "inputs.video_size",
                   f"must equal inputs.image_size ({self.inputs.image_size}) when video shares the image tower")
        else:
            _check_divides(self.video.frame.patch_size, self.inputs.video_size,
                           "video.frame.patch_size", "inputs.video_size")
        if self.video.appearance_from_image:
            _check(self.image is not None, "video.appearance_from_image", "needs an image tower")
            _check(self.inputs.video_size == self.inputs.image_size, "inputs.video_size",
                   f"must equal inputs.image_size ({self.inputs.image_size}) when video frames go through "
                   "the image tower (video.appearance_from_image)")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model encodes, in canonical order (image, text, audio, video)."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _build(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A registered size: reads `models/configs/<name>.json`."""
        if name not in available_models():
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
        config = cls.from_file(CONFIG_DIR / f"{name}.json")
        _check(config.name == name, "name", f"{name}.json declares name {config.name!r}")
        return config

    def tiny_twin(self) -> ModelConfig:
        """The same architecture (modalities, inputs, sharing, projection, embed_dim) with tiny towers.

        For tests: every registered size can be built and run quickly on a CPU.
        """
        def shrink(tower: TowerConfig | None) -> TowerConfig | None:
            if tower is None or tower.kind == "hf":  # a pretrained hf model has one fixed size
                return tower
            return dataclasses.replace(tower, width=32, layers=1, heads=2, pretrained="")

        video = self.video
        if video is not None:
            video = dataclasses.replace(video, frame=shrink(video.frame),
                                        temporal_layers=min(video.temporal_layers, 1))
        return dataclasses.replace(self, name=f"{self.name}-twin", image=shrink(self.image),
                                   text=shrink(self.text), audio=shrink(self.audio), video=video)


def available_models() -> list[str]:
    """Names of the registered sizes (the JSON files in `models/configs/`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _check_divides(patch: int, size: int, patch_name: str, size_name: str) -> None:
    _check(size % patch == 0, patch_name, f"{patch} does not divide {size_name} {size}")


def _check_inputs(spec: InputSpec) -> None:
    for name in ("image_size", "context_length", "video_frames", "video_size"):
        _positive_int(getattr(spec, name), f"inputs.{name}")
    for name in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        _positive_int(getattr(spec.audio, name), f"inputs.audio.{name}")
    _check(spec.audio.num_frames > 0, "inputs.audio.clip_seconds", f"gives no frames ({spec.audio.clip_seconds!r})")
    _check(isinstance(spec.tokenizer, str) and bool(spec.tokenizer), "inputs.tokenizer", "must be a non-empty string")


# --- strict building from JSON-like dicts ----------------------------------------------------------
_DATACLASSES = (TowerConfig, VideoTowerConfig, ModelConfig, InputSpec, AudioSpec)


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from `data`, naming the dotted field path in every error."""
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{_join(path, unknown[0])}: unknown field (allowed: {', '.join(sorted(names))})")
    kwargs = {key: _coerce(value, hints[key], _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{where}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(_join(path, str(exc))) from exc


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(value: Any, hint: Any, path: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint in _DATACLASSES:
        return _build(hint, value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        raise ValueError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value
