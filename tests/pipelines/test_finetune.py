"""Fine-tuning end to end on a real local Ray cluster (2 CPU workers) and a real `mlflow server`:
each task trains a few steps through the shared loop, is evaluated and tracked; a fine-tuned model
registers, links to its parent and reloads; bad `init.from_model` references fail before any worker;
frozen towers are bit-for-bit unchanged. Without Ray: every task's build / compute / export /
load_weights (what a resumed or restarted worker relies on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.binding import BindingModel
from models.checkpoint import ConfigMismatchError, save_model
from models.config import ModelConfig
from pipelines.core.config import ConfigError, load_config
from pipelines.data.write.synth import SynthConfig, synthesize
from pipelines.registry.model_registry import ModelNotFoundError
from pipelines.training.finetune import run_finetune
from pipelines.training.finetune_config import PARENT_TAG, PARENT_URI_TAG, PARENT_VERSION_TAG, FinetuneConfig

PARENT = "ft-test-pretrained"


def ray_test(fn):
    return pytest.mark.ray(pytest.mark.slow(fn))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("finetune_data") / "ds"
    synthesize(SynthConfig(out=str(out), samples=120, shard_size=40, seed=1))
    return out


@pytest.fixture(scope="module")
def micro_config() -> ModelConfig:
    return ModelConfig.from_name("tiny").tiny_twin()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, micro_config, mlflow_server) -> dict:
    """One micro binding model, saved and registered once (alias champion) for the whole module.
    The folder is named `binding`: MLflow keeps an artifact folder's base name and the registry
    reads `artifacts/binding` back."""
    import mlflow

    torch.manual_seed(0)
    folder = save_model(BindingModel(micro_config), tmp_path_factory.mktemp("parent") / "binding")
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    mlflow.set_experiment("finetune-tests")
    from pipelines.registry.model_registry import register_model

    with mlflow.start_run(run_name="parent") as run:
        reg = register_model(str(folder), PARENT, run.info.run_id)
    return {"folder": folder, **reg}


def config(shards, mlflow_uri, tmp_path, *overrides: str, steps: int = 4) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, settings(shards, mlflow_uri, tmp_path, *overrides, steps=steps))


def settings(shards, mlflow_uri, tmp_path, *overrides: str, steps: int = 4) -> list[str]:
    base = [f"data.train={shards}", f"mlflow.tracking_uri={mlflow_uri}", "mlflow.experiment=finetune-tests",
            f"train.storage={tmp_path / 'runs'}", f"train.steps={steps}", "train.batch_size=8",
            "train.log_every=2", f"train.checkpoint_every={steps}", "optim.warmup_steps=1",
            "eval.max_samples=32", "mlflow.registered_model=", "train.log_checkpoints_to_mlflow=false", f"init.from_model=models:/{PARENT}@champion",
            "task.head.width=32", "task.head.layers=1", "task.head.heads=2", "task.head.hidden_dim=32"]
    return [*base, *overrides]


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def final_model(summary: dict) -> Path:
    return sorted(Path(summary["storage"]).glob("checkpoint_step_*"))[-1] / "model"


@ray_test
def test_late_fusion_registers_links_parent_and_reloads(shards, pretrained, mlflow_server, tmp_path):
    from models.heads import load_classifier
    from pipelines.registry.model_registry import local_model_dir

    summary = run_finetune(config(shards, mlflow_server, tmp_path, "task.fusion=late", "train.run_name=late",
                                  "mlflow.registered_model=ft-test-classifier"))
    c = client(mlflow_server)
    run = c.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and summary["steps"] == 4
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    for key in ("train/accuracy", "eval/accuracy", "eval/macro_f1", "eval/majority_class_accuracy"):
        assert key in run.data.metrics, key
    assert {"eval/confusion_matrix.png", "eval/eval_report.json"} <= {
        a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    assert run.data.tags[PARENT_TAG] == f"models:/{PARENT}@champion"
    assert "| accuracy |" in summary["table"]

    reg = summary["registered"]
    version = c.get_model_version(reg["name"], reg["version"])
    assert version.tags[PARENT_TAG] == f"models:/{PARENT}@champion"
    assert version.tags[PARENT_VERSION_TAG] == pretrained["version"]
    assert version.tags[PARENT_URI_TAG] == f"models:/{PARENT}/{pretrained['version']}"
    reloaded = load_classifier(local_model_dir(f"models:/{reg['name']}@candidate", mlflow_server)).eval()
    assert reloaded.head_config.classes[0] == "circle+steady" and len(reloaded.head_config.classes) == 12
    trained = load_classifier(final_model(summary)).eval()
    audio = torch.randn(2, *reloaded.backbone.config.inputs.shape("audio"))
    image = torch.randn(2, *reloaded.backbone.config.inputs.shape("image"))
    torch.testing.assert_close(reloaded({"image": image, "audio": audio}), trained({"image": image, "audio": audio}))


@ray_test
@pytest.mark.parametrize("fusion", ["early", "middle"])
def test_token_fusion_runs_end_to_end(shards, pretrained, mlflow_server, tmp_path, fusion):
    # Held-out scoring is covered by the other tests; skipping it here keeps the file fast.
    summary = run_finetune(config(shards, mlflow_server, tmp_path, f"task.fusion={fusion}", "eval.enabled=false",
                                  f"train.run_name={fusion}", "task.modalities=[image,audio,video]"))
    assert summary["steps"] == 4
    run = client(mlflow_server).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0


def changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


@ray_test
def test_linear_probe_trains_the_head_only(shards, pretrained, mlflow_server, tmp_path):
    start = load_file(str(pretrained["folder"] / "model.safetensors"))
    summary = run_finetune(config(shards, mlflow_server, tmp_path, "task.kind=linear_probe",
                                  "task.modalities=[audio]", "task.label=rhythm", "train.run_name=probe",
                                  "eval.enabled=false"))
    model = final_model(summary)
    after = load_file(str(model / "model.safetensors"))
    assert set(after) == set(start) and changed(start, after, "") == set()  # every backbone tensor frozen
    head_json = json.loads((model / "head.json").read_text())
    assert head_json["fusion"] == "probe" and head_json["classes"] == ["steady", "pulsing", "chirping"]
    history = client(mlflow_server).get_metric_history(summary["mlflow_run_id"], "train/loss")
    assert len(history) == 2 and all(m.value == m.value for m in history)


@ray_test
def test_retrieval_with_a_locked_tower(shards, pretrained, mlflow_server, tmp_path):
    start = load_file(str(pretrained["folder"] / "model.safetensors"))
    # Through the real CLI, as a user pipes it: `raybind finetune ... --json | jq` needs stdout to be
    # the summary alone (Ray's worker logs and the step lines go to stderr) and strict JSON.
    sets = settings(shards, mlflow_server, tmp_path, "task.kind=retrieval", "task.modalities=[audio,text]",
                    "init.lock=[text]", "train.run_name=retr")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(Path(sys.executable).parent / "raybind"), "finetune", "--json",
                          *(a for item in sets for a in ("--set", item))],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert "pid=" in out.stderr and "pid=" not in out.stdout  # worker logs reached the driver, on stderr
    after = load_file(str(final_model(summary) / "model.safetensors"))
    assert changed(start, after, "encoders.text.") == set() and changed(start, after, "heads.text.") == set()
    assert changed(start, after, "encoders.audio.") and changed(start, after, "heads.audio.")
    assert changed(start, after, "encoders.image.") == set()  # not part of the pair: untouched
    metrics = client(mlflow_server).get_run(summary["mlflow_run_id"]).data.metrics
    assert "eval/audio_to_text/R_at_1" in metrics and "eval/start_model/text_to_audio/R_at_5" in metrics


@ray_test
def test_bad_references_fail_before_any_worker(shards, pretrained, micro_config, mlflow_server, tmp_path):
    import dataclasses

    no_audio = save_model(BindingModel(dataclasses.replace(micro_config, audio=None)), tmp_path / "no_audio")
    cases = [
        ("init.from_model=models:/no-such-model@champion", ModelNotFoundError, "no registered model named"),
        (f"init.from_model=models:/{PARENT}@nightly", ModelNotFoundError, "has no alias 'nightly'"),
        (f"init.from_model=models:/{PARENT}/99", ModelNotFoundError, "has no version '99'"),
        (f"init.from_model={tmp_path / 'empty'}", ModelNotFoundError, "no model there"),
        (f"init.from_model={no_audio}", ConfigMismatchError, r"need \['audio'\], but this model encodes only"),
        ("task.label=shape+smell", ConfigError, r"task.label: \['smell'\] have no vocabulary"),
    ]
    for override, error, message in cases:
        started = time.monotonic()
        with pytest.raises(error, match=message):
            run_finetune(config(shards, mlflow_server, tmp_path, override))
        assert time.monotonic() - started < 15, override
    assert not (tmp_path / "runs").exists()  # no trainer was ever built
    with pytest.raises(ConfigError, match="init.from_model: required"):
        load_config(FinetuneConfig, None, [])
    with pytest.raises(ConfigError, match="task.modalities: a linear probe reads one modality"):
        load_config(FinetuneConfig, None, ["init.from_model=x", "task.kind=linear_probe"])
    with pytest.raises(ConfigError, match=r"init.lock: \['text'\] are not among task.modalities"):
        load_config(FinetuneConfig, None, ["init.from_model=x", "init.lock=[text]"])


# ----------------------------------------------------------------------------- tasks, without Ray
def fake_batch(config: ModelConfig, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch: dict = {}
    for m in config.modalities:
        shape = (n, *config.inputs.shape(m))
        batch[m] = torch.randint(0, 100, shape, generator=gen) if m == "text" else torch.randn(shape, generator=gen)
        batch[f"{m}_mask"] = torch.ones(n, dtype=torch.bool)
    batch["audio_mask"] = torch.tensor([True, True, True, False])
    batch["shape"], batch["rhythm"] = ["circle", "cross", "square", "circle"], ["steady", "chirping", "odd", "steady"]
    return batch


def tasks_for(micro_config, folder: str) -> dict:
    from models.heads import HeadConfig
    from pipelines.training.finetune_tasks import (
        ClassificationTask,
        LabelSpec,
        LinearProbeTask,
        RetrievalTask,
    )
    from pipelines.training.tasks import LossConfig

    label = LabelSpec(("shape", "rhythm"), ("circle+steady", "cross+chirping", "square+steady"))
    cfg = micro_config.to_dict()

    def head(fusion, mods):
        return HeadConfig(fusion=fusion, modalities=mods, classes=label.classes, width=32, layers=1, heads=2).to_dict()

    return {"early": ClassificationTask(cfg, head("early", ("image", "audio")), label, init_from=folder),
            "middle": ClassificationTask(cfg, head("middle", ("video", "audio")), label, init_from=folder,
                                         lock=("video",)),
            "probe": LinearProbeTask(cfg, head("probe", ("audio",)), label, init_from=folder),
            "retrieval": RetrievalTask(cfg, LossConfig(), ("audio", "text"), lock=("text",), init_from=folder)}


@pytest.mark.parametrize("kind", ["early", "middle", "probe", "retrieval"])
def test_task_step_export_and_load_weights(micro_config, tmp_path, kind):
    folder = save_model(BindingModel(micro_config), tmp_path / "parent")
    task = tasks_for(micro_config, str(folder))[kind]
    module = task.build()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = task.compute(module, fake_batch(micro_config), rank=0, world_size=1)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss) and "loss" in out.metrics
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    task.export(module, tmp_path / "ckpt")
    again = tasks_for(micro_config, "")[kind].build()  # what a restarted worker builds, then restores
    task.load_weights(again, tmp_path / "ckpt")
    mine, theirs = module.state_dict(), again.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_labels_become_ids_and_unusable_samples_are_ignored(micro_config):
    from pipelines.training.finetune_tasks import IGNORE

    task = tasks_for(micro_config, "")["probe"]  # reads audio only; sample 3 has none
    batch = fake_batch(micro_config)
    assert task.label.ids(batch).tolist() == [0, 1, IGNORE, 0]  # "square+odd" is not a class
    masks = {"audio": batch["audio_mask"]}
    assert task.targets(batch, masks, "cpu").tolist() == [0, 1, IGNORE, IGNORE]
