"""Header checks the shared decoders do not make, for bytes from the open internet: a few KB of
hostile container can claim frames or sample layouts whose decoded size is gigabytes.

- video: frame width x height must be within max_image_pixels (one frame of a 16k x 16k stream is
  ~400 MB of YUV before any resize);
- audio: at most MAX_CHANNELS channels and MAX_SAMPLE_RATE Hz (the decoder reads a 2 s window of
  every channel as float32 before mixing: 1,000 channels at 384 kHz would be 3 GB).
Both read headers only (PyAV / libsndfile), so checking costs well under a millisecond.
"""

from __future__ import annotations

import io

from models.decode import DecodeError, DecodeLimits, open_container

MAX_CHANNELS = 8
MAX_SAMPLE_RATE = 192_000


def check_video(data: bytes, ext: str, limits: DecodeLimits) -> None:
    try:
        with open_container(data, ext) as container:
            streams = container.streams.video
            if streams:
                ctx = streams[0].codec_context
                pixels = int(ctx.width or 0) * int(ctx.height or 0)
                if pixels > limits.max_image_pixels:
                    raise DecodeError("too_many_pixels", f"video frames of {ctx.width}x{ctx.height} > "
                                      f"{limits.max_image_pixels} pixels")
    except DecodeError:
        raise
    except Exception:  # unreadable header: the decoder reports it with its own reason
        return


def check_audio(data: bytes, ext: str) -> None:
    channels, rate = _soundfile_layout(data)
    if channels is None:
        channels, rate = _pyav_layout(data, ext)
    if channels is not None and channels > MAX_CHANNELS:
        raise DecodeError("corrupt_audio", f"{channels} channels > {MAX_CHANNELS} supported")
    if rate is not None and rate > MAX_SAMPLE_RATE:
        raise DecodeError("corrupt_audio", f"{rate} Hz > {MAX_SAMPLE_RATE} Hz supported")


def _soundfile_layout(data: bytes) -> tuple[int | None, int | None]:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        return int(info.channels), int(info.samplerate)
    except Exception:
        return None, None


def _pyav_layout(data: bytes, ext: str) -> tuple[int | None, int | None]:
    try:
        with open_container(data, ext) as container:
            if not container.streams.audio:
                return None, None
            stream = container.streams.audio[0]
            return int(stream.channels or 0), int(stream.sample_rate or 0)
    except Exception:
        return None, None


def check(modality: str, data: bytes, ext: str, limits: DecodeLimits) -> None:
    """Raise DecodeError when the headers promise more than serving will decode."""
    if modality == "video":
        check_video(data, ext, limits)
    elif modality == "audio":
        check_audio(data, ext)
