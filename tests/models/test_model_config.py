"""Model configs: the shipped registry validates, round-trips, and bad configs name the bad field.

(Named test_model_config.py, not test_config.py: tests/pipelines/test_config.py already owns that
module name under pytest's default import mode.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from models.config import CONFIG_DIR, ModelConfig, TowerConfig, VideoTowerConfig, available_models
from models.spec import InputSpec


def _tiny_dict() -> dict:
    return ModelConfig.from_name("tiny").to_dict()


def test_registry_lists_the_shipped_sizes():
    assert {"tiny", "small", "base"} <= set(available_models())
    assert available_models() == sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@pytest.mark.parametrize("name", available_models())
def test_every_shipped_config_validates_and_round_trips(name):
    config = ModelConfig.from_name(name)
    assert config.name == name
    assert config == ModelConfig.from_file(CONFIG_DIR / f"{name}.json")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.modalities == ("image", "text", "audio", "video")
    for modality in config.modalities:
        assert all(d > 0 for d in config.inputs.shape(modality))


def test_base_is_vit_b16_class():
    base = ModelConfig.from_name("base")
    assert (base.image.width, base.image.layers, base.image.heads, base.image.patch_size) == (768, 12, 12, 16)
    assert base.inputs.image_size == 224 and base.text.width == 512


def test_tiny_twin_keeps_architecture_and_shrinks_towers():
    for name in available_models():
        config = ModelConfig.from_name(name)
        twin = config.tiny_twin()
        assert twin.inputs == config.inputs and twin.embed_dim == config.embed_dim
        assert twin.modalities == config.modalities
        assert twin.video.share_image_tower == config.video.share_image_tower
        assert twin.image.patch_size == config.image.patch_size
        assert max(t.width for t in (twin.image, twin.text, twin.audio)) == 32
        assert twin.name == f"{name}-twin"


def test_configs_are_frozen():
    config = ModelConfig.from_name("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.embed_dim = 3  # type: ignore[misc]


@pytest.mark.parametrize("patch, field", [
    ({"bogus": 1}, "bogus"),
    ({"image": {"width": 96, "layers": 3, "heads": 4, "patch_size": 8, "depth": 2}}, "image.depth"),
    ({"inputs": {"audio": {"mels": 64}}}, "inputs.audio.mels"),
    ({"video": {"share_image_tower": True, "temporal_layer": 1}}, "video.temporal_layer"),
])
def test_unknown_keys_name_the_field(patch, field):
    with pytest.raises(ValueError, match=rf"^{field}: unknown field"):
        ModelConfig.from_dict({**_tiny_dict(), **patch})


SHARED = {"share_image_tower": True, "temporal_layers": 1}  # video frames through the image tower


@pytest.mark.parametrize("patch, field", [
    ({"embed_dim": 0}, "embed_dim"),
    ({"embed_dim": True}, "embed_dim"),
    ({"embed_dim": "64"}, "embed_dim"),
    ({"projection": "conv"}, "projection"),
    ({"max_logit_scale": -1.0}, "max_logit_scale"),
    ({"init_logit_scale": 9.0}, "init_logit_scale"),
    ({"image": {"width": 96, "layers": 3, "heads": 5, "patch_size": 8}}, "image.heads"),
    ({"image": {"width": 96, "layers": 0, "heads": 4, "patch_size": 8}}, "image.layers"),
    ({"image": {"width": 96, "layers": 3, "heads": 4, "patch_size": 7}}, "image.patch_size"),
    ({"image": {"width": 96, "layers": 3, "heads": 4}}, "image.patch_size"),
    ({"audio": {"width": 64, "layers": 2, "heads": 4, "patch_size": 999}}, "audio.patch_size"),
    ({"inputs": {"image_size": 64, "video_size": 32}, "video": SHARED}, "inputs.video_size"),
    ({"inputs": {"context_length": -3}}, "inputs.context_length"),
    ({"video": {"share_image_tower": False}}, "video.frame"),
    ({"video": {"share_image_tower": True, "temporal_layers": -1}}, "video.temporal_layers"),
    ({"image": None, "video": SHARED}, "video.share_image_tower"),
])
def test_bad_values_name_the_field(patch, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ModelConfig.from_dict({**_tiny_dict(), **patch})


def test_missing_required_field_is_reported():
    data = _tiny_dict()
    del data["image"]["width"]
    with pytest.raises(ValueError, match="image.*width"):
        ModelConfig.from_dict(data)


def test_unknown_name_lists_registered_sizes():
    with pytest.raises(ValueError, match="registered: .*tiny"):
        ModelConfig.from_name("huge")


def test_from_file_rejects_bad_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(path)


def test_optional_towers_and_own_video_tower():
    frame = TowerConfig(width=32, layers=1, heads=2, patch_size=16)
    config = ModelConfig(name="av", embed_dim=16, inputs=InputSpec(video_size=32),
                         audio=TowerConfig(width=32, layers=1, heads=2, patch_size=16),
                         video=VideoTowerConfig(share_image_tower=False, frame=frame, temporal_layers=0))
    assert config.modalities == ("audio", "video")
    assert ModelConfig.from_dict(config.to_dict()) == config
