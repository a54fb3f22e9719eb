"""What a hostile or curious client must not get, without a running app: bounded tokenizer memory,
no server paths / object reprs / unencodable text in what responses carry, paths that follow
$RAYBIND_HOME, token files that only their owner can read, interactive docs off by default.
(The same cases over HTTP: test_api_local.py and test_serve_http.py.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from serving import index_store
from serving.errors import ApiError, public_text
from serving.inputs import invalid_text_path, parse_json

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-of-enough-length"


# ----------------------------------------------------------------------------- bounded memory
def test_tokenizer_cache_stays_at_its_cap_and_ids_do_not_change():
    from models.decode import get_tokenizer

    tokenizer = get_tokenizer.__wrapped__()  # a fresh one: the shared one's cache depends on test order
    cap = tokenizer.bpe.cache_parameters()["maxsize"]
    assert cap and cap <= 65_536
    letters = ("bcdfghjklmnpqrstvwxz", "aeiou") * 3
    words = ["".join(p) for p in itertools.islice(itertools.product(*letters[:5]), cap + 2_000)]
    texts = [" ".join(words[i:i + 64]) for i in range(0, len(words), 64)]
    first = tokenizer(texts[:4], 77).numpy()
    for start in range(0, len(texts), 64):
        tokenizer(texts[start:start + 64], 77)
    assert tokenizer.bpe.cache_info().currsize == cap  # full, and no larger
    assert len(tokenizer.cache) == 2  # open_clip's own dict keeps only <start_of_text>, <end_of_text>
    np.testing.assert_array_equal(tokenizer(texts[:4], 77).numpy(), first)  # evicted words: same ids
    long_word = "q" * 500  # not cached at all (memory per entry grows with the word)
    before = tokenizer.bpe.cache_info().currsize
    tokenizer([long_word], 77)
    assert tokenizer.bpe.cache_info().currsize == before


# ----------------------------------------------------------------------------- text and messages
def test_lone_surrogates_are_found_where_they_sit():
    body = b'{"items": [{"modality": "text", "text": "ok"}, {"modality": "text", "text": "a\\ud800b"}]}'
    with pytest.raises(ApiError) as err:
        parse_json(body)
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_text", "items[1].text")
    assert "\ud800" not in err.value.message
    assert invalid_text_path({"labels": ["a", "\udfff"], "template": "{}"}) == "labels[1]"
    assert invalid_text_path({"template": "x\ud83d{}"}) == "template"
    assert invalid_text_path({"query": {"text": "\ud800"}}) == "query.text"
    assert invalid_text_path({"\ud800": 1}) == "body"  # a bad key: reported at its object
    # A proper pair is one character (U+1F600), and an escaped backslash is no escape at all.
    assert parse_json(b'{"t": "\\ud83d\\ude00", "u": "\\\\ud800"}') == {"t": "\U0001F600", "u": "\\ud800"}


def test_public_text_drops_reprs_addresses_and_server_paths():
    cases = {
        "Error opening <_io.BytesIO object at 0x7f93bf70e930>: Format not recognised.":
            "Error opening the input: Format not recognised.",
        "/home/me/.raybind/index/shapesworld: not a raybind index ('/home/me/.raybind/index/shapesworld/index.json')":
            "…/shapesworld: not a raybind index ('…/index.json')",
        "sqlite:////srv/raybind/mlflow/mlflow.db: unable to open": "…/mlflow.db: unable to open",
        "at 0x7f93bf70e930": "at 0x…",
        "x\ud800y": "x\\ud800y",
    }
    for text, expected in cases.items():
        assert public_text(text) == expected
    for kept in ("Content-Type must be application/json, got 'text/plain'", "models:/serve-test@nope: not found",
                 "s3://bucket/set/shard-000001.tar#000000040", "http://127.0.0.1:5000/api/2.0/mlflow", "k: 11 > 10"):
        assert public_text(kept) == kept


def test_error_responses_are_encodable_and_carry_no_paths():
    from serving.errors import error_response

    resp = error_response(422, "invalid_field", "\ud800: bad <x.Y object at 0xdeadbeef12> in /srv/data/secret.txt",
                          "a\ud800")
    body = json.loads(resp.body)["error"]
    assert body == {"code": "invalid_field", "field": "a\\ud800",
                    "message": "\\ud800: bad the input in …/secret.txt"}


def test_undecodable_media_errors_name_no_object(tmp_path):
    from models.config import ModelConfig
    from models.decode import DecodeLimits
    from serving.embedder import ItemError, decode_item
    from serving.inputs import Item

    spec = ModelConfig.from_name("tiny").tiny_twin().inputs
    for item in (Item("image", "items[0].data", data=b"\x89PNG" + b"\0" * 40, ext="png"),
                 Item("audio", "items[1].data", data=b"RIFF" + b"\xff" * 50, ext="wav")):
        out = decode_item(item, spec, DecodeLimits())
        assert isinstance(out, ItemError) and out.field == item.field, out
        assert "object at" not in out.detail and "0x" not in out.detail, out.detail


def test_non_finite_audio_is_the_items_error():
    import io

    import soundfile as sf

    from models.config import ModelConfig
    from models.decode import DecodeLimits
    from serving.embedder import ItemError, decode_item
    from serving.inputs import Item

    spec = ModelConfig.from_name("tiny").tiny_twin().inputs
    for bad in (np.nan, np.inf, -np.inf):
        wave = np.zeros(16_000, np.float32)
        wave[100] = bad
        buf = io.BytesIO()
        sf.write(buf, wave, 16_000, format="WAV", subtype="FLOAT")
        out = decode_item(Item("audio", "items[3].data", data=buf.getvalue(), ext="wav"), spec, DecodeLimits())
        assert isinstance(out, ItemError) and (out.field, out.reason) == ("items[3].data", "non_finite"), out


# ----------------------------------------------------------------------------- readiness and the index
def test_readyz_says_why_in_words_without_paths(tmp_path):
    from serving.api import readiness
    from serving.searcher import SearcherCore

    missing = tmp_path / "nowhere" / "index"
    searcher = SearcherCore()
    asyncio.run(searcher.reconfigure({"index_path": str(missing)}))
    info = searcher.info()
    assert str(missing) in info["last_error"]  # the detail stays on the server side (log)
    model = {"ready": False, "model": None, "last_error": f"{tmp_path}/model: no config.json"}
    body = readiness(model, info)
    assert not body["ready"]
    assert body["model"]["last_error"] == "the model failed to load"
    assert body["index"]["last_error"] == index_store.NO_INDEX
    assert str(tmp_path) not in json.dumps(body) and "/" not in body["index"]["last_error"].replace("`", "")
    found = searcher.search(np.zeros(64, np.float32), "image", 3)
    assert found["error"] == ("index_not_loaded", index_store.NO_INDEX)
    down = readiness(ApiError(503, "backend_unavailable", "backend unavailable"), ApiError(504, "x", "y"))
    assert (down["model"]["last_error"], down["index"]["last_error"]) == ("the Embedder did not answer",
                                                                         "the Searcher did not answer")
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "index.json").write_text('{"format": "other"}')
    asyncio.run(searcher.reconfigure({"index_path": str(tmp_path / "notindex")}))
    assert readiness(model, searcher.info())["index"]["last_error"] == index_store.NOT_AN_INDEX


def write_index(out: Path, urls: list[str], data: str) -> Path:
    out.mkdir(parents=True)
    n = len(urls)
    pq.write_table(pa.table({
        "key": [f"{i:09d}" for i in range(n)], "modality": ["image"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.eye(n, 4, dtype=np.float32).ravel()), 4),
        "caption": ["c"] * n, "shard": [u.split("#")[0].rsplit("/", 1)[-1] for u in urls], "url": urls,
        "labels": ["{}"] * n}), out / "part-0.parquet")
    (out / "index.json").write_text(json.dumps({"format": index_store.FORMAT, "model_name": "m", "model_version": "1",
                                                "embed_dim": 4, "data": data}))
    return out


def test_search_hits_carry_a_public_uri_and_no_server_path(tmp_path):
    data = str(tmp_path / "data" / "set")
    urls = [f"{data}/shard-000001.tar#000000000", f"{data}/part/shard-000002.tar#000000001",
            "s3://bucket/set/shard-000003.tar#000000002", "/elsewhere/shard-000004.tar#000000003"]
    index = index_store.load_index(str(write_index(tmp_path / "idx", urls, data)))
    hits = index_store.search(index.parts["image"], np.ones(4, np.float32), 4)
    assert sorted(h["uri"] for h in hits) == ["part/shard-000002.tar#000000001", "s3://bucket/set/shard-000003.tar#000000002",
                                              "shard-000001.tar#000000000", "shard-000004.tar#000000003"]
    assert all("url" not in h for h in hits)
    summary = index.summary()
    assert summary["name"] == "idx" and str(tmp_path) not in json.dumps([hits, summary])
    assert index_store.dataset_root(f"{data}/manifest.json") == data
    assert index_store.dataset_root(f"{data}/shard-{{000000..000009}}.tar") == data
    assert index_store.dataset_root("s3://bucket/set") == ""


def test_model_info_names_a_local_model_folder_not_its_path(tmp_path):
    from types import SimpleNamespace

    from serving.model_source import ModelRef, describe

    model = SimpleNamespace(embed_dim=64, modalities=("text",))
    local = describe(ModelRef(str(tmp_path / "m"), "m", "", "", local_dir=str(tmp_path / "m")), model, 1)
    assert local["uri"] == "m" and str(tmp_path) not in json.dumps(local)
    assert describe(ModelRef("models:/x@champion", "x", "3", "champion"), model, 1)["uri"] == "models:/x@champion"


# ----------------------------------------------------------------------------- paths follow RAYBIND_HOME
def test_shipped_config_paths_resolve_in_raybind_home(tmp_path, monkeypatch):
    from serving.run import localize

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("RAYBIND_HOME", str(home))
    monkeypatch.setenv("RAYBIND_SERVE_TOKEN", TOKEN)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(elsewhere)
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    localize(config)
    users = {d["name"]: d.get("user_config") for d in config["applications"][0]["deployments"]}
    assert users["Searcher"]["index_path"] == str(home / "index" / "shapesworld")
    assert users["Embedder"]["tracking_uri"] == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    legacy = {"applications": [{"name": "a", "import_path": "serving.app:build_app", "args": {
        "gateway": {}, "searcher": {"index_path": ".raybind/index/x"}, "embedder": {"model_uri": "models/m"}}}]}
    localize(legacy)
    args = legacy["applications"][0]["args"]
    assert args["searcher"]["index_path"] == str(home / "index" / "x")  # `.raybind/` = the work folder
    assert args["embedder"]["model_uri"] == str(home / "models" / "m")
    assert not (elsewhere / ".raybind").exists()


# ----------------------------------------------------------------------------- token files
def test_a_token_file_others_can_read_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from pipelines.cli.main import main
    from serving.auth import TokenError, load_token
    from serving.run import localize

    path = tmp_path / "token"
    path.write_text(TOKEN)
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(TokenError) as err:
            load_token(str(path), "UNUSED_VAR")
        message = str(err.value)
        assert str(path) in message and f"chmod 600 {path}" in message and "\n" not in message
    path.chmod(0o600)
    assert load_token(str(path), "UNUSED_VAR") == TOKEN
    path.chmod(0o400)
    assert load_token(str(path), "UNUSED_VAR") == TOKEN

    # A generated token left with a loose mode is refused before anything starts, by the CLI too.
    monkeypatch.setenv("RAYBIND_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYBIND_SERVE_TOKEN", raising=False)
    generated = tmp_path / "home" / "serve" / "token"
    generated.parent.mkdir(parents=True)
    generated.write_text(TOKEN)
    generated.chmod(0o644)
    app = {"applications": [{"name": "a", "import_path": "serving.app:build_app"}]}
    with pytest.raises(TokenError, match="chmod 600"):
        localize(app)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(app))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("raybind: error: token file") and f"chmod 600 {generated}" in err
    generated.chmod(0o600)
    assert localize(app)["a"].endswith("(generated)")
    assert oct(os.stat(generated).st_mode & 0o777) == "0o600"


# ----------------------------------------------------------------------------- docs
def test_interactive_docs_are_off_unless_configured():
    from serving.api import Services, build_api
    from serving.metrics import RequestMetrics
    from serving.settings import GatewayConfig

    def paths(**gateway) -> set[str]:
        app = build_api(Services(None, None, GatewayConfig(**gateway), TOKEN, RequestMetrics()))
        return {getattr(route, "path", "") for route in app.routes}

    default = paths()
    assert "/openapi.json" in default and not {"/docs", "/redoc"} & default
    assert {"/docs", "/redoc", "/openapi.json"} <= paths(interactive_docs=True)
    assert "interactive_docs" in GatewayConfig.__doc__ and "CDN" in GatewayConfig.__doc__
