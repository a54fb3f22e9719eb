"""ShapesWorld: a synthetic data set whose modalities share attributes, so contrastive learning has
real cross-modal signal to find, and some attributes live in only some modalities.

Each sample is a little scene: a coloured shape of some size moving in a direction, with a sound
whose pitch follows the colour and whose rhythm is its own. Everything about sample `i` comes from
`np.random.default_rng([seed, i])`, so a sample's bytes depend only on (seed, i), never on how the
data set is split into shards or on which worker writes it.

| attribute | values                          | shown by                              |
|-----------|---------------------------------|---------------------------------------|
| shape     | circle, square, triangle, cross | image, video, text                    |
| color     | red, green, blue, yellow        | image, video, text, audio (as pitch)  |
| size      | small, large                    | image, video, text                    |
| direction | left, right, up, down           | video, text (motion is only in video) |
| pitch     | low, mid, high, very high       | audio, text (set by color)            |
| rhythm    | steady, pulsing, chirping       | audio, text (only audio shows it)     |

ShapesWorld declares its own evaluation (`evaluation_declaration`, written into the manifest by
`raybind data synth`): retrieval matches on the attributes both modalities show, and every
attribute is classified zero-shot with a full-factorial ensemble of captions per value.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.write.media import encode_audio, encode_jpeg, encode_mp4

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "color": ("red", "green", "blue", "yellow"),
    "size": ("small", "large"),
    "direction": ("left", "right", "up", "down"),
    "pitch": ("low", "mid", "high", "very high"),
    "rhythm": ("steady", "pulsing", "chirping"),
}
# Which modalities can show each attribute (text names all of them).
SHOWN_BY: dict[str, tuple[str, ...]] = {
    "shape": ("image", "video", "text"),
    "color": ("image", "video", "text", "audio"),
    "size": ("image", "video", "text"),
    "direction": ("video", "text"),
    "pitch": ("audio", "text"),
    "rhythm": ("audio", "text"),
}
PITCH_OF_COLOR = {"red": "low", "green": "mid", "blue": "high", "yellow": "very high"}
PITCH_HZ = {"low": 220.0, "mid": 330.0, "high": 494.0, "very high": 740.0}
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
RADIUS = {"small": 0.14, "large": 0.26}  # fraction of the frame side
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
PROMPT_SEED = 1234  # the zero-shot prompts' phrasing; changing it changes the declared prompts


@dataclass(frozen=True)
class MediaSpec:
    """How ShapesWorld renders its media (not how a model decodes them)."""

    frame_size: int = 64
    num_frames: int = 8
    fps: int = 8
    sample_rate: int = 16_000
    audio_seconds: float = 2.0
    audio_format: str = "wav"  # wav | flac
    jpeg_quality: int = 90


@dataclass(frozen=True)
class Scene:
    index: int
    attributes: dict[str, str]
    split: str
    has_audio: bool
    has_video: bool
    start: tuple[float, float]  # centre at frame 0, in [0, 1] frame units
    jitter: tuple[int, int, int] = field(default=(0, 0, 0))
    caption: str = ""


# ----------------------------------------------------------------------------- scenes and captions
_MOVES = ("moving", "drifting", "sliding", "gliding", "heading")
_DIRS = {"left": ("left", "to the left", "leftward"), "right": ("right", "to the right", "rightward"),
         "up": ("up", "upward", "towards the top"), "down": ("down", "downward", "towards the bottom")}
_PITCHES = {"low": ("low", "deep"), "mid": ("mid-pitched", "medium"), "high": ("high", "high-pitched"),
            "very high": ("very high", "shrill")}
_RHYTHMS = {"steady": ("steady hum", "constant tone"), "pulsing": ("pulsing beep", "throbbing tone"),
            "chirping": ("chirping whistle", "series of chirps")}
_TEMPLATES = (
    "a {size} {color} {shape} {move} {dir}{sound}",
    "{article} {size} {shape}, {color}, {move} {dir}{sound}",
    "a {color} {shape} ({size}) {move} {dir}{sound}",
    "there is a {size} {color} {shape} {move} {dir}{sound}",
)
_SOUND_TEMPLATES = (", with a {pitch} {rhythm}", "; you hear a {pitch} {rhythm}", " to a {pitch} {rhythm}")


def caption_for(attrs: dict[str, str], has_audio: bool, rng: np.random.Generator) -> str:
    """A caption naming every attribute the sample's modalities carry, in varied phrasing."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    sound = ""
    if has_audio:
        sound = pick(_SOUND_TEMPLATES).format(pitch=pick(_PITCHES[attrs["pitch"]]),
                                              rhythm=pick(_RHYTHMS[attrs["rhythm"]]))
    text = pick(_TEMPLATES).format(size=attrs["size"], color=attrs["color"], shape=attrs["shape"],
                                   article="a", move=pick(_MOVES), dir=pick(_DIRS[attrs["direction"]]),
                                   sound=sound)
    return text[0].upper() + text[1:]


