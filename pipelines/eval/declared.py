"""What a data set declares about its own evaluation, read from its `manifest.json`.

The generic evaluator knows nothing of any particular data set: which samples count as the same
answer in retrieval, which labels to classify zero-shot and with which prompts, all come from the
manifest's top-level `"evaluation"` object:

    "evaluation": {
      "match_on": {"shape": ["image", "video", "text"], "color": ["image", "audio", "text"]},
      "zero_shot": {
        "color": {"values": ["red", "green"], "shown_by": ["image", "audio"],
                  "prompts": {"red": ["a red circle", ...], "green": [...]}}
      },
      "prompts_file": "zero_shot_prompts.json",
      "plot_by": "color"
    }

- `match_on`: attribute -> the modalities that can show it. In retrieval a -> b, an item is a correct
  answer when it agrees with the query on every attribute shown by both a and b (read from the
  samples' .json). With none shared, only the sample itself is.
- `zero_shot`: attribute -> its `values`, the modalities that show it (`shown_by`; defaults to its
  `match_on` entry) and text `prompts` per value. Prompts are either inline or in `prompts_file`, a
  JSON file next to the manifest holding {attribute: {value: [prompt, ...]}}, for ensembles too
  large for the manifest. An attribute given no prompts at all is prompted with its values' names.
- `plot_by` (optional): the attribute that colours the embedding projection.

No manifest, or one without `"evaluation"`: nothing is declared, so only the sample itself matches,
no zero-shot is run, and `declared` is False (the report says so).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from models.spec import MODALITIES
from pipelines.core import storage
from pipelines.data.read import resolve_shards

MANIFEST = "manifest.json"
KEYS = ("match_on", "zero_shot", "prompts_file", "plot_by")
ZERO_SHOT_KEYS = ("values", "shown_by", "prompts")


class DeclarationError(ValueError):
    """A data set's `"evaluation"` declaration is malformed, or several data sets disagree."""


@dataclass(frozen=True)
class ZeroShotAttribute:
    name: str
    values: tuple[str, ...]
    shown_by: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]  # per value, in `values` order

    def prompts_for(self, value: str) -> tuple[str, ...]:
        return self.prompts[self.values.index(value)]


@dataclass(frozen=True)
class EvalDeclaration:
    declared: bool = False
    source: str = ""  # the manifest(s) read, or why nothing is declared
    match_on: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (attribute, modalities that show it)
    zero_shot: tuple[ZeroShotAttribute, ...] = ()
    plot_by: str = ""

    @property
    def label_fields(self) -> tuple[str, ...]:
        """The sample .json fields evaluation reads (in declaration order, each once)."""
        names = [k for k, _ in self.match_on] + [z.name for z in self.zero_shot] + [self.plot_by]
        return tuple(dict.fromkeys(n for n in names if n))

    def match_attributes(self, a: str, b: str) -> tuple[str, ...]:
        """Attributes both modalities show: what a correct answer for a -> b must agree on."""
        return tuple(k for k, shown in self.match_on if a in shown and b in shown)

    def summary(self) -> dict:
        """For the report: whether anything is declared, from where, and what."""
        return {"declared": self.declared, "source": self.source,
                "match_on": {k: list(v) for k, v in self.match_on},
                "zero_shot": {z.name: {"values": list(z.values), "shown_by": list(z.shown_by),
                                       "prompts_per_value": [len(p) for p in z.prompts]} for z in self.zero_shot}}


NOT_DECLARED = EvalDeclaration()


