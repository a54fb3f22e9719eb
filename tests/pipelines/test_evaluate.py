"""Evaluation knows only what the data set declares: retrieval equivalence from `match_on`, zero-shot
from the declared prompts (best prompt per class), and nothing at all without a declaration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.eval import evaluate
from pipelines.eval.declared import NOT_DECLARED, parse_evaluation
from pipelines.eval.evaluate import all_retrieval, class_scores, match_matrix, zero_shot


# ----------------------------------------------------------------------------- retrieval equivalence
def sized_batch() -> tuple[dict, dict]:
    """Four image/text pairs; every text's nearest image is another item of the same `size`."""
    batch = {"key": np.asarray(["0", "1", "2", "3"]), "size": np.asarray(["small", "small", "large", "large"]),
             "image_mask": np.ones(4, bool), "text_mask": np.ones(4, bool)}
    e = np.eye(4, dtype=np.float32)
    emb = {"image": e, "text": e[[1, 0, 3, 2]]}  # text i is image i's same-size partner
    return batch, emb


def test_a_metadata_column_without_a_declaration_does_not_change_retrieval():
    batch, emb = sized_batch()
    assert match_matrix(batch, "text", "image").tolist() == np.eye(4, dtype=bool).tolist()
    without_column = {k: v for k, v in batch.items() if k != "size"}
    assert all_retrieval(emb, batch) == all_retrieval(emb, without_column)
    assert all_retrieval(emb, batch)["text->image"]["R@1"] == 0.0  # only the item itself is right


def test_a_declared_match_on_attribute_makes_same_valued_items_correct():
    batch, emb = sized_batch()
    declared = parse_evaluation({"match_on": {"size": ["image", "text"]}})
    expected = batch["size"][:, None] == batch["size"][None, :]
    assert match_matrix(batch, "text", "image", declared).tolist() == expected.tolist()
    assert all_retrieval(emb, batch, declared)["text->image"]["R@1"] == 1.0
    # Declared, but not shown by both modalities of the pair: only the item itself again.
    only_image = parse_evaluation({"match_on": {"size": ["image", "video"]}})
    assert all_retrieval(emb, batch, only_image)["text->image"]["R@1"] == 0.0


def test_match_uses_every_attribute_both_modalities_show_and_only_those():
    batch = {"key": np.asarray(["0", "1", "2"]), "shape": np.asarray(["circle", "circle", "square"]),
             "color": np.asarray(["red", "blue", "red"])}
    declared = parse_evaluation({"match_on": {"shape": ["image", "text"], "color": ["image", "text", "audio"]}})
    assert declared.match_attributes("text", "image") == ("shape", "color")
    assert declared.match_attributes("image", "audio") == ("color",)
    assert match_matrix(batch, "text", "image", declared).tolist() == np.eye(3, dtype=bool).tolist()
    assert match_matrix(batch, "image", "audio", declared)[0].tolist() == [True, False, True]


# ----------------------------------------------------------------------------- zero-shot
def test_best_prompt_wins_where_the_mean_of_prompts_would_not():
    e = np.eye(4, dtype=np.float32)
    item = e[:1]  # identical to class 0's first prompt
    classes = [e[:3], (0.6 * e[0] + 0.8 * e[3])[None]]
    assert class_scores(item, classes).argmax(1).tolist() == [0]
    means = np.stack([c.mean(0) / np.linalg.norm(c.mean(0)) for c in classes])
    assert (item @ means.T).argmax(1).tolist() == [1]  # why the mean is not used


