"""`raybind data build`'s media: each source file is read, fully decoded (so a bad file fails here,
not in training) and re-encoded as a shard member when the config asks for it."""

from __future__ import annotations

import io
import json

from models.decode import (
    AUDIO_EXTS,
    VIDEO_EXTS,
    DecodeError,
    decode_video,
    frame_indices,
    open_container,
    resample,
    to_rgb,
)
from models.spec import InputSpec
from pipelines.core import storage
from pipelines.data.write.build_config import BuildConfig
from pipelines.data.write.media import encode_audio as write_audio
from pipelines.data.write.media import encode_mp4


# ----------------------------------------------------------------------------- media: images
def render_svg(data: bytes, max_side: int):
    """SVG -> RGBA PIL image, rendered (not resized) so its longer side is `max_side`."""
    from PIL import Image

    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: the system cairo library is missing
        raise DecodeError("svg_unsupported", f"install cairosvg (and the cairo library) to read svg: {exc}") from None
    try:
        im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data)))
        if max_side and max(im.size) != max_side:
            scale = max_side / max(im.size)
            im = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=data, scale=scale)))
        im.load()
    except Exception as exc:  # cairosvg raises many kinds (XML, ValueError, ...)
        raise DecodeError("corrupt_image", f"svg: {type(exc).__name__}: {exc}") from None
    return im


