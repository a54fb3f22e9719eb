"""What each modality's decoded input looks like: the contract between decoding and the encoders.

A model config carries one `InputSpec`; the reader and the serving endpoints decode with the
same spec, so a model always sees inputs shaped the way it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MODALITIES: tuple[str, ...] = ("image", "text", "audio", "video")

# CLIP's normalisation constants (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The default text tokenizer: open_clip's BPE, which ships in its wheel. Any other value of
# `InputSpec.tokenizer` names a local Hugging Face tokenizer folder (see models/pretrained.py).
OPEN_CLIP_TOKENIZER = "open_clip"


@dataclass(frozen=True)
class AudioSpec:
    """Log-mel input. Defaults follow ImageBind's audio front end (16 kHz, 128 mels, 25 ms / 10 ms)."""

    sample_rate: int = 16_000
    clip_seconds: float = 2.0
    n_mels: int = 128
    n_fft: int = 400  # 25 ms window at 16 kHz
    hop_length: int = 160  # 10 ms hop at 16 kHz

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def num_frames(self) -> int:
        """Frames per clip: the decoder pads / crops the spectrogram to exactly this many."""
        return self.clip_samples // self.hop_length


@dataclass(frozen=True)
class InputSpec:
    """Shapes of decoded inputs (batch dimension excluded):

    image: 3 x image_size x image_size float32, normalised with IMAGE_MEAN / IMAGE_STD
    text:  context_length int64 token ids from `tokenizer`: "open_clip" (the default), or a local
           Hugging Face tokenizer folder / `package:NAME/sub/folder` for a pretrained HF text tower
    audio: 1 x audio.n_mels x audio.num_frames float32 log-mel
    video: video_frames x 3 x video_size x video_size float32, normalised like images
    """

    image_size: int = 64
    context_length: int = 32
    audio: AudioSpec = field(default_factory=AudioSpec)
    video_frames: int = 8
    video_size: int = 64
    tokenizer: str = OPEN_CLIP_TOKENIZER

    def shape(self, modality: str) -> tuple[int, ...]:
        if modality == "image":
            return (3, self.image_size, self.image_size)
        if modality == "text":
            return (self.context_length,)
        if modality == "audio":
            return (1, self.audio.n_mels, self.audio.num_frames)
        if modality == "video":
            return (self.video_frames, 3, self.video_size, self.video_size)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        d = dict(d)
        audio = AudioSpec(**d.pop("audio", {}))
        return cls(audio=audio, **d)
