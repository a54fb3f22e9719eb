"""Media encoders for writing shards: JPEG, H.264 mp4 and PCM audio, deterministic byte for byte."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mp4(frames: list[Image.Image], fps: int) -> bytes:
    """H.264 mp4, single-threaded so the bytes are the same on every run."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "20", "preset": "veryfast", "tune": "zerolatency"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """16-bit PCM in a WAV / FLAC / OGG container."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()
