"""Pretraining end to end on a real local Ray cluster and a real `mlflow server` on 127.0.0.1:
tracking, registry round trip, resume mid-epoch, a killed worker, a corrupt shard, bad configs."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from pipelines.core.config import ConfigError, load_config
from pipelines.data.write.synth import SynthConfig, synthesize
from pipelines.training.pretrain import PretrainConfig, run_pretrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("pretrain_data") / "ds"
    synthesize(SynthConfig(out=str(out), samples=240, shard_size=60, seed=0, p_missing_audio=0.1))
    return out


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> str:
    """The tiny size's tiny twin, as a config file: the same code path, seconds per run."""
    path = tmp_path_factory.mktemp("model") / "micro.json"
    path.write_text(json.dumps(ModelConfig.from_name("tiny").tiny_twin().to_dict()))
    return str(path)


def config(shards, micro_model, mlflow_uri, tmp_path, **train) -> PretrainConfig:
    overrides = [f"data.train={shards}", f"model.name={micro_model}", f"mlflow.tracking_uri={mlflow_uri}",
                 f"train.storage={tmp_path / 'runs'}", "train.batch_size=8", "train.log_every=2",
                 "train.checkpoint_every=4", "eval.max_samples=64", "optim.warmup_steps=2",
                 "mlflow.registered_model=test-binding", "mlflow.experiment=pretrain-tests"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(PretrainConfig, None, overrides)


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_end_to_end_tracks_registers_and_reloads(shards, micro_model, mlflow_server, tmp_path):
    import mlflow

    from models.checkpoint import load_model
    from pipelines.registry.model_registry import local_model_dir

    summary = run_pretrain(config(shards, micro_model, mlflow_server, tmp_path, steps=8, run_name="e2e"))
    c = client(mlflow_server)
    run = c.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and summary["steps"] == 8
    assert run.data.params["train.steps"] == "8" and run.data.tags["raybind.git_commit"]
    assert run.data.tags["raybind.num_shards"] == "4" and run.data.tags["raybind.shards_hash"]
    # The workers ran with OpenMP's passive wait (pretrain.train_worker_env) and their thread count.
    assert run.data.tags["raybind.omp_wait_policy"] == "PASSIVE" and run.data.tags["raybind.torch_threads"] == "1"
    history = c.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6, 8] and all(np.isfinite(m.value) for m in history)
    for key in ("train/loss/image-text", "train/loss/text-video", "train/lr", "train/logit_scale",
                "train/samples_per_s", "train/data_wait_fraction", "eval/text_to_video/R_at_1",
                "eval/zero_shot/color/audio"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config", "eval", "checkpoints"} <= artifacts
    eval_files = {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval_report.json", "eval/similarity_matrix.png", "eval/embedding_projection.png"} <= eval_files

    reg = summary["registered"]
    assert reg["name"] == "test-binding" and "champion" in reg["aliases"]
    by_version = local_model_dir(f"models:/test-binding/{reg['version']}", mlflow_server)
    by_alias = local_model_dir("models:/test-binding@candidate", mlflow_server)
    text = torch.randint(0, 1000, (3, ModelConfig.from_file(micro_model).inputs.context_length))
    a = load_model(by_version).eval().encode("text", text)
    b = load_model(by_alias).eval().encode("text", text)
    assert torch.equal(a, b)
    pyfunc = mlflow.pyfunc.load_model(f"models:/test-binding/{reg['version']}")
    out = pyfunc.predict(__import__("pandas").DataFrame({"text": ["a red circle moving left"]}))
    assert len(out["text_embedding"][0]) == ModelConfig.from_file(micro_model).embed_dim


def test_resume_continues_at_step_and_data_position(shards, micro_model, mlflow_server, tmp_path):
    from pipelines.training.data import latest_position

    first = run_pretrain(config(shards, micro_model, mlflow_server, tmp_path, steps=4, run_name="resume"))
    global_batch = 8 * 2
    assert latest_position(first["storage"]) == 4 * global_batch
    second = run_pretrain(config(shards, micro_model, mlflow_server, tmp_path, steps=10, run_name="resume"))
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["steps"] == 10
    assert latest_position(second["storage"]) == 10 * global_batch
    steps = [m.step for m in client(mlflow_server).get_metric_history(second["mlflow_run_id"], "train/loss")]
    assert steps == [2, 4, 6, 8, 10]  # 6..10 come from the resumed run, nothing logged twice


def train_worker_pids() -> list[int]:
    """PIDs of Ray Train worker processes (their title is `ray::RayTrainWorker...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_killed_worker_restores_and_finishes(shards, micro_model, mlflow_server, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if list(run_dir.glob("checkpoint_step_*/state.json")):
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_pretrain(config(shards, micro_model, mlflow_server, tmp_path, steps=16, run_name="killed",
                                  max_failures=2))
    thread.join(timeout=1)
    assert killed, "no training worker was killed: the test did not exercise a failure"
    assert summary["steps"] == 16
    history = client(mlflow_server).get_metric_history(summary["mlflow_run_id"], "train/loss")
    assert max(m.step for m in history) == 16


def test_corrupt_member_is_counted_in_the_run(shards, micro_model, mlflow_server, tmp_path):
    # Two truncated JPEGs among the train samples of EVERY shard: a 2-step run reads only the first
    # shard or two of its shuffled order, and samples of other splits are filtered before decoding.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in shards.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        train = [m.name.split(".")[0] for m, data in members
                 if m.name.endswith(".json") and json.loads(data)["split"] == "train"]
        with tarfile.open(bad / shard.name, "w") as dst:
            for m, data in members:
                if m.name.endswith(".jpg") and m.name.split(".")[0] in train[:2]:
                    data = data[: len(data) // 3]
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    summary = run_pretrain(config(bad, micro_model, mlflow_server, tmp_path, steps=2, run_name="corrupt",
                                  checkpoint_every=2))
    metrics = client(mlflow_server).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics.get("data/skipped/corrupt_image", 0) >= 1, metrics


def test_train_workers_wait_passively_unless_told(monkeypatch):
    from pipelines.training.pretrain import train_worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert train_worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert train_worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_bad_config_fails_before_any_worker(shards, micro_model, tmp_path):
    with pytest.raises(ConfigError, match="model.name: 'huge' is not a registered size"):
        load_config(PretrainConfig, None, ["model.name=huge"])
    with pytest.raises(ConfigError, match="model.lock: 'smell' is not a modality"):
        load_config(PretrainConfig, None, ["model.lock=[smell]"])
    with pytest.raises(ConfigError, match="train.batch_size: must be >= 2"):
        load_config(PretrainConfig, None, ["train.batch_size=1"])
    cfg = config(tmp_path / "nowhere", micro_model, "sqlite:///" + str(tmp_path / "m.db"), tmp_path, steps=2)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no shards found"):
        run_pretrain(cfg)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "runs").exists()


def test_cached_epochs_replay_the_split_in_new_orders(shards, micro_model, tmp_path):
    from pipelines.data.read import ReaderConfig
    from pipelines.training.data import DataConfig, TrainStream, resolve_data

    cfg = DataConfig(train=str(shards), reader=ReaderConfig(modalities=("image", "text")), cache_decoded=True)
    data = resolve_data(cfg)
    per = data.samples_per_epoch
    stream = TrainStream(data=data, config=cfg, spec_dict=json.loads(Path(micro_model).read_text())["inputs"],
                         run_dir=str(tmp_path / "no-checkpoints"), samples_needed=2 * per)

    def keys(ds) -> list[str]:
        # No map before take_all: Ray Data runs a map's tasks in parallel and, by default, lets their
        # blocks arrive in any order, which is not the stream's.
        return [row["key"] for row in ds.take_all()]

    full = keys(stream())  # from step 0: the run's 2 epochs plus one spare
    assert len(full) == 3 * per
    epochs = [full[i * per:(i + 1) * per] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == per for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch has an order of its own
    resumed = keys(stream.replayed_epochs(1, 5, 1))  # a resumed run: epoch 1 after 5 samples
    assert resumed == epochs[1][5:]
    # The driver decodes the split up front (prepared); the stream it hands Ray Train replays the
    # very same rows in the very same orders, and preparing twice decodes once.
    prepared = stream.prepared()
    assert len(prepared.decoded_blocks) > 1 and prepared.prepared() is prepared
    assert keys(prepared()) == full
    assert keys(prepared.replayed_epochs(1, 5, 1)) == resumed
    streaming = dataclasses.replace(stream, config=dataclasses.replace(cfg, cache_decoded=False))
    assert streaming.prepared() is streaming  # nothing decoded ahead without the cache


def pretrain_command(shards, micro_model, mlflow_uri, tmp_path, steps: int) -> list[str]:
    sets = [f"data.train={shards}", f"model.name={micro_model}", f"mlflow.tracking_uri={mlflow_uri}",
            f"train.storage={tmp_path / 'runs'}", "train.batch_size=8", "train.log_every=2",
            "train.checkpoint_every=4", "eval.enabled=false", "optim.warmup_steps=2",
            "mlflow.registered_model=", "mlflow.experiment=pretrain-tests", f"train.steps={steps}",
            "train.run_name=preempted"]
    return [str(Path(sys.executable).parent / "raybind"), "pretrain", "--json",
            *(a for item in sets for a in ("--set", item))]


def kill_processes_under(folder: Path) -> None:
    """What a killed driver left of its own Ray cluster (processes started in its Ray temp folder)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue


def test_a_killed_driver_resumes_without_surprises(shards, micro_model, mlflow_server, tmp_path):
    """The driver's whole process group is SIGKILLed after step 6 (checkpoint at 4); the same command
    again resumes from step 4, logs no step twice, and the run says what happened. Then the newest
    checkpoint is truncated: a longer run skips it with a warning. The same command once more says
    the run is finished and changes nothing."""
    home = Path(tempfile.mkdtemp(prefix="rbkill-", dir="/tmp"))  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAYBIND_HOME=str(home), PYTHONUNBUFFERED="1")
    command = pretrain_command(shards, micro_model, mlflow_server, tmp_path, steps=12)
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    started, lines = time.monotonic(), []
    try:
        for line in driver.stderr:
            lines.append(line)
            if "step 6/12" in line or time.monotonic() - started > 300:
                break
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        kill_processes_under(home)
    said = "".join(lines)
    assert "step 6/12" in said, said[-3000:]
    assert "MLflow run " in said and "checkpoints in " in said  # told before it was killed
    c = client(mlflow_server)
    run_id = said.split("MLflow run ", 1)[1].split()[0]
    assert c.get_run(run_id).info.status == "RUNNING"  # nothing could end it
    # Worker log lines reach the driver with a lag: the workers may have passed the step-8
    # checkpoint before the kill. What was logged and checkpointed by then is what counts.
    logged_before = max(m.step for m in c.get_metric_history(run_id, "train/loss"))

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["mlflow_run_id"] == run_id and summary["steps"] == 12
    resumed = re.search(r"resumed at step (\d+)", again.stderr)
    assert resumed and int(resumed.group(1)) in (4, 8), again.stderr[-3000:]
    if logged_before > int(resumed.group(1)):  # steps logged after that checkpoint ran again
        assert "(replayed after a restart" in again.stderr
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raybind.interrupted_attempts"] == "1"
    for metric in ("train/loss", "train/lr", "train/samples_seen"):
        steps = [m.step for m in c.get_metric_history(run_id, metric)]
        assert steps == [2, 4, 6, 8, 10, 12], (metric, steps)  # no step twice

    run_dir = Path(summary["storage"])
    newest = run_dir / "checkpoint_step_00000012" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    longer = subprocess.run(pretrain_command(shards, micro_model, mlflow_server, tmp_path, steps=14),
                            env=env, capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "skipping checkpoint" in longer.stderr and "checkpoint_step_00000012" in longer.stderr
    assert "resumed at step 8" in longer.stderr and json.loads(longer.stdout)["steps"] == 14

    before = c.get_run(run_id)
    same = subprocess.run(pretrain_command(shards, micro_model, mlflow_server, tmp_path, steps=14),
                          env=env, capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr[-3000:]
    assert json.loads(same.stdout)["status"] == "already finished" and "nothing to do" in same.stderr
    after = c.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    shutil.rmtree(home, ignore_errors=True)
