"""Decoders on odd-but-valid and broken inputs, all generated here (PIL, soundfile, PyAV)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models import decode as D
from models.spec import IMAGE_MEAN, IMAGE_STD, MODALITIES, AudioSpec, InputSpec

SPEC = InputSpec(image_size=32, context_length=16, audio=AudioSpec(clip_seconds=1.0), video_frames=8,
                 video_size=32)


# ----------------------------------------------------------------------------- media makers
def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and that has no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def tone(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def sf_bytes(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def m4a_bytes(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        stream = c.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, len(wave), frame_size):
            chunk = wave[start:start + frame_size][None].astype(np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return buf.getvalue()


def video_bytes(levels: list[int], fmt: str = "mp4", codec: str = "libx264", size=(48, 32), fps: int = 8,
                with_audio: bool = False) -> bytes:
    """One solid grey frame per level (so tests can tell which frames were sampled)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        stream = c.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "ultrafast"}
        audio = c.add_stream("aac", rate=16000) if with_audio else None
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
        if audio is not None:
            samples = tone(440, len(levels) / fps, 16000)[None]
            frame = av.AudioFrame.from_ndarray(samples[:, :1024], format="flt", layout="mono")
            frame.sample_rate = 16000
            for packet in list(audio.encode(frame)) + list(audio.encode()):
                c.mux(packet)
    return buf.getvalue()


def grey_value(level: float) -> np.ndarray:
    return (level / 255.0 - np.asarray(IMAGE_MEAN)) / np.asarray(IMAGE_STD)


# ----------------------------------------------------------------------------- image
@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("L", "PNG"),
                                      ("P", "PNG"), ("1", "PNG"), ("RGB", "WEBP"), ("I;16", "PNG")])
def test_image_modes_decode_to_normalised_rgb(mode, fmt):
    im = Image.new("RGB", (80, 40), (128, 128, 128)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((40, 80), 128 * 257, np.uint16))
    out = D.decode_image(image_bytes(im, fmt), SPEC)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    if mode not in ("1", "CMYK"):  # 1-bit is dithered; PIL's CMYK->RGB is naive
        np.testing.assert_allclose(out.mean(axis=(1, 2)), grey_value(128), atol=0.05)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    if mode == "P":
        im = Image.new("P", (40, 40), 0)
        im.putpalette([255, 0, 0] * 256)
        im.info["transparency"] = 0
        data = image_bytes(im, "PNG", transparency=0)
    else:
        data = image_bytes(im.convert(mode), "PNG")
    out = D.decode_image(data, SPEC)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), grey_value(255), atol=1e-3)


def test_image_resize_keeps_aspect_and_crops_the_centre():
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, 50:70] = 255  # a white band in the middle: 16 px wide after scaling 40 -> 32 rows
    out = D.denormalize_pixels(D.decode_image(image_bytes(Image.fromarray(arr), "PNG"), SPEC))
    assert out.shape == (32, 32, 3)
    assert out[:, 10:22].mean() > 250 and out[:, :6].mean() < 5 and out[:, -6:].mean() < 5


