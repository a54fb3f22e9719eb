"""Bytes -> model inputs, one small function per modality; shared by the Ray Data reader and serving.

Every function takes the raw bytes of one member (plus its extension where the container matters)
and an `InputSpec`, and returns a numpy array shaped by `InputSpec.shape(modality)`. Anything wrong
with the input raises `DecodeError(reason, detail)` with a stable reason code (see `REASONS`), so
callers can count failures per reason. No Ray here (see docs/architecture.md).

Image: jpg/png/webp, any PIL mode -> RGB (alpha composited on white; 16-bit grey scaled from
  0..65535), shorter side resized to `image_size` (bicubic) and centre-cropped, then normalised with
  CLIP's IMAGE_MEAN / IMAGE_STD. Result 3 x S x S float32.
Text: open_clip's SimpleTokenizer (ships in the wheel, no hub access), `context_length` ids; a long
  caption is truncated with EOT kept last (open_clip's behaviour); an empty caption is [SOT, EOT].
  A model with a pretrained Hugging Face text tower names its local tokenizer folder in
  `InputSpec.tokenizer`; its ids are used instead (models/pretrained.hf_tokenize).
Audio: wav/flac/ogg/mp3 via soundfile (PyAV as fallback), m4a and anything else via PyAV; mixed to
  mono and resampled to `audio.sample_rate` (polyphase, scipy.signal.resample_poly, or libswresample
  on the PyAV path). ONE clip of `clip_seconds` is taken from the CENTRE of the recording (centre,
  not start, because real recordings often begin with silence); shorter audio is zero-padded at the
  end. Log-mel, ImageBind-like front end: Hann window of `n_fft` (25 ms) samples, hop `hop_length`
  (10 ms), power spectrum, `n_mels` HTK-mel triangular filters over 0..sr/2, natural log of
  (mel energy + 1e-6), cropped/padded to exactly `num_frames` frames, then normalised PER
  SPECTROGRAM to zero mean / unit variance (so loudness does not matter; std floored at 0.1 so silence becomes zeros).
  Result 1 x n_mels x num_frames float32.
Video: mp4/webm/mkv via PyAV; `video_frames` frames sampled uniformly over the clip (frame index
  floor((i + 0.5) * n / T)); a clip with fewer than T frames is padded by repeating frames with the
  same rule (nothing is dropped); each frame resized/cropped/normalised like an image. An audio track
  is ignored. Result T x 3 x S x S float32.

Limits (`DecodeLimits`) are checked from headers before the expensive decode: image pixel count
(from the image header), audio / video duration (container metadata; also enforced while decoding
when the header does not say), and member size.

`out=`: the array decoders (and `decode_sample`) can write their result into a given array of the
right shape instead of a new one. The reader passes row i of the block it is filling, so a block of
decoded samples costs no stacking copy (see pipelines/data/read/datasource.py, BlockBuilder).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from models.spec import IMAGE_MEAN, IMAGE_STD, MODALITIES, OPEN_CLIP_TOKENIZER, AudioSpec, InputSpec

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS: tuple[str, ...] = ("txt",)
AUDIO_EXTS: tuple[str, ...] = ("wav", "flac", "mp3", "m4a", "ogg")
VIDEO_EXTS: tuple[str, ...] = ("mp4", "webm", "mkv")
EXTS_OF: dict[str, tuple[str, ...]] = {"image": IMAGE_EXTS, "text": TEXT_EXTS, "audio": AUDIO_EXTS,
                                       "video": VIDEO_EXTS}
_SOUNDFILE_EXTS = ("wav", "flac", "ogg", "mp3")

REASONS: dict[str, str] = {
    "empty": "zero-byte media member",
    "too_large": "member larger than max_member_bytes",
    "corrupt_image": "image bytes do not decode",
    "too_many_pixels": "image larger than max_image_pixels",
    "corrupt_audio": "audio bytes do not decode",
    "audio_too_long": "audio longer than max_audio_seconds",
    "corrupt_video": "video bytes do not decode (or no video stream)",
    "video_too_long": "video longer than max_video_seconds",
    "corrupt_json": "the .json member is not a JSON object",
}


class DecodeError(Exception):
    """A member that cannot be decoded; `reason` is one of REASONS (stable, used as a counter key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep (reason, detail) when pickled across processes
        return (DecodeError, (self.reason, self.detail))


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against hostile or broken files; checked from headers before a full decode."""

    max_image_pixels: int = 40_000_000  # ~ 6300 x 6300
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_member_bytes: int = 256 * 2**20


DEFAULT_LIMITS = DecodeLimits()

# x * _PIX_SCALE - _PIX_SHIFT == (x / 255 - mean) / std, per channel (one fused multiply-add).
_PIX_SCALE = (1.0 / (255.0 * np.asarray(IMAGE_STD, np.float32))).astype(np.float32)
_PIX_SHIFT = (np.asarray(IMAGE_MEAN, np.float32) / np.asarray(IMAGE_STD, np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------- image
def normalize_pixels(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) normalised with IMAGE_MEAN / IMAGE_STD
    (written into `out` when given)."""
    chw = np.ascontiguousarray(np.moveaxis(rgb, -1, -3))  # transpose the small uint8 array
    out = np.multiply(chw, _PIX_SCALE[:, None, None], dtype=np.float32, out=out)
    out -= _PIX_SHIFT[:, None, None]
    return out


def denormalize_pixels(chw: np.ndarray) -> np.ndarray:
    """Inverse of normalize_pixels for display: float32 (3, H, W) -> uint8 (H, W, 3)."""
    hwc = np.moveaxis(np.asarray(chw, np.float32), -3, -1)
    return np.clip((hwc + _PIX_SHIFT) / _PIX_SCALE, 0, 255).round().astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (not dropped to black)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit greyscale (PNG 16-bit opens as I;16 or I): scale 0..65535 to 0..255.
        grey = np.clip(np.asarray(im, dtype=np.float32) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def resize_crop_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to `size`, keeping the aspect ratio."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop an (H, W, ...) array to (size, size, ...)."""
    h, w = arr.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def decode_image(data: bytes, spec: InputSpec, limits: DecodeLimits = DEFAULT_LIMITS,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Image bytes (jpg/png/webp/...) -> float32 (3, image_size, image_size)."""
    if not data:
        raise DecodeError("empty", "zero-byte image")
    size = spec.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
        width, height = im.size
        if width * height > limits.max_image_pixels:
            raise DecodeError("too_many_pixels", f"{width}x{height} > {limits.max_image_pixels} pixels")
        im.draft(None, (size, size))  # JPEG: decode at a reduced scale that still covers `size`
        im.load()
        im = to_rgb(im)
        if im.size != (size, size):
            im = im.resize(resize_crop_size(*im.size, size), Image.Resampling.BICUBIC)
        rgb = center_crop(np.asarray(im, dtype=np.uint8), size)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", str(exc)) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise DecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return normalize_pixels(rgb, out)


# ----------------------------------------------------------------------------- text
@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """open_clip's CLIP BPE tokenizer, built once per process (its vocabulary ships in the wheel).

    When open_clip is not imported yet, its tokenizer module is loaded on its own: importing the
    `open_clip` package also imports torchvision and every model definition (~6 s of CPU in each
    Ray worker here), and the tokenizer needs none of it (same file, same vocabulary, same ids).

    Its word cache is bounded: SimpleTokenizer memoises every word it ever saw in a dict that never
    shrinks, so a stream of distinct words (random strings sent to a server) grew a process by about
    1.2 MB per request. Here its dict keeps only the special tokens, and an LRU of `bpe.cache_parameters()
    ["maxsize"]` words of up to 64 bytes memoises the rest (longer words are rare and the costliest
    to keep); `bpe.cache_info()` reports its size. The ids are unchanged."""
    if "open_clip.tokenizer" in sys.modules:
        tokenizer = sys.modules["open_clip.tokenizer"].SimpleTokenizer()
    else:
        package = importlib.util.find_spec("open_clip")  # locates the package without importing it
        if package is None or not package.submodule_search_locations:
            raise ImportError("open_clip (open_clip_torch) is required for text tokenization")
        path = os.path.join(list(package.submodule_search_locations)[0], "tokenizer.py")
        spec = importlib.util.spec_from_file_location("_raybind_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tokenizer = module.SimpleTokenizer()

    class SpecialTokensOnly(dict):
        def __setitem__(self, key, value):  # bpe() stores each new word here: the LRU below does
            pass

    tokenizer.cache = SpecialTokensOnly(tokenizer.cache)
    compute = tokenizer.bpe
    cached = functools.lru_cache(maxsize=16384)(compute)  # ~10 MB at most with 64-byte words

    def bpe(token: str) -> str:
        return cached(token) if len(token) <= 64 else compute(token)

    bpe.cache_info, bpe.cache_parameters, bpe.cache_clear = cached.cache_info, cached.cache_parameters, cached.cache_clear
    tokenizer.bpe = bpe
    return tokenizer


def tokenize(texts: list[str] | tuple[str, ...], context_length: int,
             tokenizer: str = OPEN_CLIP_TOKENIZER) -> np.ndarray:
    """Captions -> int64 (N, context_length) token ids (zero padded; long ones end in EOT).

    `tokenizer` is `InputSpec.tokenizer`: open_clip's (the default), or a local Hugging Face tokenizer
    folder for a pretrained HF text tower (models/pretrained.py; padded with its pad id)."""
    if not texts:
        return np.zeros((0, context_length), np.int64)
    if tokenizer != OPEN_CLIP_TOKENIZER:
        from models.pretrained import hf_tokenize

        return hf_tokenize(list(texts), context_length, tokenizer)
    return get_tokenizer()(list(texts), context_length).numpy().astype(np.int64, copy=False)


def decode_text(data: bytes) -> str:
    """Caption bytes -> str (UTF-8; invalid bytes replaced, surrounding whitespace stripped)."""
    return data.decode("utf-8", errors="replace").strip()


# ----------------------------------------------------------------------------- containers
_DEMUXER_OF_EXT = {"mp4": "mp4", "m4a": "mp4", "webm": "matroska", "mkv": "matroska", "mp3": "mp3",
                   "ogg": "ogg", "flac": "flac", "wav": "wav"}


def open_container(data: bytes, ext: str):
    """PyAV input container; the extension's demuxer is tried first (skips format probing, ~0.2 ms),
    then probing, for files whose extension does not match their content."""
    import av

    demuxer = _DEMUXER_OF_EXT.get(ext.lower())
    if demuxer is not None:
        try:
            return av.open(io.BytesIO(data), mode="r", format=demuxer)
        except Exception:  # wrong demuxer for these bytes: let FFmpeg probe
            pass
    return av.open(io.BytesIO(data), mode="r")


# ----------------------------------------------------------------------------- audio
def _check_duration(seconds: float | None, limits: DecodeLimits) -> None:
    if seconds is not None and seconds > limits.max_audio_seconds:
        raise DecodeError("audio_too_long", f"{seconds:.1f} s > {limits.max_audio_seconds} s")


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) of a 1-D float32 waveform."""
    if rate == target or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(wave, target // g, int(rate) // g).astype(np.float32)


def _read_soundfile(data: bytes, ext: str, audio: AudioSpec, limits: DecodeLimits) -> np.ndarray:
    """Mono waveform at audio.sample_rate; only the centre window that the clip needs is read."""
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, frames = f.samplerate, f.frames
        _check_duration(frames / rate if rate else None, limits)
        need = math.ceil(audio.clip_seconds * rate) + 64  # a little slack for the resampler's edges
        if 0 < need < frames:
            f.seek((frames - need) // 2)
        x = f.read(min(need, frames) if frames > 0 else -1, dtype="float32", always_2d=True)
    return resample(x.mean(axis=1), rate, audio.sample_rate)


def _read_pyav(data: bytes, ext: str, audio: AudioSpec, limits: DecodeLimits) -> np.ndarray:
    """Mono waveform at audio.sample_rate through FFmpeg (m4a/aac, mp3, opus, ...)."""
    import av

    with open_container(data, ext) as container:
        if not container.streams.audio:
            raise DecodeError("corrupt_audio", "no audio stream")
        stream = container.streams.audio[0]
        stream.codec_context.thread_count = 1
        if stream.duration is not None and stream.time_base is not None:
            _check_duration(float(stream.duration * stream.time_base), limits)
        elif container.duration is not None:
            _check_duration(container.duration / 1e6, limits)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=audio.sample_rate)
        chunks, total = [], 0
        max_samples = limits.max_audio_seconds * audio.sample_rate
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                total += chunks[-1].size
            if total > max_samples:  # the header did not tell; stop as soon as we know
                _check_duration(total / audio.sample_rate, limits)
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def load_waveform(data: bytes, ext: str, audio: AudioSpec, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Audio bytes -> mono float32 waveform at audio.sample_rate (at least the centre clip of it)."""
    if not data:
        raise DecodeError("empty", "zero-byte audio")
    errors = []
    readers = (_read_soundfile, _read_pyav) if ext.lower() in _SOUNDFILE_EXTS else (_read_pyav,)
    for read in readers:
        try:
            return read(data, ext, audio, limits)
        except DecodeError as exc:
            if exc.reason != "corrupt_audio":
                raise
            errors.append(exc.detail)
        except Exception as exc:  # soundfile: LibsndfileError/RuntimeError; av: av.error.*
            errors.append(f"{read.__name__}: {type(exc).__name__}: {exc}")
    raise DecodeError("corrupt_audio", "; ".join(errors))


def center_clip(wave: np.ndarray, length: int) -> np.ndarray:
    """The centre `length` samples; shorter input is zero-padded at the end."""
    if wave.size >= length:
        start = (wave.size - length) // 2
        return wave[start:start + length]
    return np.pad(wave, (0, length - wave.size))


@functools.lru_cache(maxsize=8)
def mel_filter_bank(sample_rate: int, n_fft: int, n_mels: int):
    """HTK-mel triangular filters over 0..sr/2 as a torch tensor (n_mels, n_fft // 2 + 1)."""
    import torch

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (fft_freqs[None] - lower) / (center - lower)
    down = (upper - fft_freqs[None]) / (upper - center)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)).astype(np.float32))


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int):
    import torch

    return torch.hann_window(n_fft, periodic=True)


def log_mel(clip: np.ndarray, audio: AudioSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Mono clip -> float32 (1, n_mels, num_frames) log-mel, normalised per spectrogram (written
    into `out` when given)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    spec = torch.stft(x, audio.n_fft, audio.hop_length, audio.n_fft, _hann(audio.n_fft),
                      center=True, pad_mode="constant", return_complex=True)
    power = (spec * spec.conj()).real  # |X|^2; 7x faster here than spec.abs().square()
    mel = mel_filter_bank(audio.sample_rate, audio.n_fft, audio.n_mels) @ power
    mel = torch.log(mel + 1e-6)[:, :audio.num_frames]
    if mel.shape[1] < audio.num_frames:
        mel = torch.nn.functional.pad(mel, (0, audio.num_frames - mel.shape[1]), value=math.log(1e-6))
    # std floored at 0.1 (real clips have std of several units): silence stays zeros, not noise.
    mean, std = mel.mean(), mel.std().clamp(min=0.1)
    if out is None:
        return ((mel - mean) / std).unsqueeze(0).numpy()
    torch.sub(mel, mean, out=torch.from_numpy(out)[0]).div_(std)
    return out


def decode_audio(data: bytes, ext: str, spec: InputSpec, limits: DecodeLimits = DEFAULT_LIMITS,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Audio bytes -> float32 (1, n_mels, num_frames) log-mel of the centre clip."""
    wave = load_waveform(data, ext, spec.audio, limits)
    return log_mel(center_clip(wave, spec.audio.clip_samples), spec.audio, out)


# ----------------------------------------------------------------------------- video
def frame_indices(num_available: int, num_wanted: int) -> np.ndarray:
    """Uniform sampling; with fewer frames than wanted, frames repeat (nothing is dropped)."""
    return np.floor((np.arange(num_wanted) + 0.5) * num_available / num_wanted).astype(np.int64)


_local = threading.local()


def _reformatter():
    """One swscale reformatter per thread: `frame.reformat` builds a new scaler context per frame,
    which cost ~1.7 ms per 64x64 frame here (10x the decode itself); a reused one caches it."""
    if not hasattr(_local, "reformatter"):
        from av.video.reformatter import VideoReformatter

        _local.reformatter = VideoReformatter()
    return _local.reformatter


def _frame_rgb(frame, size: int) -> np.ndarray:
    """A PyAV frame -> uint8 (size, size, 3): shorter side scaled by swscale, then centre-cropped."""
    w, h = resize_crop_size(frame.width, frame.height, size)
    rgb = _reformatter().reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
    return center_crop(rgb.to_ndarray(), size)


def _video_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def _expected_frames(container, stream) -> int:
    """Frame count from metadata (0 when the container does not say, e.g. some webm/mkv)."""
    if stream.frames:
        return int(stream.frames)
    duration, rate = _video_duration(container, stream), stream.average_rate
    return int(round(duration * float(rate))) if duration and rate else 0


def _sample_frames(container, stream, spec: InputSpec, limits: DecodeLimits) -> list[np.ndarray]:
    """Decode sequentially; convert only the frames that will be kept when the count is known."""
    expected = _expected_frames(container, stream)
    wanted = set(frame_indices(expected, spec.video_frames).tolist()) if expected else None
    kept: dict[int, np.ndarray] = {}
    count = 0
    for frame in container.decode(stream):
        if frame.time is not None and frame.time > limits.max_video_seconds:
            raise DecodeError("video_too_long", f"frame at {frame.time:.1f} s > {limits.max_video_seconds} s")
        if wanted is None or count in wanted:
            kept[count] = _frame_rgb(frame, spec.video_size)
        count += 1
    if not kept:
        raise DecodeError("corrupt_video", "no decodable frames")
    # Sample over the frames actually decoded: the metadata count can be wrong (then nearest kept).
    return _nearest(kept, frame_indices(count, spec.video_frames))


def _nearest(kept: dict[int, np.ndarray], indices: np.ndarray) -> list[np.ndarray]:
    """For each wanted index, the kept frame with the nearest index (metadata said another count)."""
    have = np.asarray(sorted(kept))
    return [kept[int(have[np.abs(have - i).argmin()])] for i in indices]


def decode_video(data: bytes, ext: str, spec: InputSpec, limits: DecodeLimits = DEFAULT_LIMITS,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Video bytes (mp4/webm/mkv) -> float32 (video_frames, 3, video_size, video_size)."""

    if not data:
        raise DecodeError("empty", "zero-byte video")
    try:
        with open_container(data, ext) as container:
            if not container.streams.video:
                raise DecodeError("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            # One decoder thread: parallelism comes from decoding many samples at once; FFmpeg's
            # frame threads only add hand-offs (and stalls when the cores are all busy).
            stream.codec_context.thread_count = 1
            duration = _video_duration(container, stream)
            if duration is not None and duration > limits.max_video_seconds:
                raise DecodeError("video_too_long", f"{duration:.1f} s > {limits.max_video_seconds} s")
            frames = _sample_frames(container, stream, spec, limits)
    except DecodeError:
        raise
    except Exception as exc:  # av.error.InvalidDataError, EOFError, ValueError, ...
        raise DecodeError("corrupt_video", f"{type(exc).__name__}: {exc}") from None
    return normalize_pixels(np.stack(frames), out)


# ----------------------------------------------------------------------------- samples
class Decoded(NamedTuple):
    """decode_sample's result: `sample` is None when the sample is skipped (`skip_reason` says why);
    `dropped` maps modality -> reason for members dropped under on_error="drop_modality"."""

    sample: dict[str, Any] | None
    skip_reason: str | None
    dropped: dict[str, str]


def find_member(members: dict[str, bytes], modality: str) -> tuple[str, bytes] | None:
    """(ext, bytes) of the sample's member for `modality`, by extension preference; None if absent."""
    for ext in EXTS_OF[modality]:
        if ext in members:
            return ext, members[ext]
    return None


def decode_member(modality: str, ext: str, data: bytes, spec: InputSpec, limits: DecodeLimits,
                  out: np.ndarray | None = None) -> np.ndarray:
    """One member -> its model input array (text: token ids of the caption), in `out` when given."""
    if len(data) > limits.max_member_bytes:
        raise DecodeError("too_large", f"{ext} member of {len(data)} bytes > {limits.max_member_bytes}")
    if modality == "image":
        return decode_image(data, spec, limits, out)
    if modality == "text":
        ids = tokenize([decode_text(data)], spec.context_length, spec.tokenizer)[0]
        if out is None:
            return ids
        out[...] = ids
        return out
    if modality == "audio":
        return decode_audio(data, ext, spec, limits, out)
    if modality == "video":
        return decode_video(data, ext, spec, limits, out)
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def parse_json(data: bytes | None) -> dict:
    """The sample's .json labels ({} when absent); DecodeError('corrupt_json') if not a JSON object."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("corrupt_json", str(exc)) from None
    if not isinstance(meta, dict):
        raise DecodeError("corrupt_json", f"expected an object, got {type(meta).__name__}")
    return meta


def label_value(meta: dict, field: str) -> str:
    value = meta.get(field)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def decode_sample(members: dict[str, bytes], modalities: tuple[str, ...] | list[str], spec: InputSpec,
                  limits: DecodeLimits = DEFAULT_LIMITS, label_fields: tuple[str, ...] = (),
                  on_error: str = "skip_sample", key: str = "", meta: dict | None = None,
                  out: dict[str, np.ndarray] | None = None) -> Decoded:
    """All members of one sample (ext -> bytes) -> one row of the decoded-batch contract.

    Policy: a modality without a member is not an error (zeros + `<modality>_mask` False). A member
    of a requested modality that fails to decode skips the WHOLE sample (on_error="skip_sample",
    the default: a half-broken sample is usually a broken download) or, with on_error=
    "drop_modality", is treated as absent and reported in `dropped`. A corrupt .json always skips.
    `meta` is the already-parsed .json when the caller has it (the reader parses it to filter splits).
    `out` maps modalities to writable arrays of their shape (a row of the caller's block): each
    modality is decoded into its array (zeros when absent) and the row holds that array. A skipped
    sample may leave them half written.
    """
    try:
        meta = parse_json(members.get("json")) if meta is None else meta
    except DecodeError as exc:
        return Decoded(None, exc.reason, {})
    txt = members.get("txt")
    caption = decode_text(txt) if txt is not None else str(meta.get("caption", ""))
    row: dict[str, Any] = {"key": key or str(meta.get("key", "")), "caption": caption}
    dropped: dict[str, str] = {}
    for modality in modalities:
        found = find_member(members, modality)
        slot = out.get(modality) if out is not None else None
        array = None
        if found is not None:
            try:
                array = decode_member(modality, found[0], found[1], spec, limits, slot)
            except DecodeError as exc:
                if on_error != "drop_modality":
                    return Decoded(None, exc.reason, {})
                dropped[modality] = exc.reason
        row[f"{modality}_mask"] = array is not None
        if array is None and slot is not None:
            slot.fill(0)
            array = slot
        row[modality] = array if array is not None else zeros_for(modality, spec)
    for field in label_fields:
        row[field] = label_value(meta, field)
    return Decoded(row, None, dropped)


@functools.lru_cache(maxsize=32)
def _zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    z = np.zeros(shape, dtype)
    z.setflags(write=False)  # shared by every absent member: must never be written
    return z


def zeros_for(modality: str, spec: InputSpec) -> np.ndarray:
    return _zeros(spec.shape(modality), "int64" if modality == "text" else "float32")


def stack_samples(rows: list[dict[str, Any]], modalities: tuple[str, ...] | list[str], spec: InputSpec,
                  label_fields: tuple[str, ...] = (), stacked: dict[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
    """Decoded rows -> one batch (dict of numpy arrays) in the decoded-batch contract. `stacked`
    holds modality columns that already are (len(rows), ...) arrays (rows decoded into them with
    `out=`): they are used as they are, not stacked again."""
    batch: dict[str, np.ndarray] = {
        "key": np.asarray([r["key"] for r in rows], dtype=object),
        "caption": np.asarray([r["caption"] for r in rows], dtype=object),
    }
    for modality in modalities:
        dtype = np.int64 if modality == "text" else np.float32
        if stacked is not None and modality in stacked:
            batch[modality] = stacked[modality]
        elif rows:
            batch[modality] = np.stack([r[modality] for r in rows]).astype(dtype, copy=False)
        else:
            batch[modality] = np.zeros((0, *spec.shape(modality)), dtype)
        batch[f"{modality}_mask"] = np.asarray([r[f"{modality}_mask"] for r in rows], dtype=bool)
    for field in label_fields:
        batch[field] = np.asarray([r[field] for r in rows], dtype=object)
    return batch
