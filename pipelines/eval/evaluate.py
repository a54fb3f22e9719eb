"""`raybind evaluate`: cross-modal retrieval and zero-shot classification of a binding model.

What counts as a correct answer and what to classify is what the data set declares in its
manifest (`"evaluation"`, read by pipelines/eval/declared.py); this module knows no data set.

Retrieval, for every ordered modality pair (a -> b) over held-out samples that have both:
R@1/5/10 and median rank. A retrieved item counts as a match when it agrees with the query on every
declared attribute that both modalities can show (ShapesWorld: text -> video compares shape, color,
size, direction; image -> audio only color), so duplicates are not punished and a pair is not asked
for what it cannot see. With nothing declared, only the sample itself matches.

Zero-shot: for each declared attribute and each non-text modality that shows it, every value (class)
has a set of text prompts; an item's score for a class is its best cosine similarity over that
class's prompts, and its prediction is the class with the highest score (see `class_scores` for why
the best prompt and not the mean of the prompts). With nothing declared, there is no zero-shot.
The report records whether anything was declared (`evaluation.declared`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_model
from models.decode import tokenize
from models.spec import MODALITIES
from pipelines.core import tracking, workspace
from pipelines.core.ray_runtime import ensure_ray
from pipelines.data.read import ReaderConfig, read_shards
from pipelines.eval.declared import NOT_DECLARED, EvalDeclaration, ZeroShotAttribute, load_declaration
from pipelines.registry.model_registry import local_model_dir

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvaluateConfig:
    model: str = "models:/raybind-shapesworld@champion"  # models:/NAME@ALIAS, models:/NAME/VERSION, or a folder
    data: str = ""  # shards ("" = .raybind/data/shapesworld)
    split: str = "test"
    max_samples: int = 512
    batch_size: int = 128
    out: str = ""  # report folder ("" = a temp folder, logged to MLflow)
    tracking_uri: str = ""
    experiment: str = "raybind"


# ----------------------------------------------------------------------------- data and embeddings
def load_eval_batch(urls: str, split: str, modalities, spec, max_samples: int,
                    label_fields: tuple[str, ...] | None = None) -> dict:
    """Up to `max_samples` decoded held-out samples as one batch of numpy arrays, with the .json
    fields `label_fields` as string columns (None: the fields the data set's declaration needs)."""

    if label_fields is None:
        label_fields = load_declaration(urls).label_fields
    cfg = ReaderConfig(modalities=tuple(modalities), split=split, shuffle_shards=False, shuffle_window=0,
                       label_fields=tuple(label_fields))
    ds = read_shards(urls, config=cfg, spec=spec).limit(max_samples)
    parts = list(ds.iter_batches(batch_size=256, batch_format="numpy"))
    if not parts:
        raise ValueError(f"{urls}: no samples in split {split!r}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def embed_all(model, batch: dict, modalities, batch_size: int) -> dict[str, np.ndarray]:
    out: dict[str, list] = {m: [] for m in modalities}
    n = len(batch["key"])
    for start in range(0, n, batch_size):
        inputs = {m: torch.as_tensor(batch[m][start:start + batch_size]) for m in modalities}
        result = model(inputs)
        for m in modalities:
            out[m].append(result.embeddings[m].float().numpy())
    return {m: np.concatenate(v) for m, v in out.items()}


# ----------------------------------------------------------------------------- retrieval
def match_matrix(batch: dict, a: str, b: str, declared: EvalDeclaration = NOT_DECLARED) -> np.ndarray:
    """[i, j] True when item j of modality b is a correct answer for query i of modality a: it
    agrees with i on every attribute `declared` as shown by both a and b (and read into `batch`);
    with no such attribute, only i itself. Columns the declaration does not name are never used."""
    shared = [k for k in declared.match_attributes(a, b) if k in batch and any(v for v in batch[k])]
    n = len(batch["key"])
    if not shared:
        return np.eye(n, dtype=bool)
    match = np.ones((n, n), dtype=bool)
    for k in shared:
        values = np.asarray(batch[k])
        match &= values[:, None] == values[None, :]
    return match


def retrieval_metrics(query: np.ndarray, target: np.ndarray, match: np.ndarray) -> dict[str, float]:
    sims = query @ target.T
    order = np.argsort(-sims, axis=1, kind="stable")
    hits = np.take_along_axis(match, order, axis=1)
    first = hits.argmax(axis=1)  # 0-based rank of the first correct item
    metrics = {f"R@{k}": float((first < k).mean()) for k in (1, 5, 10)}
    metrics["median_rank"] = float(np.median(first + 1))
    return metrics


def all_retrieval(emb: dict[str, np.ndarray], batch: dict,
                  declared: EvalDeclaration = NOT_DECLARED) -> dict[str, dict[str, float]]:
    results = {}
    mods = [m for m in MODALITIES if m in emb]
    for a in mods:
        for b in mods:
            if a == b:
                continue
            both = batch[f"{a}_mask"] & batch[f"{b}_mask"]
            if both.sum() < 2:
                continue
            sub = {k: (v[both] if isinstance(v, np.ndarray) and len(v) == len(both) else v) for k, v in batch.items()}
            results[f"{a}->{b}"] = retrieval_metrics(emb[a][both], emb[b][both], match_matrix(sub, a, b, declared))
    return results


# ----------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def class_embeddings(model, attribute: ZeroShotAttribute, spec) -> list[np.ndarray]:
    """Per declared value of `attribute`: the unit embeddings of its prompts, (num_prompts, dim)."""

    rows = []
    for prompts in attribute.prompts:
        tokens = torch.as_tensor(tokenize(list(prompts), spec.context_length, spec.tokenizer))
        e = model.encode("text", tokens).float()
        rows.append((e / e.norm(dim=-1, keepdim=True)).numpy())
    return rows


def class_scores(emb: np.ndarray, classes: list[np.ndarray]) -> np.ndarray:
    """(n, num_classes): each item's best cosine similarity over each class's prompts.

    Why the max over prompts and not the similarity to their mean: a caption's embedding binds its
    attributes together ("small red circle" is not "small" + "red" + "circle"), so the mean over
    every colour and size of "circle" blurs the very conjunctions the model learned. The best
    matching prompt of each class is the one whose other attributes agree with the item.
    """
    return np.stack([(emb @ c.T).max(axis=1) for c in classes], axis=1)


def zero_shot(model, emb: dict[str, np.ndarray], batch: dict, spec,
              declared: EvalDeclaration = NOT_DECLARED) -> dict[str, dict[str, float]]:
    """{attribute: {modality: accuracy}} for each declared zero-shot attribute read into `batch`, in
    each modality that shows it except text (the prompts' own modality). Items whose value is not
    among the declared values are left out."""
    results: dict[str, dict[str, float]] = {}
    for task in declared.zero_shot:
        if task.name not in batch or not any(batch[task.name]):
            continue
        shown = [m for m in emb if m != "text" and m in task.shown_by]
        if not shown:
            continue
        classes = class_embeddings(model, task, spec)
        values = list(task.values)
        truth = np.asarray([values.index(v) if v in values else -1 for v in batch[task.name]])
        for m in shown:
            keep = batch[f"{m}_mask"] & (truth >= 0)
            if keep.sum() == 0:
                continue
            pred = class_scores(emb[m][keep], classes).argmax(1)
            results.setdefault(task.name, {})[m] = float((pred == truth[keep]).mean())
    return results


# ----------------------------------------------------------------------------- plots and report
def plot_all(emb: dict, batch: dict, retrieval: dict, out: Path, colour_by: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    a, b = ("text", "video") if "video" in emb and "text" in emb else tuple(list(emb)[:2])
    n = min(32, len(emb[a]))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(emb[a][:n] @ emb[b][:n].T, cmap="viridis")
    ax.set(title=f"{a} x {b} cosine similarity (first {n} samples)", xlabel=b, ylabel=a)
    fig.colorbar(im)
    paths.append(out / "similarity_matrix.png")
    fig.savefig(paths[-1], dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, len(retrieval) * 0.6), 4))
    names = list(retrieval)
    for i, k in enumerate(("R@1", "R@5", "R@10")):
        ax.bar(np.arange(len(names)) + i * 0.27, [retrieval[p][k] for p in names], width=0.27, label=k)
    ax.set_xticks(np.arange(len(names)) + 0.27, names, rotation=60, ha="right")
    ax.set(ylim=(0, 1), title="cross-modal retrieval")
    ax.legend()
    paths.append(out / "retrieval_recall.png")
    fig.savefig(paths[-1], dpi=80, bbox_inches="tight")
    plt.close(fig)

    paths.append(plot_projection(emb, batch, out, plt, colour_by))
    return paths


def plot_projection(emb: dict, batch: dict, out: Path, plt, colour_by: str = "") -> Path:
    """PCA of all modalities' embeddings together; marker = modality, colour = the value of the
    attribute `colour_by` (values that name a colour are drawn in it), grey without one."""
    from matplotlib import colors as mcolors

    mods = list(emb)
    stacked = np.concatenate([emb[m][batch[f"{m}_mask"]] for m in mods])
    centred = stacked - stacked.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 6))
    start = 0
    markers = {"image": "o", "text": "s", "audio": "^", "video": "x"}
    n = len(batch["key"])
    labels = np.asarray(batch[colour_by] if colour_by in batch else [""] * n).astype(str)
    values = sorted({v for v in labels if v})
    named = values and all(v.lower() in mcolors.CSS4_COLORS for v in values)
    cycle = plt.get_cmap("tab10")
    palette = {v: (v.lower() if named else cycle(i % 10)) for i, v in enumerate(values)}
    for m in mods:
        keep = batch[f"{m}_mask"]
        part = xy[start:start + keep.sum()]
        start += keep.sum()
        ax.scatter(part[:, 0], part[:, 1], s=10, marker=markers.get(m, "o"), label=m,
                   c=[palette.get(v, "gray") for v in labels[keep]])
    by = f"coloured by {colour_by}" if values else "not coloured (no attribute declared to colour by)"
    ax.set(title=f"embeddings (PCA), {by}; marker = modality")
    ax.legend()
    path = out / "embedding_projection.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def headline(retrieval: dict, zeroshot: dict) -> dict[str, float]:
    accs = [acc for per_mod in zeroshot.values() for acc in per_mod.values()]
    # None, not NaN, when there is nothing to average: the summary is printed as strict JSON.
    out = {"zero_shot_min_acc": round(min(accs), 4) if accs else None,
           "zero_shot_mean_acc": round(float(np.mean(accs)), 4) if accs else None,
           "mean_R@1": round(float(np.mean([r["R@1"] for r in retrieval.values()])), 4) if retrieval else None}
    if "text->video" in retrieval:
        out["text->video_R@1"] = round(retrieval["text->video"]["R@1"], 4)
    return out