def test_image_failures_have_reasons():
    good = image_bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    cases = {"empty": b"", "corrupt_image": good[: len(good) // 2]}
    for reason, data in cases.items():
        with pytest.raises(D.DecodeError) as err:
            D.decode_image(data, SPEC)
        assert err.value.reason == reason
    with pytest.raises(D.DecodeError, match="corrupt_image"):
        D.decode_image(b"not an image at all", SPEC)


def test_pixel_limit_is_checked_from_the_header():
    # 9000 x 5000 = 45 M pixels > the 40 M default; the file has no pixel data, so only a
    # header check can give too_many_pixels (a full decode would fail as corrupt).
    with pytest.raises(D.DecodeError) as err:
        D.decode_image(png_header_only(9000, 5000), SPEC)
    assert err.value.reason == "too_many_pixels"
    small = image_bytes(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(D.DecodeError, match="too_many_pixels"):
        D.decode_image(small, SPEC, D.DecodeLimits(max_image_pixels=1000))
    with pytest.raises(D.DecodeError, match="too_many_pixels"):  # beyond PIL's own bomb limit too
        D.decode_image(png_header_only(30000, 30000), SPEC)


# ----------------------------------------------------------------------------- text
def test_tokenize_unicode_empty_and_long_captions():
    texts = ["a red circle", "", "ünïcödé 日本語 🎉 café", "word " * 200]
    ids = D.tokenize(texts, 16)
    assert ids.shape == (4, 16) and ids.dtype == np.int64
    sot, eot = ids[0, 0], ids[1, 1]
    assert (ids[:, 0] == sot).all()
    assert ids[1, 1] == eot and (ids[1, 2:] == 0).all()  # empty caption: [SOT, EOT, 0...]
    assert ids[2, 1:].any()
    assert ids[3, -1] == eot and (ids[3] != 0).all()  # truncated, EOT kept last
    assert D.tokenize([], 16).shape == (0, 16)


def test_tokenizer_matches_open_clip():
    import open_clip

    texts = ["A small red circle drifting left, with a low hum", "ünïcödé", ""]
    expected = open_clip.get_tokenizer("ViT-B-32")(texts, 16).numpy()
    np.testing.assert_array_equal(D.tokenize(texts, 16), expected)


def test_decode_text_replaces_bad_utf8_and_strips():
    assert D.decode_text("  café \n".encode()) == "café"
    assert D.decode_text(b"ok \xff\xfe") == "ok \ufffd\ufffd"
    assert D.decode_text(b"") == ""


# ----------------------------------------------------------------------------- audio
def peak_mel_bin(data: bytes, ext: str) -> int:
    mel = D.decode_audio(data, ext, SPEC)
    assert mel.shape == (1, 128, SPEC.audio.num_frames) and mel.dtype == np.float32
    assert np.isfinite(mel).all()
    return int(mel[0].mean(axis=1).argmax())


def test_audio_rates_channels_and_formats_agree_on_pitch():
    reference = peak_mel_bin(sf_bytes(tone(1000, 1.5, 16000), 16000, "WAV"), "wav")
    variants = {
        "stereo 44.1 kHz wav": (sf_bytes(tone(1000, 1.5, 44100, channels=2), 44100, "WAV"), "wav"),
        "8 kHz wav": (sf_bytes(tone(1000, 1.5, 8000), 8000, "WAV"), "wav"),
        "flac 22.05 kHz": (sf_bytes(tone(1000, 1.5, 22050), 22050, "FLAC"), "flac"),
        "ogg vorbis": (sf_bytes(tone(1000, 1.5, 16000), 16000, "OGG", "VORBIS"), "ogg"),
        "mp3 44.1 kHz": (sf_bytes(tone(1000, 1.5, 44100), 44100, "MP3", "MPEG_LAYER_III"), "mp3"),
        "m4a (aac via PyAV)": (m4a_bytes(tone(1000, 1.5, 16000), 16000), "m4a"),
    }
    for name, (data, ext) in variants.items():
        assert abs(peak_mel_bin(data, ext) - reference) <= 1, name


def test_short_audio_is_padded_long_audio_centre_clipped():
    wave = D.load_waveform(sf_bytes(tone(440, 0.25, 16000), 16000, "WAV"), "wav", SPEC.audio)
    clip = D.center_clip(wave, SPEC.audio.clip_samples)
    assert clip.shape == (16000,) and not clip[5000:].any()
    # 10 s: 3 s of 300 Hz, 4 s of 2 kHz, 3 s of 300 Hz -> the centre second is 2 kHz
    long = np.concatenate([tone(300, 3, 16000), tone(2000, 4, 16000), tone(300, 3, 16000)])
    centre = peak_mel_bin(sf_bytes(long, 16000, "WAV"), "wav")
    assert centre == peak_mel_bin(sf_bytes(tone(2000, 1, 16000), 16000, "WAV"), "wav")


def test_silence_gives_zeros_not_nans():
    mel = D.decode_audio(sf_bytes(np.zeros(16000, np.float32), 16000, "WAV"), "wav", SPEC)
    assert np.isfinite(mel).all() and np.abs(mel).max() < 1e-3


def test_audio_failures_have_reasons():
    wav = sf_bytes(tone(440, 2.0, 16000), 16000, "WAV")
    for data, ext, reason in [(b"", "wav", "empty"), (b"RIFF garbage" * 10, "wav", "corrupt_audio"),
                              (b"\x00" * 500, "m4a", "corrupt_audio")]:
        with pytest.raises(D.DecodeError) as err:
            D.decode_audio(data, ext, SPEC)
        assert err.value.reason == reason
    short_limit = D.DecodeLimits(max_audio_seconds=1.0)
    with pytest.raises(D.DecodeError, match="audio_too_long"):
        D.decode_audio(wav, "wav", SPEC, short_limit)
    with pytest.raises(D.DecodeError, match="audio_too_long"):
        D.decode_audio(m4a_bytes(tone(440, 2.0, 16000), 16000), "m4a", SPEC, short_limit)


# ----------------------------------------------------------------------------- video
def frame_levels(video: np.ndarray) -> list[int]:
    return [int(round(D.denormalize_pixels(f).mean())) for f in video]


def test_video_samples_frames_uniformly():
    levels = list(range(20, 220, 5))  # 40 frames
    out = D.decode_video(video_bytes(levels), "mp4", SPEC)
    assert out.shape == (8, 3, 32, 32) and out.dtype == np.float32
    expected = [levels[i] for i in D.frame_indices(40, 8)]
    assert np.allclose(frame_levels(out), expected, atol=3)


def test_short_video_is_padded_by_repetition():
    out = D.decode_video(video_bytes([40, 120, 200]), "mp4", SPEC)
    assert out.shape[0] == 8
    assert np.allclose(frame_levels(out), [40, 40, 40, 120, 120, 200, 200, 200], atol=3)


@pytest.mark.parametrize("fmt,codec,ext", [("webm", "libvpx", "webm"), ("matroska", "libx264", "mkv"),
                                           ("mp4", "mpeg4", "mp4")])
def test_video_containers(fmt, codec, ext):
    out = D.decode_video(video_bytes([60, 90, 120, 150], fmt=fmt, codec=codec, size=(64, 48)), ext, SPEC)
    assert out.shape == (8, 3, 32, 32)
    assert np.allclose(frame_levels(out), [60, 60, 90, 90, 120, 120, 150, 150], atol=6)


def test_video_with_audio_track_and_non_square_frames():
    out = D.decode_video(video_bytes([100] * 10, size=(96, 32), with_audio=True), "mp4", SPEC)
    assert out.shape == (8, 3, 32, 32) and np.allclose(frame_levels(out), 100, atol=3)


def test_video_failures_have_reasons():
    good = video_bytes([50] * 16, fps=8)  # 2 s
    for data, reason in [(b"", "empty"), (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, "corrupt_video"),
                         (good[:200], "corrupt_video"), (sf_bytes(tone(440, 1, 16000), 16000, "WAV"), "corrupt_video")]:
        with pytest.raises(D.DecodeError) as err:
            D.decode_video(data, "mp4", SPEC)
        assert err.value.reason == reason
    with pytest.raises(D.DecodeError, match="video_too_long"):
        D.decode_video(good, "mp4", SPEC, D.DecodeLimits(max_video_seconds=1.0))


# ----------------------------------------------------------------------------- samples
def sample_members() -> dict[str, bytes]:
    return {
        "jpg": image_bytes(Image.new("RGB", (40, 40), (200, 30, 30)), "JPEG"),
        "txt": b"a red square",
        "wav": sf_bytes(tone(440, 1.0, 16000), 16000, "WAV"),
        "mp4": video_bytes([80] * 8),
        "json": json.dumps({"key": "000000007", "split": "train", "shape": "square", "n": 3}).encode(),
    }


def test_decode_sample_full_and_labels():
    res = D.decode_sample(sample_members(), MODALITIES, SPEC, label_fields=("shape", "n", "missing"),
                          key="000000007")
    assert res.skip_reason is None and res.dropped == {}
    row = res.sample
    for m in MODALITIES:
        assert row[m].shape == SPEC.shape(m) and row[f"{m}_mask"] is True
    assert row["caption"] == "a red square" and row["key"] == "000000007"
    assert (row["shape"], row["n"], row["missing"]) == ("square", "3", "")


def test_missing_modalities_are_zeros_with_mask_false():
    members = {k: v for k, v in sample_members().items() if k in ("jpg", "json")}
    row = D.decode_sample(members, MODALITIES, SPEC).sample
    assert row["image_mask"] and not (row["text_mask"] or row["audio_mask"] or row["video_mask"])
    assert not row["audio"].any() and row["text"].dtype == np.int64 and not row["text"].any()
    assert row["caption"] == ""  # no .txt and no caption in the json


def test_corrupt_member_skips_sample_or_drops_modality():
    members = sample_members()
    members["wav"] = b"garbage"
    res = D.decode_sample(members, MODALITIES, SPEC)
    assert res.sample is None and res.skip_reason == "corrupt_audio"
    res = D.decode_sample(members, MODALITIES, SPEC, on_error="drop_modality")
    assert res.sample["audio_mask"] is False and res.sample["image_mask"] is True
    assert res.dropped == {"audio": "corrupt_audio"}
    # a corrupt member of a modality that was not asked for does not matter
    assert D.decode_sample(members, ("image", "text"), SPEC).sample is not None


def test_member_size_limit_and_corrupt_json():
    members = sample_members()
    res = D.decode_sample(members, ("video",), SPEC, D.DecodeLimits(max_member_bytes=100))
    assert res.skip_reason == "too_large"
    members["json"] = b"{not json"
    assert D.decode_sample(members, ("image",), SPEC).skip_reason == "corrupt_json"
    members["json"] = b"[1, 2]"
    assert D.decode_sample(members, ("image",), SPEC).skip_reason == "corrupt_json"


def test_decode_sample_writes_into_given_arrays_exactly_as_it_decodes():
    members = sample_members()
    members["wav"] = b"garbage"  # dropped below: its array must be zeros, not what was there
    plain = D.decode_sample(members, MODALITIES, SPEC, on_error="drop_modality").sample
    out = {m: np.full(SPEC.shape(m), 7, np.int64 if m == "text" else np.float32) for m in MODALITIES}
    row = D.decode_sample(members, MODALITIES, SPEC, on_error="drop_modality", out=out).sample
    for m in MODALITIES:
        assert row[m] is out[m] and row[f"{m}_mask"] == plain[f"{m}_mask"]
        np.testing.assert_array_equal(out[m], plain[m], err_msg=m)
    assert row["image_mask"] and not row["audio_mask"] and not out["audio"].any()


def test_stack_samples_follows_the_batch_contract():
    full = D.decode_sample(sample_members(), MODALITIES, SPEC, label_fields=("shape",)).sample
    empty = D.decode_sample({"txt": b"only text"}, MODALITIES, SPEC, label_fields=("shape",)).sample
    batch = D.stack_samples([full, empty], MODALITIES, SPEC, ("shape",))
    assert batch["image"].shape == (2, *SPEC.shape("image")) and batch["image"].dtype == np.float32
    assert batch["text"].dtype == np.int64 and batch["video"].shape == (2, *SPEC.shape("video"))
    assert batch["audio_mask"].tolist() == [True, False] and batch["text_mask"].tolist() == [True, True]
    assert batch["caption"].tolist() == ["a red square", "only text"]
    assert batch["shape"].tolist() == ["square", ""]
    assert D.stack_samples([], MODALITIES, SPEC)["video"].shape == (0, *SPEC.shape("video"))


def test_decode_error_pickles_with_its_reason():
    import pickle

    err = pickle.loads(pickle.dumps(D.DecodeError("corrupt_video", "bad")))
    assert (err.reason, err.detail) == ("corrupt_video", "bad")
