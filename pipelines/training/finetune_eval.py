"""Evaluation of a fine-tuned model on the held-out split, on the driver: accuracy, macro F1 and a
confusion matrix for classifiers; retrieval R@K against the parent model for retrieval tuning."""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoint import load_model
from models.heads import classification_metrics, load_classifier
from pipelines.data.read import ReaderConfig, read_shards
from pipelines.eval.declared import load_declaration
from pipelines.eval.evaluate import all_retrieval, embed_all, flat_metrics
from pipelines.training.finetune_config import FinetuneConfig, ParentModel
from pipelines.training.finetune_tasks import (
    LabelSpec,
)


# ----------------------------------------------------------------------------- evaluation (driver)
def load_heldout(urls: str, split: str, modalities, spec, label_fields, max_samples: int) -> dict:
    """Up to `max_samples` decoded held-out samples (file order) as one batch of numpy arrays."""
    import numpy as np

    reader = ReaderConfig(modalities=tuple(modalities), split=split, shuffle_shards=False, shuffle_window=0,
                          label_fields=tuple(label_fields))
    parts = list(read_shards(urls, config=reader, spec=spec).limit(max_samples)
                 .iter_batches(batch_size=256, batch_format="numpy"))
    if not parts:
        raise ValueError(f"{urls}: no samples in split {split!r}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(cfg: FinetuneConfig, model_dir: str, parent: ParentModel, label: LabelSpec | None, urls: str) -> dict:
    """Score the fine-tuned artefact on the held-out split and log it into the active MLflow run."""
    import tempfile

    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="raybind-finetune-eval-"))
    report = (evaluate_retrieval(cfg, model_dir, parent, urls) if label is None
              else evaluate_classification(cfg, model_dir, label, urls, folder))
    mlflow.log_metrics(report.pop("metrics"))
    (folder / "eval_report.json").write_text(json.dumps(report, indent=1, default=str))
    for path in sorted(folder.iterdir()):
        mlflow.log_artifact(str(path), "eval")
    report["report_dir"] = str(folder)
    return report


def predict(model, batch: dict, modalities, batch_size: int):
    import numpy as np
    import torch

    preds = []
    with torch.no_grad():
        for start in range(0, len(batch["key"]), batch_size):
            window = slice(start, start + batch_size)
            inputs = {m: torch.as_tensor(batch[m][window]) for m in modalities}
            masks = {m: torch.as_tensor(batch[f"{m}_mask"][window]) for m in modalities}
            preds.append(model(inputs, masks).argmax(1).numpy())
    return np.concatenate(preds)


def evaluate_classification(cfg: FinetuneConfig, model_dir: str, label: LabelSpec, urls: str, folder: Path) -> dict:
    """Accuracy, macro-F1 and a confusion-matrix plot; the majority class is the baseline to beat."""
    import numpy as np

    model = load_classifier(model_dir).eval()
    mods = model.head_config.modalities
    batch = load_heldout(urls, cfg.eval.split, mods, model.backbone.config.inputs, label.fields, cfg.eval.max_samples)
    present = np.stack([batch[f"{m}_mask"] for m in mods]).any(0)
    truth = np.where(present, label.ids(batch).numpy(), -1)
    scores = classification_metrics(predict(model, batch, mods, cfg.eval.batch_size), truth, len(label.classes))
    known = truth[truth >= 0]
    majority = float(np.bincount(known).max() / len(known)) if len(known) else 0.0
    plot_confusion(scores.confusion, label, folder / "confusion_matrix.png")
    headline = {"accuracy": round(scores.accuracy, 4), "macro_f1": round(scores.macro_f1, 4),
                "majority_class_accuracy": round(majority, 4), "samples": scores.support}
    rows = [["accuracy", f"{scores.accuracy:.3f}", f"{majority:.3f}", f"{1 / len(label.classes):.3f}"],
            ["macro-F1", f"{scores.macro_f1:.3f}", "", ""]]
    return {"headline": headline, "confusion": scores.confusion.tolist(), "classes": list(label.classes),
            "metrics": {f"eval/{k}": float(v) for k, v in headline.items()},
            "table": markdown_table(["metric", "fine-tuned", "majority class", "chance"], rows)}


def evaluate_retrieval(cfg: FinetuneConfig, model_dir: str, parent: ParentModel, urls: str) -> dict:
    """R@1/5/10 and median rank both ways over the pair, for the starting model and the tuned one."""

    pair, e = cfg.task.modalities, cfg.eval
    tuned, start = load_model(model_dir).eval(), load_model(parent.local_dir).eval()
    # What counts as a hit is what the data set declares (as `raybind evaluate` scores); with no
    # declaration only the sample itself matches.
    declared = load_declaration(urls)
    batch = load_heldout(urls, e.split, pair, tuned.config.inputs, declared.label_fields, e.max_samples)
    after = all_retrieval(embed_all(tuned, batch, pair, e.batch_size), batch, declared)
    before = all_retrieval(embed_all(start, batch, pair, e.batch_size), batch, declared)
    metrics = {**flat_metrics(after, {}),
               **{k.replace("eval/", "eval/start_model/"): v for k, v in flat_metrics(before, {}).items()}}
    rows = [[d, *(f"{before[d][k]:.3f} -> {after[d][k]:.3f}" for k in ("R@1", "R@5", "R@10"))] for d in after]
    return {"headline": {f"{d}/{k}": round(r[k], 4) for d, r in after.items() for k in ("R@1", "R@5", "R@10")},
            "retrieval": after, "start_model_retrieval": before, "metrics": metrics,
            "evaluation": declared.summary(),
            "table": markdown_table(["direction", "R@1 start -> tuned", "R@5", "R@10"], rows)}


def plot_confusion(confusion, label: LabelSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)  # rows: recall per true class
    n = len(label.classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), max(4, 0.45 * n + 1.5)))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), label.classes, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(n), label.classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"{label.name}: confusion (row-normalised)")
    fig.colorbar(im)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