def flat_metrics(retrieval: dict, zeroshot: dict) -> dict[str, float]:
    """MLflow metric names: eval/text_to_video/R_at_1, eval/zero_shot/color/audio."""
    metrics = {f"eval/{pair.replace('->', '_to_')}/{k.replace('@', '_at_')}": v
               for pair, r in retrieval.items() for k, v in r.items()}
    metrics.update({f"eval/zero_shot/{attr}/{m}": v for attr, per in zeroshot.items() for m, v in per.items()})
    return metrics


def evaluate_model(model_dir: str, urls: str, split: str = "test", max_samples: int = 512,
                   batch_size: int = 128, log_to_mlflow: bool = False, out: str = "") -> dict:
    """Evaluate a model folder on held-out shards; optionally log into the active MLflow run."""

    declared = load_declaration(urls)
    if not declared.declared:
        log.warning("%s: the data set declares no evaluation (%s): only a sample itself counts as a "
                    "correct answer, and there is no zero-shot", urls, declared.source)
    model = load_model(model_dir).eval()
    spec = model.config.inputs
    modalities = [m for m in MODALITIES if m in model.modalities]
    batch = load_eval_batch(urls, split, modalities, spec, max_samples, declared.label_fields)
    emb = embed_all(model, batch, modalities, batch_size)
    retrieval = all_retrieval(emb, batch, declared)
    zeroshot = zero_shot(model, emb, batch, spec, declared)
    report = {"model": model_dir, "data": urls, "split": split, "samples": int(len(batch["key"])),
              "evaluation": declared.summary(), "retrieval": retrieval, "zero_shot": zeroshot,
              "headline": headline(retrieval, zeroshot)}
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="raybind-eval-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_report.json").write_text(json.dumps(report, indent=1))
    plots = plot_all(emb, batch, retrieval, folder, declared.plot_by)
    if log_to_mlflow:
        import mlflow

        mlflow.set_tag("raybind.eval_declared", str(declared.declared).lower())
        mlflow.log_metrics(flat_metrics(retrieval, zeroshot))
        mlflow.log_artifact(str(folder / "eval_report.json"), "eval")
        for p in plots:
            mlflow.log_artifact(str(p), "eval")
    report["report_dir"] = str(folder)
    return report


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """The CLI job: resolve the model reference, evaluate, log a run of its own."""
    import mlflow

    tcfg = tracking.TrackingConfig(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment)
    uri = tracking.configure(tcfg)
    model_dir = local_model_dir(cfg.model, uri)
    data = cfg.data or str(workspace.home() / "data" / "shapesworld")
    ensure_ray()
    with mlflow.start_run(run_name="evaluate") as run:
        mlflow.set_tags({"raybind.job": "evaluate", "raybind.model": cfg.model, "raybind.data": data})
        report = evaluate_model(model_dir, data, cfg.split, cfg.max_samples, cfg.batch_size, True, cfg.out)
    return {"job": "evaluate", "model": cfg.model, "samples": report["samples"],
            "declared": report["evaluation"]["declared"], **report["headline"],
            "zero_shot": report["zero_shot"], "report": report["report_dir"], "mlflow_run_id": run.info.run_id,
            "tracking_uri": uri}
