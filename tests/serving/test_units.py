"""Pure functions of the serving package: auth, base64 / format handling, settings, ranking, top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models.reference import ModelReferenceError, RegistryRef, parse_registry_ref
from serving import index_store
from serving.api import rank_labels, zero_shot_prompts
from serving.auth import TokenError, check_bearer, load_token
from serving.errors import ApiError, field_path
from serving.inputs import decode_base64, json_item, sniff_ext
from serving.model_source import ModelSourceError, resolve
from serving.schemas import ItemIn, ZeroShotOptions
from serving.settings import AppArgs, EmbedderConfig, Limits

TOKEN = "s3cret-token-of-enough-length"


def test_bearer_accepts_only_the_exact_token():
    check_bearer(f"Bearer {TOKEN}", TOKEN)
    check_bearer(f"bearer {TOKEN}", TOKEN)  # the scheme is case-insensitive (RFC 7235)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                   "Bearer ünïcödé"):
        with pytest.raises(ApiError) as err:
            check_bearer(header, TOKEN)
        assert err.value.status == 401 and err.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_from_file_env_and_refusals(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert load_token(str(path), "UNUSED_VAR") == TOKEN
    monkeypatch.setenv("RAYBIND_TEST_TOKEN", TOKEN)
    assert load_token("", "RAYBIND_TEST_TOKEN") == TOKEN
    monkeypatch.setenv("RAYBIND_TEST_TOKEN", "short")
    with pytest.raises(TokenError, match="at least"):
        load_token("", "RAYBIND_TEST_TOKEN")
    monkeypatch.delenv("RAYBIND_TEST_TOKEN")
    with pytest.raises(TokenError, match="no serving token"):
        load_token("", "RAYBIND_TEST_TOKEN")
    with pytest.raises(TokenError, match="cannot read"):
        load_token(str(tmp_path / "missing"), "RAYBIND_TEST_TOKEN")


def test_base64_strict_with_data_urls_and_line_breaks():
    limits = Limits()
    assert decode_base64("aGVsbG8=", "f", limits) == (b"hello", "")
    assert decode_base64("aGVs\nbG8=", "f", limits) == (b"hello", "")
    assert decode_base64("data:image/png;base64,aGVsbG8=", "f", limits) == (b"hello", "png")
    for bad in ("aGVsbG8", "a$b=", "data:image/png,aGVsbG8=", "data:;base64"):
        with pytest.raises(ApiError) as err:
            decode_base64(bad, "items[0].data", limits)
        assert err.value.status == 400 and err.value.field == "items[0].data"
    with pytest.raises(ApiError) as err:
        decode_base64("A" * 400, "f", Limits(max_item_bytes=100))
    assert err.value.status == 413


def test_json_items_name_the_field():
    limits = Limits(max_text_chars=10)
    assert json_item(ItemIn(modality="text", text="hi"), "items[0]", limits).text == "hi"
    cases = [(ItemIn(modality="text"), 422, "items[0].text"),
             (ItemIn(modality="text", text="   "), 422, "items[0].text"),
             (ItemIn(modality="text", text="x" * 11), 413, "items[0].text"),
             (ItemIn(modality="image", text="x"), 422, "items[0].data"),
             (ItemIn(modality="image", data=""), 422, "items[0].data"),
             (ItemIn(modality="audio", data="aGVsbG8=", format="png"), 422, "items[0].format")]
    for item, status, field in cases:
        with pytest.raises(ApiError) as err:
            json_item(item, "items[0]", limits)
        assert (err.value.status, err.value.field) == (status, field), item


def test_sniffing_picks_the_demuxer():
    assert sniff_ext("image", b"\x89PNG\r\n") == "png"
    assert sniff_ext("audio", b"RIFF....WAVEfmt ") == "wav"
    assert sniff_ext("audio", b"fLaC") == "flac"
    assert sniff_ext("audio", b"OggS") == "ogg"
    assert sniff_ext("audio", b"ID3\x03") == "mp3"
    assert sniff_ext("video", b"\x00\x00\x00\x20ftypisom") == "mp4"
    assert sniff_ext("video", b"\x1a\x45\xdf\xa3") == "webm"


def test_zero_shot_prompts_and_ranking():
    opts = ZeroShotOptions(labels=[" red ", "blue"], template="a {label} {} shape")
    assert zero_shot_prompts(opts, Limits()) == ["a red {} shape", "a blue {} shape"]
    # A format-string template is never evaluated (no attribute access on user input).
    evil = ZeroShotOptions(labels=["x"], template="{0.__class__} {}")
    assert zero_shot_prompts(evil, Limits()) == ["{0.__class__} x"]
    with pytest.raises(ApiError) as err:
        zero_shot_prompts(ZeroShotOptions(labels=["a", "b", "c"]), Limits(max_labels=2))
    assert err.value.status == 413 and err.value.field == "labels"
    for bad in ({"labels": []}, {"labels": ["a", "a"]}, {"labels": [""]}, {"labels": ["a"], "template": "no slot"}):
        with pytest.raises(ValidationError):
            ZeroShotOptions.model_validate(bad)
    ranked = rank_labels(["a", "b", "c"], [0.1, 0.3, 0.2], 10.0, top_k=2)
    assert [r["label"] for r in ranked] == ["b", "c"]
    full = rank_labels(["a", "b", "c"], [0.1, 0.3, 0.2], 10.0, None)
    assert abs(sum(r["probability"] for r in full) - 1) < 1e-5


def test_settings_are_strict():
    with pytest.raises(ValidationError, match="unknown_field"):
        AppArgs.model_validate({"gateway": {"unknown_field": 1}})
    with pytest.raises(ValidationError, match="batching"):
        EmbedderConfig.model_validate({"batching": {"smell": {"max_batch_size": 2}}})
    with pytest.raises(ValidationError):
        EmbedderConfig.model_validate({"batching": {"text": {"max_batch_size": 0}}})
    assert EmbedderConfig().batch("video").max_batch_size == 8


def test_models_uri_forms():
    assert parse_registry_ref("models:/m@champion") == RegistryRef("m", alias="champion")
    assert parse_registry_ref("models:/m/3") == RegistryRef("m", version="3")
    assert str(RegistryRef("m", alias="champion")) == "models:/m@champion"
    for bad in ("models:/m", "models:/m/latest", "models:/@x", "models:/m@", "runs:/abc/model"):
        with pytest.raises(ModelReferenceError):
            parse_registry_ref(bad)
    with pytest.raises(ModelSourceError, match="expected models:/NAME@ALIAS"):
        resolve("models:/m/latest")


def test_field_paths():
    assert field_path(("body", "items", 2, "modality")) == "items[2].modality"
    assert field_path(("body",)) == "body"


def test_exact_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    query = rng.standard_normal(16).astype(np.float32)
    ids, scores = index_store.exact_top_k(vectors, query, 10)
    assert ids.tolist() == np.argsort(-(vectors @ query))[:10].tolist()
    assert np.all(np.diff(scores) <= 0)
    assert len(index_store.exact_top_k(vectors[:3], query, 10)[0]) == 3


def test_hnsw_recall_on_normalised_vectors():
    """The optional ANN backend (faiss-cpu): recall@10 against the exact scan on 5k x 64 vectors
    (random directions: a harder case than clustered real embeddings)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5_000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    part = index_store.ModalityIndex(vectors, [str(i) for i in range(len(vectors))], [], [], [], [])
    part.ann = index_store.build_hnsw(vectors, m=16, ef_construction=64, ef_search=64)
    assert index_store.recall_at_k(part, vectors[:100] + 0.01, 10) >= 0.9