def open_image(data: bytes, ext: str, cfg: BuildConfig):
    """A fully decoded PIL image; DecodeError with the decoder's reason codes otherwise."""
    import warnings

    from PIL import Image

    if ext == "svg":
        return render_svg(data, cfg.image_max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > cfg.max_image_pixels:
            raise DecodeError("too_many_pixels", f"{im.size[0]}x{im.size[1]} > {cfg.max_image_pixels} pixels")
        im.load()
    except DecodeError:
        raise
    except Exception as exc:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return im


def encode_image(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate, cap the longer side, re-encode. Returns (member extension, bytes)."""
    from PIL import Image

    im = open_image(data, ext, cfg)
    too_big = cfg.image_max_side and max(im.size) > cfg.image_max_side
    if cfg.image_format == "keep" and not too_big and ext in ("jpg", "jpeg", "png", "webp"):
        return ("jpg" if ext == "jpeg" else ext), data  # decoded fine and nothing to change: copy bytes
    fmt = cfg.image_format if cfg.image_format != "keep" else ("jpg" if ext == "jpeg" else ext)
    fmt = fmt if fmt in ("jpg", "png", "webp") else "png"
    im = to_rgb(im)  # alpha composited on white, as the decoder does
    if too_big:
        im.thumbnail((cfg.image_max_side, cfg.image_max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=cfg.jpeg_quality)
    return fmt, buf.getvalue()


# ----------------------------------------------------------------------------- media: audio
def read_audio(data: bytes, ext: str, cfg: BuildConfig):
    """The whole recording as float32 (frames, channels) and its rate (soundfile, then PyAV)."""
    import numpy as np

    errors = []
    for reader in (_soundfile_audio, _pyav_audio):
        try:
            wave, rate = reader(data, ext)
        except Exception as exc:  # soundfile: LibsndfileError; av: av.error.*
            errors.append(f"{reader.__name__}: {type(exc).__name__}: {exc}")
            continue
        if wave.size == 0 or not rate:
            errors.append(f"{reader.__name__}: no samples")
            continue
        if wave.shape[0] / rate > cfg.max_audio_seconds:
            raise DecodeError("audio_too_long", f"{wave.shape[0] / rate:.1f} s > {cfg.max_audio_seconds} s")
        return np.asarray(wave, np.float32), int(rate)
    raise DecodeError("corrupt_audio", "; ".join(errors))


def _soundfile_audio(data: bytes, ext: str):
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave, rate


def _pyav_audio(data: bytes, ext: str):
    import numpy as np

    with open_container(data, ext) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().astype(np.float32) for frame in container.decode(stream)]
        rate = stream.rate
    planar = [c if c.shape[0] == stream.channels else c.reshape(-1, stream.channels).T for c in chunks]
    return (np.concatenate(planar, axis=1).T if planar else np.zeros((0, 1), np.float32)), rate


def encode_audio(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate by decoding it all; re-encode (mono, `audio_rate`, flac/wav) only when asked."""

    wave, rate = read_audio(data, ext, cfg)
    if not cfg.audio_rate and cfg.audio_format == "keep" and ext in AUDIO_EXTS:
        return ext, data
    mono = wave.mean(axis=1)
    target = cfg.audio_rate or rate
    fmt = cfg.audio_format if cfg.audio_format != "keep" else "flac"
    return fmt, write_audio(resample(mono, rate, target), target, fmt)


# ----------------------------------------------------------------------------- media: video
def encode_video(data: bytes, ext: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Validate with the reader's decoder; re-encode to H.264 mp4 only when fps / frames / size are set."""

    decode_video(data, ext, InputSpec(video_frames=2, video_size=16), cfg.limits)  # reason codes on failure
    if not (cfg.video_fps or cfg.video_max_frames or cfg.video_max_side) and ext in VIDEO_EXTS:
        return ext, data
    frames, fps = read_frames(data, ext, cfg)

    return "mp4", encode_mp4(frames, max(1, round(fps)))


def read_frames(data: bytes, ext: str, cfg: BuildConfig):
    """RGB PIL frames resampled to `video_fps`, capped to `video_max_frames` (uniformly) and
    `video_max_side` (even sizes, as H.264 wants); returns (frames, frames per second)."""

    with open_container(data, ext) as container:
        stream = container.streams.video[0]
        native = float(stream.average_rate or 25)
        step = 1.0 / cfg.video_fps if cfg.video_fps else 0.0
        frames, next_t = [], 0.0
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / native
            if step and t + 1e-6 < next_t:
                continue
            next_t += step
            frames.append(frame.to_image())
    fps = cfg.video_fps or native
    duration = len(frames) / fps
    if cfg.video_max_frames and len(frames) > cfg.video_max_frames:
        frames = [frames[i] for i in frame_indices(len(frames), cfg.video_max_frames)]
        fps = len(frames) / duration
    return [_fit(f, cfg.video_max_side) for f in frames], fps


def _fit(im, max_side: int):
    from PIL import Image

    w, h = im.size
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    size = (max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2))
    return im if size == im.size else im.resize(size, Image.Resampling.BICUBIC)


ENCODERS = {"image": encode_image, "audio": encode_audio, "video": encode_video}


# ----------------------------------------------------------------------------- one source file
def read_file(url: str, max_bytes: int) -> bytes:
    """The file's bytes; DecodeError missing_file / too_large / unreadable_file / empty otherwise."""

    fs, path = storage.filesystem(url)
    try:
        if not fs.exists(path):
            raise DecodeError("missing_file", f"{url} does not exist")
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise DecodeError("too_large", f"{url}: {size} bytes > {max_bytes}")
        data = fs.cat_file(path)
    except DecodeError:
        raise
    except OSError as exc:  # permissions, a folder named like a file, a network error
        raise DecodeError("unreadable_file", f"{url}: {type(exc).__name__}: {exc}") from None
    if not data:
        raise DecodeError("empty", f"{url} is empty")
    return data


def _extension(url: str) -> str:
    name = url.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def encode_member(modality: str, url: str, cfg: BuildConfig) -> tuple[str, bytes]:
    """Read one source file and turn it into a shard member (extension, bytes)."""

    data = read_file(url, cfg.max_file_bytes)
    if modality == "text":
        return "txt", data.decode("utf-8", errors="replace").strip().encode()
    if modality == "meta":
        try:
            meta = json.loads(data)
        except ValueError as exc:
            raise DecodeError("corrupt_json", str(exc)) from None
        if not isinstance(meta, dict):
            raise DecodeError("corrupt_json", f"expected an object, got {type(meta).__name__}")
        return "json", data
    return ENCODERS[modality](data, _extension(url), cfg)