def make_scene(seed: int, index: int, p_missing_audio: float = 0.0, p_missing_video: float = 0.0) -> Scene:
    rng = np.random.default_rng([seed, index])
    attrs = {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()
             if name != "pitch"}
    attrs["pitch"] = PITCH_OF_COLOR[attrs["color"]]
    u = rng.random()
    split = "train" if u < SPLITS[0][1] else ("val" if u < SPLITS[0][1] + SPLITS[1][1] else "test")
    has_audio = bool(rng.random() >= p_missing_audio)
    has_video = bool(rng.random() >= p_missing_video)
    # Start so the shape stays inside the frame for the whole clip.
    r = RADIUS[attrs["size"]]
    dx, dy = VELOCITY[attrs["direction"]]
    travel = 0.35
    lo_x, hi_x = r + max(0, -dx) * travel, 1 - r - max(0, dx) * travel
    lo_y, hi_y = r + max(0, -dy) * travel, 1 - r - max(0, dy) * travel
    start = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
    jitter = tuple(int(j) for j in rng.integers(-20, 21, size=3))
    caption = caption_for(attrs, has_audio, rng)
    return Scene(index, attrs, split, has_audio, has_video, start, jitter, caption)


# ----------------------------------------------------------------------------- renderers
def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def render_frame(scene: Scene, t: float, size: int) -> Image.Image:
    """The scene at time t in [0, 1] (0 = first frame) as an RGB image."""
    attrs = scene.attributes
    img = Image.new("RGB", (size, size), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    dx, dy = VELOCITY[attrs["direction"]]
    cx = (scene.start[0] + dx * 0.35 * t) * size
    cy = (scene.start[1] + dy * 0.35 * t) * size
    r = RADIUS[attrs["size"]] * size
    color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(RGB[attrs["color"]], scene.jitter, strict=True))
    if attrs["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif attrs["shape"] == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    else:
        draw.polygon(_shape_points(attrs["shape"], cx, cy, r), fill=color)
    return img


def synth_audio(scene: Scene, media: MediaSpec) -> np.ndarray:
    """Mono float32 waveform: pitch from the colour, envelope from the rhythm, a little noise."""
    rng = np.random.default_rng([scene.index, 7])
    sr = media.sample_rate
    t = np.arange(int(sr * media.audio_seconds)) / sr
    f0 = PITCH_HZ[scene.attributes["pitch"]]
    rhythm = scene.attributes["rhythm"]
    if rhythm == "chirping":  # rising sweeps, three per second
        phase_t = (t * 3.0) % 1.0
        freq = f0 * (1.0 + 0.5 * phase_t)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        envelope = (phase_t < 0.45).astype(np.float64)
    else:
        phase = 2 * np.pi * f0 * t
        envelope = np.ones_like(t) if rhythm == "steady" else (np.sin(2 * np.pi * 4.0 * t) > 0).astype(float)
    tone = np.sin(phase) + 0.35 * np.sin(2 * phase) + 0.15 * np.sin(3 * phase)
    wave = 0.4 * envelope * tone / 1.5 + 0.01 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


def render_sample(scene: Scene, media: MediaSpec, key: str) -> dict[str, bytes]:
    """All members of one sample, keyed by extension (webdataset convention)."""
    n = media.num_frames
    frames = [render_frame(scene, i / max(n - 1, 1), media.frame_size) for i in range(n)]
    members = {"jpg": encode_jpeg(frames[n // 2], media.jpeg_quality), "txt": scene.caption.encode()}
    modalities = ["image", "text"]
    if scene.has_audio:
        members[media.audio_format] = encode_audio(synth_audio(scene, media), media.sample_rate,
                                                   media.audio_format)
        modalities.append("audio")
    if scene.has_video:
        members["mp4"] = encode_mp4(frames, media.fps)
        modalities.append("video")
    meta = {"key": key, "split": scene.split, "caption": scene.caption, "modalities": modalities,
            **scene.attributes}
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


# ----------------------------------------------------------------------------- declared evaluation
def class_prompts(attribute: str, value: str, seed: int = PROMPT_SEED) -> list[str]:
    """Captions with `attribute` fixed to `value`, one per combination of the other attributes
    (pitch follows colour), each phrased like a sample's caption with sound.

    Why every combination rather than a random sample: the easy attributes (colour, size) dominate
    each caption's embedding. With a random sample, "circle"'s prompts may hold more red scenes than
    "square"'s, and that imbalance outweighs the shape signal. A balanced, full-factorial ensemble
    holds every combination of the other attributes equally often in every class, so whichever
    prompt of a class best matches an item, the other classes have one with the same other attributes.
    """
    rng = np.random.default_rng([seed, _hash_text(attribute + value)])
    fixed = {attribute: value}
    if attribute == "color":
        fixed["pitch"] = PITCH_OF_COLOR[value]
    elif attribute == "pitch":
        fixed["color"] = {p: c for c, p in PITCH_OF_COLOR.items()}[value]
    free = [k for k in ATTRIBUTES if k not in fixed and k != "pitch"]
    prompts = []
    for combo in itertools.product(*(ATTRIBUTES[k] for k in free)):
        attrs = {**dict(zip(free, combo, strict=True)), **fixed}
        attrs.setdefault("pitch", PITCH_OF_COLOR[attrs["color"]])
        prompts.append(caption_for(attrs, True, rng))
    return prompts


def _hash_text(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % (2**31)


def evaluation_declaration() -> dict:
    """The manifest's `"evaluation"` object (see pipelines/eval/declared.py): retrieval matches on
    the attributes both modalities show; every attribute is classified zero-shot, in the modalities
    that show it, against `class_prompts` of each value; the projection is coloured by colour."""
    return {
        "match_on": {k: list(v) for k, v in SHOWN_BY.items()},
        "zero_shot": {k: {"values": list(ATTRIBUTES[k]), "shown_by": list(shown),
                          "prompts": {v: class_prompts(k, v) for v in ATTRIBUTES[k]}}
                      for k, shown in SHOWN_BY.items()},
        "plot_by": "color",
    }