# ----------------------------------------------------------------------------- parsing
def _strings(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise DeclarationError(f"{what}: expected a list of strings, got {value!r}")
    return tuple(value)


def _modalities(value, what: str) -> tuple[str, ...]:
    mods = _strings(value, what)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise DeclarationError(f"{what}: unknown modalities {unknown} (known: {', '.join(MODALITIES)})")
    return mods


def _mapping(value, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise DeclarationError(f"{what}: expected an object, got {type(value).__name__}")
    return value


def parse_evaluation(evaluation: Mapping, side_prompts: Mapping | None = None, source: str = "") -> EvalDeclaration:
    """An `"evaluation"` object (and the contents of its `prompts_file`, if any) -> EvalDeclaration.
    Strict: an unknown key or a malformed entry raises DeclarationError rather than being ignored."""
    where = source or "evaluation"
    evaluation = _mapping(evaluation, where)
    unknown = sorted(set(evaluation) - set(KEYS))
    if unknown:
        raise DeclarationError(f"{where}: unknown keys {unknown} (known: {', '.join(KEYS)})")
    match_on = tuple((str(k), _modalities(v, f"{where}: match_on.{k}"))
                     for k, v in _mapping(evaluation.get("match_on", {}), f"{where}: match_on").items())
    side = _mapping(side_prompts or {}, f"{where}: prompts_file")
    zero_shot = []
    for name, entry in _mapping(evaluation.get("zero_shot", {}), f"{where}: zero_shot").items():
        what = f"{where}: zero_shot.{name}"
        entry = _mapping(entry, what)
        bad = sorted(set(entry) - set(ZERO_SHOT_KEYS))
        if bad:
            raise DeclarationError(f"{what}: unknown keys {bad} (known: {', '.join(ZERO_SHOT_KEYS)})")
        values = _strings(entry.get("values"), f"{what}.values")
        if len(values) < 2 or len(set(values)) != len(values):
            raise DeclarationError(f"{what}.values: expected at least two distinct values, got {list(values)}")
        shown = entry.get("shown_by", dict(match_on).get(name))
        if shown is None:
            raise DeclarationError(f"{what}: no shown_by, and match_on does not name {name!r}")
        if "prompts" in entry and name in side:
            raise DeclarationError(f"{what}: prompts given both inline and in the prompts file")
        given = _mapping(entry.get("prompts", side.get(name, {})), f"{what}.prompts")
        if not given:
            prompts = tuple((v,) for v in values)
        else:
            missing = [v for v in values if not given.get(v)]
            extra = sorted(set(given) - set(values))
            if missing or extra:
                raise DeclarationError(f"{what}.prompts: no prompts for {missing}; prompts for unknown values {extra}")
            prompts = tuple(_strings(given[v], f"{what}.prompts.{v}") for v in values)
        zero_shot.append(ZeroShotAttribute(str(name), values, _modalities(shown, f"{what}.shown_by"), prompts))
    plot_by = evaluation.get("plot_by", "")
    if not isinstance(plot_by, str):
        raise DeclarationError(f"{where}: plot_by: expected an attribute name, got {plot_by!r}")
    return EvalDeclaration(True, source, match_on, tuple(zero_shot), plot_by)


# ----------------------------------------------------------------------------- loading
def _read_json(url: str):
    """Parsed JSON at `url` (local or s3://); None when it does not exist."""
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def declaration_of_folder(folder: str) -> EvalDeclaration:
    """The declaration in `folder`'s manifest.json (NOT_DECLARED, with the reason, when there is none)."""
    url = storage.join(folder, MANIFEST)
    try:
        manifest = _read_json(url)
    except ValueError as exc:
        raise DeclarationError(f"{url}: not valid JSON ({exc})") from None
    if manifest is None:
        return EvalDeclaration(source=f"no {MANIFEST} in {folder}")
    if not isinstance(manifest, Mapping) or "evaluation" not in manifest:
        return EvalDeclaration(source=f"{url} declares no evaluation")
    evaluation = _mapping(manifest["evaluation"], f"{url}: evaluation")
    side = None
    name = evaluation.get("prompts_file")
    if name is not None:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise DeclarationError(f"{url}: prompts_file must be a file name next to the manifest, got {name!r}")
        side = _read_json(storage.join(folder, name))
        if side is None:
            raise DeclarationError(f"{url}: prompts_file {name!r} not found in {folder}")
    return parse_evaluation(evaluation, side, source=url)


def load_declaration(urls: str | Sequence[str]) -> EvalDeclaration:
    """The evaluation declared by the data set(s) that `urls` (a folder, manifest, glob, brace
    pattern, shard, or a list of them; local or s3://) resolve to. Shards from several folders must
    declare the same evaluation (or all none)."""
    folders = sorted({s.url.rstrip("/").rsplit("/", 1)[0] for s in resolve_shards(urls)})
    found = [declaration_of_folder(f) for f in folders]
    first = found[0]
    for other in found[1:]:
        if (other.declared, other.match_on, other.zero_shot, other.plot_by) != \
                (first.declared, first.match_on, first.zero_shot, first.plot_by):
            raise DeclarationError(f"the data sets in {', '.join(folders)} declare different evaluations "
                                   f"({first.source}; {other.source}); evaluate them separately")
    if len(found) == 1:
        return first
    sources = "; ".join(d.source for d in found)
    return EvalDeclaration(first.declared, sources, first.match_on, first.zero_shot, first.plot_by)
