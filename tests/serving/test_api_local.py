"""The HTTP API in-process: the gateway's FastAPI app on 127.0.0.1 (uvicorn) over Serve's local
testing mode (real Embedder / Searcher code, real @serve.batch queues, model from the real MLflow
server). Happy paths per modality, auth, every limit, malformed inputs, in-place reload."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests
from serving_helpers import TOKEN, LocalServer, auth, b64, mp4, png, post, wav, write_local_index

LIMITS = {"max_body_bytes": 2_000_000, "max_items": 4, "max_item_bytes": 600_000, "max_text_chars": 200,
          "max_labels": 8, "max_k": 10, "max_image_pixels": 100_000, "max_audio_seconds": 3.0,
          "max_video_seconds": 2.5}


pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def api(ray_cluster, registry, model_dirs, token_file, tmp_path_factory):
    index = write_local_index(model_dirs["trained"], tmp_path_factory.mktemp("local_index") / "index")
    server = LocalServer({"model_uri": registry["champion"], "tracking_uri": registry["tracking_uri"]},
                         {"index_path": str(index)}, {"token_file": str(token_file), "limits": LIMITS})
    server.searcher_config = {"index_path": str(index)}
    yield server
    server.close()


def item(modality: str, media: dict, **extra) -> dict:
    if modality == "text":
        return {"modality": "text", "text": "a large green triangle drifting up", **extra}
    return {"modality": modality, "data": b64(media[modality]), **extra}


def error(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"code", "field", "message"}
    return body


# ----------------------------------------------------------------------------- happy paths
def test_probes_docs_and_model_info(api, registry):
    assert requests.get(api.url + "/healthz").json() == {"status": "ok"}
    ready = requests.get(api.url + "/readyz").json()
    assert ready["ready"] and ready["model"]["loaded"] and ready["index"]["loaded"], ready
    # Swagger UI / ReDoc pull scripts from a public CDN: off unless gateway.interactive_docs.
    assert requests.get(api.url + "/docs").status_code == 404
    assert requests.get(api.url + "/redoc").status_code == 404
    spec = requests.get(api.url + "/openapi.json").json()
    content = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content) and "EmbedIn" in spec["components"]["schemas"]
    info = requests.get(api.url + "/v1/model", headers=auth()).json()
    assert (info["name"], info["version"], info["alias"]) == (registry["name"], registry["versions"]["trained"],
                                                              "champion")
    assert info["batching"]["text"]["max_batch_size"] == 64 and info["index"]["rows"]["video"] == 24
    assert info["index"]["name"] == "index" and "path" not in info["index"]  # no server paths
    assert api.searcher_config["index_path"] not in requests.get(api.url + "/v1/model", headers=auth()).text


def test_embed_every_modality_json_and_matches_the_library(api, media, model_dirs):
    import torch

    from models.checkpoint import load_model
    from models.decode import decode_image, tokenize

    items = [item(m, media) for m in ("text", "image", "audio", "video")]
    resp = post(api.url, "/v1/embed", json={"items": items})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["dimension"] == 64 and [d["modality"] for d in body["data"]] == ["text", "image", "audio", "video"]
    vectors = np.asarray([d["embedding"] for d in body["data"]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    model = load_model(model_dirs["trained"]).eval()  # the same decode + encode as the library
    spec = model.config.inputs
    with torch.no_grad():
        text = model.encode("text", torch.as_tensor(tokenize([items[0]["text"]], spec.context_length)))[0]
        image = model.encode("image", torch.as_tensor(decode_image(media["image"], spec)[None]))[0]
    assert np.allclose(vectors[0], text.numpy(), atol=1e-5) and np.allclose(vectors[1], image.numpy(), atol=1e-5)


def test_embed_multipart_keeps_part_order(api, media):
    files = [("audio", ("clip.wav", media["audio"], "audio/wav")), ("text", (None, "a blue circle")),
             ("video", ("clip", media["video"], "application/octet-stream")),  # no extension: sniffed
             ("image", ("frame.jpg", media["image"], "image/jpeg"))]
    resp = post(api.url, "/v1/embed", files=files)
    assert resp.status_code == 200, resp.text
    assert [d["modality"] for d in resp.json()["data"]] == ["audio", "text", "video", "image"]
    resp = post(api.url, "/v1/embed", data={"text": ["a red circle", "a blue cross"]})  # urlencoded form
    assert resp.status_code == 200 and len(resp.json()["data"]) == 2, resp.text


def test_zero_shot_every_modality(api, media):
    from pipelines.data.write import shapesworld

    colors = list(shapesworld.ATTRIBUTES["color"])
    for modality in ("text", "image", "audio", "video"):
        resp = post(api.url, "/v1/zero-shot", json={"item": item(modality, media), "labels": colors,
                                                     "template": "a {} shape", "top_k": 3})
        assert resp.status_code == 200, resp.text
        labels = resp.json()["labels"]
        assert len(labels) == 3 and {lab["label"] for lab in labels} <= set(colors)
        assert labels == sorted(labels, key=lambda lab: -lab["probability"])
    scene = shapesworld.make_scene(0, 7)  # the sample `media` holds: the trained model knows colours
    files = [("image", ("f.jpg", media["image"], "image/jpeg"))] + [("labels", (None, c)) for c in colors]
    resp = post(api.url, "/v1/zero-shot", files=files + [("template", (None, "a {label} shape"))])
    assert resp.status_code == 200, resp.text
    assert resp.json()["labels"][0]["label"] == scene.attributes["color"]
    assert abs(sum(lab["probability"] for lab in resp.json()["labels"]) - 1) < 1e-4


def test_search_every_target_json_and_multipart(api, media):
    for target in ("image", "text", "audio", "video"):
        resp = post(api.url, "/v1/search", json={"query": item("text", media), "target": target, "k": 5})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        hits = body["results"]
        assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert all(h["modality"] == target and h["caption"] and h["labels"]["color"] and h["uri"] for h in hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    files = {"audio": ("a.wav", media["audio"], "audio/wav"), "target": (None, "video"), "k": (None, "3")}
    resp = post(api.url, "/v1/search", files=files)
    assert resp.status_code == 200 and len(resp.json()["results"]) == 3, resp.text
    assert "warning" in resp.json()  # the local index records no model version: flagged, not hidden


# ----------------------------------------------------------------------------- auth
def test_every_v1_route_needs_the_token(api, media):
    routes = [("post", "/v1/embed", {"json": {"items": [item("text", media)]}}),
              ("post", "/v1/zero-shot", {"json": {"item": item("text", media), "labels": ["a"]}}),
              ("post", "/v1/search", {"json": {"query": item("text", media), "target": "image"}}),
              ("get", "/v1/model", {})]
    for method, path, kwargs in routes:
        for headers in ({}, auth("wrong-token-wrong-token"), {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
            resp = getattr(requests, method)(api.url + path, headers=headers, timeout=30, **kwargs)
            assert error(resp, 401)["field"] == "Authorization" and "Bearer" in resp.headers["WWW-Authenticate"]
        assert getattr(requests, method)(api.url + path, headers=auth(), timeout=60, **kwargs).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(api.url + path).status_code == 200


# ----------------------------------------------------------------------------- limits
def test_every_limit(api, media):
    big_body = json.dumps({"items": [{"modality": "text", "text": "x" * 100}] * 30_000})
    cases = {
        "body_too_large": post(api.url, "/v1/embed", data=big_body, headers={"Content-Type": "application/json"}),
        "body_too_large (chunked)": post(api.url, "/v1/embed", headers={"Content-Type": "application/json"},
                                         data=(big_body[i:i + 65536].encode() for i in range(0, len(big_body), 65536))),
        "too_many_items": post(api.url, "/v1/embed", json={"items": [item("text", media)] * 5}),
        "too_many_items (multipart)": post(api.url, "/v1/embed", files=[("text", (None, "a"))] * 5),
        "item_too_large": post(api.url, "/v1/embed", json={"items": [
            {"modality": "image", "data": b64(b"\x89PNG" + b"\0" * 700_000)}]}),
        "text_too_long": post(api.url, "/v1/embed", json={"items": [{"modality": "text", "text": "y" * 201}]}),
        "too_many_labels": post(api.url, "/v1/zero-shot", json={"item": item("text", media),
                                                                "labels": [f"l{i}" for i in range(9)]}),
        "too_many_pixels": post(api.url, "/v1/embed", json={"items": [
            {"modality": "image", "data": b64(png(400, 400)), "format": "png"}]}),
        "audio_too_long": post(api.url, "/v1/embed", json={"items": [{"modality": "audio", "data": b64(wav(5.0))}]}),
        "video_too_long": post(api.url, "/v1/embed", json={"items": [{"modality": "video", "data": b64(mp4(40))}]}),
    }
    for name, resp in cases.items():
        code = name.split(" ")[0]
        assert error(resp, 413)["code"] == code, (name, resp.text)
    assert error(post(api.url, "/v1/search", json={"query": item("text", media), "target": "image", "k": 11}),
                 422)["field"] == "k"
    assert post(api.url, "/v1/embed", json={"items": [item("text", media)] * 4}).status_code == 200


# ----------------------------------------------------------------------------- malformed inputs
def malformed_cases(media: dict) -> list[tuple[dict, int, str | None]]:
    """(request kwargs, expected status, expected error field) for POST /v1/embed."""
    ctype = {"Content-Type": "application/json"}
    garbage = b64(b"\x00\x01garbage" * 50)
    return [
        ({"data": "{", "headers": ctype}, 400, "body"),
        ({"data": "[1, 2]", "headers": ctype}, 400, "body"),
        ({"data": b"\xff\xfe{}", "headers": ctype}, 400, "body"),
        ({"data": "[" * 100_000 + "]" * 100_000, "headers": ctype}, 400, "body"),
        ({"json": {}}, 422, "items"),
        ({"json": {"items": []}}, 422, "items"),
        ({"json": {"items": "text"}}, 422, "items"),
        ({"json": {"items": [{"modality": "smell", "text": "x"}]}}, 422, "items[0].modality"),
        ({"json": {"items": [{"modality": "text", "text": 5}]}}, 422, "items[0].text"),
        ({"json": {"items": [item("text", media)], "extra": 1}}, 422, "extra"),
        ({"json": {"items": [{"modality": "image", "data": "not base64!"}]}}, 400, "items[0].data"),
        ({"json": {"items": [item("text", media), {"modality": "image", "data": garbage}]}}, 422, "items[1].data"),
        ({"json": {"items": [{"modality": "audio", "data": garbage}]}}, 422, "items[0].data"),
        ({"json": {"items": [{"modality": "video", "data": garbage, "format": "mp4"}]}}, 422, "items[0].data"),
        ({"json": {"items": [{"modality": "video", "data": b64(media["video"][:300])}]}}, 422, "items[0].data"),
        ({"json": {"items": [{"modality": "image", "data": b64(media["image"][:100])}]}}, 422, "items[0].data"),
        ({"data": "x", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
        ({"data": "x"}, 415, "Content-Type"),
        ({"files": {"nothing": (None, "x")}}, 422, "nothing"),
        ({"files": {"image": (None, "not a file")}}, 422, "image[0]"),
        ({"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 422, "items"),
    ]


def test_malformed_inputs_are_4xx_naming_the_field(api, media):
    for kwargs, status, field in malformed_cases(media):
        resp = post(api.url, "/v1/embed", **kwargs)
        assert error(resp, status)["field"] == field, (kwargs.get("json") or str(kwargs)[:80], resp.text)
        assert "object at" not in resp.text and "0x7" not in resp.text, resp.text  # no reprs, no addresses
    assert error(post(api.url, "/v1/zero-shot", json={"item": item("text", media), "labels": []}), 422)["field"] == "labels"
    assert error(post(api.url, "/v1/zero-shot", files={"text": (None, "x")}), 422)["field"] == "labels"
    assert error(post(api.url, "/v1/search", json={"query": item("text", media)}), 422)["field"] == "target"
    assert error(post(api.url, "/v1/search", json={"query": item("text", media), "target": "x"}), 422)["field"] == "target"
    assert error(requests.get(api.url + "/v1/embed", headers=auth()), 405)["code"] == "method_not_allowed"
    assert error(requests.get(api.url + "/nope"), 404)["code"] == "not_found"
    assert requests.get(api.url + "/readyz").json()["ready"]
    assert post(api.url, "/v1/embed", json={"items": [item("image", media)]}).status_code == 200


def raw_json(text: str) -> dict:
    """POST kwargs for a JSON body written by hand (requests would escape a lone surrogate itself)."""
    return {"data": text.encode(), "headers": {"Content-Type": "application/json"}}


def test_lone_surrogates_are_422_naming_the_field_and_not_echoed(api):
    text = '{"modality": "text", "text": "a red \\ud800 circle"}'
    ok = '{"modality": "text", "text": "a red circle"}'
    cases = [("/v1/embed", f'{{"items": [{ok}, {text}]}}', "items[1].text"),
             ("/v1/zero-shot", f'{{"item": {ok}, "labels": ["red", "\\ud800"]}}', "labels[1]"),
             ("/v1/zero-shot", f'{{"item": {ok}, "labels": ["red"], "template": "a {{}} \\udc00"}}', "template"),
             ("/v1/zero-shot", f'{{"item": {text}, "labels": ["red"]}}', "item.text"),
             ("/v1/search", f'{{"query": {text}, "target": "image"}}', "query.text"),
             ("/v1/embed", f'{{"items": [{ok}], "\\ud800": 1}}', "body")]
    for path, body, field in cases:
        resp = post(api.url, path, **raw_json(body))
        got = error(resp, 422)
        assert (got["code"], got["field"]) == ("invalid_text", field), (path, resp.text)
        assert "\\ud8" not in resp.text and "\\udc00" not in resp.text, resp.text  # the value is not echoed
    resp = post(api.url, "/v1/zero-shot", **raw_json(f'{{"item": {ok}, "labels": ["red \\ud83d\\ude00"]}}'))
    assert resp.status_code == 200 and resp.json()["labels"][0]["label"] == "red \U0001F600", resp.text


def float_wav(value: float, seconds: float = 1.0, rate: int = 16000) -> bytes:
    import io

    import soundfile as sf

    wave = np.zeros(int(seconds * rate), np.float32)
    wave[rate // 2] = value
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_non_finite_media_is_422_naming_the_item(api, media):
    for value in (float("nan"), float("inf")):
        audio = {"modality": "audio", "data": b64(float_wav(value))}
        cases = [("/v1/embed", {"items": [item("text", media), audio]}, "items[1].data"),
                 ("/v1/zero-shot", {"item": audio, "labels": ["low", "high"]}, "item.data"),
                 ("/v1/search", {"query": audio, "target": "image"}, "query.data")]
        for path, body, field in cases:
            got = error(post(api.url, path, json=body), 422)
            assert (got["code"], got["field"]) == ("non_finite", field), (path, got)
    assert post(api.url, "/v1/embed", json={"items": [{"modality": "audio", "data": b64(float_wav(0.5))}]}).ok


def test_metrics_count_endpoint_modality_and_status(api, media):
    post(api.url, "/v1/embed", json={"items": [item("audio", media)]})
    post(api.url, "/v1/embed", json={"items": [{"modality": "audio", "data": b64(b"junk" * 10)}]})
    text = requests.get(api.url + "/metrics").text
    assert 'raybind_requests_total{endpoint="/v1/embed",modality="audio",status="200"}' in text
    assert 'raybind_requests_total{endpoint="/v1/embed",modality="audio",status="422"}' in text
    assert 'raybind_items_total{endpoint="/v1/embed",modality="audio"}' in text
    assert "raybind_request_seconds_bucket" in text


# ----------------------------------------------------------------------------- reload
def test_reload_swaps_models_under_load_and_a_bad_alias_keeps_the_old(api, registry, media):
    """In-place reconfigure (what a user_config change does in a replica) while requests flow."""
    base = {"model_uri": registry["champion"], "tracking_uri": registry["tracking_uri"]}
    statuses, versions, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            resp = post(api.url, "/v1/embed", json={"items": [item("text", media), item("image", media)]})
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                versions.add(resp.json()["model"]["version"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        api.embedder.reconfigure.remote({**base, "model_uri": registry["candidate"]}).result(timeout_s=120)
        assert requests.get(api.url + "/v1/model", headers=auth()).json()["version"] == registry["versions"]["other"]
        api.embedder.reconfigure.remote({**base, "model_uri": f"models:/{registry['name']}@nope"}).result(timeout_s=60)
        info = requests.get(api.url + "/v1/model", headers=auth()).json()
        assert info["version"] == registry["versions"]["other"] and "nope" in info["last_error"]
        api.embedder.reconfigure.remote(base).result(timeout_s=120)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions == {registry["versions"]["trained"], registry["versions"]["other"]}
    assert requests.get(api.url + "/v1/model", headers=auth()).json()["version"] == registry["versions"]["trained"]


def test_model_source_uses_its_tracking_uri_not_the_process_registry(registry, tmp_path):
    """A Serve replica's process-wide MLflow registry URI is MLflow's default local store, not the
    server the config names: loading must go through `tracking_uri` alone (this failed every
    Embedder replica over real HTTP: "Registered Model with name=... not found")."""
    import mlflow

    from serving.model_source import fetch_and_load, resolve

    before = mlflow.get_registry_uri()
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        ref = resolve(registry["candidate"], registry["tracking_uri"])
        model = fetch_and_load(ref, registry["tracking_uri"])
    finally:
        mlflow.set_registry_uri(before)
    assert ref.version == registry["versions"]["other"] and model.embed_dim == 64
