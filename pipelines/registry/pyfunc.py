"""The MLflow pyfunc flavour of a registered BindingModel ("model from code": MLflow stores this
file, not a pickled object). Input: a DataFrame with any of the columns `text` (a caption),
`image`, `audio`, `video` (base64 of the file's bytes; audio/video also need `*_ext`, default wav /
mp4). Output: one L2-normalised embedding per row and column present, as columns `<modality>_embedding`.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model

from models import decode
from models.checkpoint import load_model
from models.spec import MODALITIES

PIP_REQUIREMENTS = ["torch==2.14.1", "open_clip_torch==3.3.0", "safetensors", "pillow", "av==18.1.0",
                    "soundfile==0.14.0", "numpy==2.4.6", "pandas==3.1.1"]
MEDIA_EXT = {"image": "jpg", "audio": "wav", "video": "mp4"}


def decode_column(modality: str, values, exts, spec) -> np.ndarray:
    if modality == "text":
        return decode.tokenize([str(v) for v in values], spec.context_length, spec.tokenizer)
    rows = []
    for value, ext in zip(values, exts, strict=True):
        data = base64.b64decode(value)
        if modality == "image":
            rows.append(decode.decode_image(data, spec))
        elif modality == "audio":
            rows.append(decode.decode_audio(data, ext, spec))
        else:
            rows.append(decode.decode_video(data, ext, spec))
    return np.stack(rows)


def embed_frame(model, frame) -> dict[str, list]:
    import torch

    spec = model.config.inputs
    out = {}
    for modality in MODALITIES:
        if modality not in frame.columns:
            continue
        exts = frame.get(f"{modality}_ext", [MEDIA_EXT.get(modality, "")] * len(frame))
        inputs = torch.as_tensor(decode_column(modality, list(frame[modality]), list(exts), spec))
        with torch.no_grad():
            out[f"{modality}_embedding"] = model.encode(modality, inputs).float().numpy().tolist()
    return out


class BindingPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model = load_model(context.artifacts["binding"]).eval()

    # A DataFrame in, a DataFrame out. The hint is one MLflow knows it cannot infer a schema from,
    # so it keeps the explicit signature (signature() below) and stops asking for hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame(embed_frame(self.model, model_input))


def input_example():
    return pd.DataFrame({"text": ["a small red circle moving left, with a low steady hum"]})


def signature(model_dir: str):
    """Input: optional text / media columns; output: embedding columns (lists of floats)."""
    from mlflow.models import infer_signature

    example = input_example()
    output = embed_frame(load_model(model_dir).eval(), example)
    return infer_signature(example, pd.DataFrame(output))


set_model(BindingPyfunc())