def test_shipped_config_is_a_valid_serve_deploy_file():
    """serving/config.yaml is Serve's own schema (so `serve deploy` takes it) and raybind's."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.settings import EmbedderConfig, GatewayConfig, SearcherConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app" and callable(build_app)
    GatewayConfig.model_validate(app.args["gateway"])
    users = {d.name: d.user_config for d in app.deployments}
    assert EmbedderConfig.model_validate(users["Embedder"]).model_uri.startswith("models:/")
    assert SearcherConfig.model_validate(users["Searcher"]).ann == "exact"


def test_localize_resolves_paths_in_the_work_folder_and_generates_a_token(tmp_path, monkeypatch):
    import os

    from serving.run import localize

    monkeypatch.setenv("RAYBIND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYBIND_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = {"applications": [{"name": "raybind", "import_path": "serving.app:build_app", "args": {},
                                "deployments": [{"name": "Searcher", "user_config": {"index_path": "idx"}}]}]}
    sources = localize(config)
    app = config["applications"][0]
    token_file = Path(app["args"]["gateway"]["token_file"])
    assert sources["raybind"].endswith("(generated)") and len(token_file.read_text().strip()) >= 32
    assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
    assert app["deployments"][0]["user_config"]["index_path"] == str(tmp_path / "home" / "idx")
    assert app["args"]["embedder"]["tracking_uri"] == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("RAYBIND_SERVE_TOKEN", "x" * 20)
    again = {"applications": [{"name": "a", "import_path": "serving.app:build_app"}]}
    assert localize(again) == {"a": "$RAYBIND_SERVE_TOKEN"}


def test_media_guard_refuses_headers_that_promise_too_much():
    import io

    import soundfile as sf
    from PIL import Image

    from models.decode import DecodeError, DecodeLimits
    from pipelines.data.write.media import encode_mp4
    from serving import media_guard

    def wav(channels: int, rate: int) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, np.zeros((160, channels), np.float32), rate, format="WAV")
        return buf.getvalue()

    media_guard.check("audio", wav(2, 48_000), "wav", DecodeLimits())
    for data in (wav(12, 16_000), wav(1, 384_000)):
        with pytest.raises(DecodeError, match="supported"):
            media_guard.check("audio", data, "wav", DecodeLimits())
    video = encode_mp4([Image.new("RGB", (320, 240))] * 2, 8)
    media_guard.check("video", video, "mp4", DecodeLimits())
    with pytest.raises(DecodeError) as err:
        media_guard.check("video", video, "mp4", DecodeLimits(max_image_pixels=320 * 240 - 1))
    assert err.value.reason == "too_many_pixels"
    media_guard.check("video", b"not a video", "mp4", DecodeLimits())  # left to the decoder's own error