class PromptModel:
    """A text tower that embeds each known prompt as its own one-hot vector."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def encode(self, modality, tokens):
        assert modality == "text"
        return torch.eye(len(self.vocab))[tokens[:, 0]]


def test_zero_shot_uses_the_declared_prompts_and_modalities_and_nothing_undeclared(monkeypatch):
    vocab = ["a loud one", "a quiet one", "loud", "quiet"]
    monkeypatch.setattr(evaluate, "tokenize", lambda texts, n, tok: np.asarray([[vocab.index(t)] for t in texts]))
    spec = type("Spec", (), {"context_length": 4, "tokenizer": None})()
    model = PromptModel(vocab)
    e = np.eye(len(vocab), dtype=np.float32)
    batch = {"key": np.asarray(["0", "1", "2"]), "volume": np.asarray(["loud", "quiet", "loud"]),
             "audio_mask": np.ones(3, bool), "image_mask": np.ones(3, bool), "text_mask": np.ones(3, bool)}
    # Audio items sit on their class's first prompt; images on the other class's.
    emb = {"audio": e[[0, 1, 0]], "image": e[[1, 0, 1]], "text": e[[0, 1, 0]]}
    declared = parse_evaluation({"zero_shot": {"volume": {
        "values": ["loud", "quiet"], "shown_by": ["audio", "text"],
        "prompts": {"loud": ["a loud one"], "quiet": ["a quiet one"]}}}})
    assert zero_shot(model, emb, batch, spec, declared) == {"volume": {"audio": 1.0}}  # not image, not text
    assert zero_shot(model, emb, batch, spec) == {}  # no declaration: no zero-shot, whatever the columns
    # No prompts declared: each value is its own prompt.
    bare = parse_evaluation({"zero_shot": {"volume": {"values": ["loud", "quiet"], "shown_by": ["image"]}}})
    emb["image"] = e[[2, 3, 2]]
    assert zero_shot(model, emb, batch, spec, bare) == {"volume": {"image": 1.0}}
    assert zero_shot(model, emb, batch, spec, NOT_DECLARED) == {}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_model_reports_what_is_declared_and_says_when_nothing_is(tmp_path, ray_cluster):
    import shutil

    from models.binding import BindingModel
    from models.checkpoint import save_model
    from models.config import ModelConfig
    from pipelines.data.write.synth import SynthConfig, synthesize

    torch.manual_seed(0)
    model_dir = str(save_model(BindingModel(ModelConfig.from_name("tiny").tiny_twin()), tmp_path / "model"))
    declared_dir = tmp_path / "declared"
    synthesize(SynthConfig(out=str(declared_dir), samples=60, shard_size=30, seed=0))
    bare_dir = tmp_path / "bare"
    shutil.copytree(declared_dir, bare_dir)
    manifest = json.loads((bare_dir / "manifest.json").read_text())
    del manifest["evaluation"]
    (bare_dir / "manifest.json").write_text(json.dumps(manifest))

    kwargs = {"split": "train", "max_samples": 40, "batch_size": 16}
    with_decl = evaluate.evaluate_model(model_dir, str(declared_dir), out=str(tmp_path / "r1"), **kwargs)
    without = evaluate.evaluate_model(model_dir, str(bare_dir), out=str(tmp_path / "r2"), **kwargs)

    assert with_decl["evaluation"]["declared"] is True
    assert set(with_decl["zero_shot"]) == {"shape", "color", "size", "direction", "pitch", "rhythm"}
    assert with_decl["zero_shot"]["color"].keys() == {"image", "audio", "video"}
    assert with_decl["zero_shot"]["direction"].keys() == {"video"}
    assert without["evaluation"]["declared"] is False and "declares no evaluation" in without["evaluation"]["source"]
    assert without["zero_shot"] == {} and without["headline"]["zero_shot_mean_acc"] is None
    # The same embeddings: a declared match set only adds correct answers.
    assert with_decl["retrieval"].keys() == without["retrieval"].keys()
    for pair, r in without["retrieval"].items():
        assert with_decl["retrieval"][pair]["R@10"] >= r["R@10"], pair
    assert with_decl["headline"]["mean_R@1"] > without["headline"]["mean_R@1"]
    saved = json.loads((tmp_path / "r2" / "eval_report.json").read_text())
    assert saved["evaluation"]["declared"] is False
