"""The evaluation declaration: parsed strictly, read from a data set's manifest (and its prompts
file), and absent (declared False, with the reason) when the data set declares nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.eval.declared import (
    NOT_DECLARED,
    DeclarationError,
    declaration_of_folder,
    load_declaration,
    parse_evaluation,
)

EVALUATION = {
    "match_on": {"genre": ["audio", "text"], "mood": ["audio", "image", "text"]},
    "zero_shot": {"genre": {"values": ["rock", "jazz"], "prompts": {"rock": ["rock music", "a rock song"],
                                                                     "jazz": ["jazz music"]}}},
    "plot_by": "mood",
}


def dataset(folder: Path, evaluation: dict | None = None, side: dict | None = None, manifest: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard-000000.tar").write_bytes(b"")  # only listed, never read here
    if manifest:
        body = {"format": "raybind-shards/1", "shards": [{"name": "shard-000000.tar", "count": 0}]}
        if evaluation is not None:
            body["evaluation"] = evaluation
        (folder / "manifest.json").write_text(json.dumps(body))
    if side is not None:
        (folder / "prompts.json").write_text(json.dumps(side))
    return folder


def test_parsed_fields_and_defaults():
    d = parse_evaluation(EVALUATION)
    assert d.declared and d.label_fields == ("genre", "mood")
    assert d.match_attributes("audio", "text") == ("genre", "mood")
    assert d.match_attributes("image", "audio") == ("mood",)
    assert d.match_attributes("image", "video") == ()
    genre = d.zero_shot[0]
    assert genre.shown_by == ("audio", "text")  # from match_on when not given
    assert genre.prompts_for("rock") == ("rock music", "a rock song") and genre.prompts_for("jazz") == ("jazz music",)
    bare = parse_evaluation({"zero_shot": {"genre": {"values": ["rock", "jazz"], "shown_by": ["audio"]}}})
    assert bare.zero_shot[0].prompts == (("rock",), ("jazz",)) and bare.match_on == ()
    assert not NOT_DECLARED.declared and NOT_DECLARED.label_fields == () and NOT_DECLARED.zero_shot == ()


@pytest.mark.parametrize("evaluation, message", [
    ({"match-on": {}}, "unknown keys"),
    ({"match_on": {"genre": ["audio", "vidoe"]}}, "unknown modalities"),
    ({"match_on": {"genre": "audio"}}, "list of strings"),
    ({"zero_shot": {"genre": {"values": ["rock", "jazz"]}}}, "no shown_by"),
    ({"zero_shot": {"genre": {"values": ["rock"], "shown_by": ["audio"]}}}, "at least two distinct"),
    ({"zero_shot": {"genre": {"values": ["rock", "jazz"], "shown_by": ["audio"],
                              "prompts": {"rock": ["rock music"]}}}}, "no prompts for \\['jazz'\\]"),
    ({"zero_shot": {"genre": {"values": ["rock", "jazz"], "shown_by": ["audio"], "prompt": {}}}}, "unknown keys"),
])
def test_malformed_declarations_fail_loudly(evaluation, message):
    with pytest.raises(DeclarationError, match=message):
        parse_evaluation(evaluation)


def test_folder_without_manifest_or_without_evaluation_declares_nothing(tmp_path):
    none = declaration_of_folder(str(dataset(tmp_path / "a", manifest=False)))
    assert not none.declared and "no manifest.json" in none.source
    plain = load_declaration(str(dataset(tmp_path / "b")))
    assert not plain.declared and "declares no evaluation" in plain.source and plain.label_fields == ()


def test_prompts_from_the_side_file_and_every_way_of_naming_the_shards(tmp_path):
    side_eval = {**EVALUATION, "zero_shot": {"genre": {"values": ["rock", "jazz"]}}, "prompts_file": "prompts.json"}
    folder = dataset(tmp_path / "ds", side_eval, side={"genre": {"rock": ["rock music"], "jazz": ["jazz music"]}})
    for urls in (str(folder), str(folder / "manifest.json"), str(folder / "*.tar"), [str(folder / "shard-000000.tar")]):
        d = load_declaration(urls)
        assert d.declared and d.zero_shot[0].prompts == (("rock music",), ("jazz music",)), urls
        assert d.source == str(folder / "manifest.json")


def test_side_file_errors(tmp_path):
    missing = dataset(tmp_path / "m", {**EVALUATION, "prompts_file": "prompts.json"})
    with pytest.raises(DeclarationError, match="not found"):
        load_declaration(str(missing))
    outside = dataset(tmp_path / "o", {**EVALUATION, "prompts_file": "../prompts.json"})
    with pytest.raises(DeclarationError, match="file name next to the manifest"):
        load_declaration(str(outside))
    both = dataset(tmp_path / "b", {**EVALUATION, "prompts_file": "prompts.json"}, side={"genre": {}})
    with pytest.raises(DeclarationError, match="both inline and in the prompts file"):
        load_declaration(str(both))


def test_data_sets_that_declare_differently_cannot_be_evaluated_together(tmp_path):
    a = dataset(tmp_path / "a", EVALUATION)
    same = dataset(tmp_path / "same", EVALUATION)
    other = dataset(tmp_path / "other")
    together = load_declaration([str(a / "shard-000000.tar"), str(same / "shard-000000.tar")])
    assert together.declared and together.match_on == parse_evaluation(EVALUATION).match_on
    with pytest.raises(DeclarationError, match="declare different evaluations"):
        load_declaration([str(a / "shard-000000.tar"), str(other / "shard-000000.tar")])
