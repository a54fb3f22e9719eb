"""Operations end to end on a real local cluster that the test starts with `raybind cluster up`
(`ray start --head` with token auth + `mlflow server`, both on 127.0.0.1, their own work folder):
the job server refuses requests without the token; a submitted tiny pretraining succeeds with its
MLflow run and registered model; a failing job exits non-zero with its last log lines; the nightly
job promotes once and a second run on the same data changes nothing; a candidate that does not beat
the champion by the margin is not promoted. `raybind cluster down` must leave no process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.ops.cluster import session_pids

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MODEL = "ops-test"


def raybind(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAYBIND_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.run([str(Path(sys.executable).parent / "raybind"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def home():
    path = Path(tempfile.mkdtemp(prefix="rbops-", dir="/tmp"))  # short: Ray's socket paths live below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(home):
    up = raybind(home, "cluster", "up", "--set", "num_cpus=2", "--json")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    state = json.loads((home / "cluster" / "state.json").read_text())
    try:
        yield state
    finally:
        down = raybind(home, "cluster", "down")
        assert down.returncode == 0, down.stderr
        left = {part: session_pids(state[part]["sid"]) for part in ("ray", "mlflow")}
        assert left == {"ray": [], "mlflow": []}, f"cluster down left processes behind: {left}"
        assert not (home / "cluster" / "state.json").exists()


@pytest.fixture(scope="module")
def data(home, dataset_tools):
    """Two nightly snapshots (date-stamped folders) and a fixed held-out set, written with the real
    shard writer; the micro model config (the tiny size's tiny twin)."""
    from models.config import ModelConfig

    make_samples, write_dataset = dataset_tools
    root = home / "data" / "nightly"
    write_dataset(root / "2026-01-01", make_samples(64, seed=1), shard_size=32)
    heldout = write_dataset(home / "data" / "heldout", make_samples(120, seed=2), shard_size=60)
    micro = home / "micro.json"
    micro.write_text(json.dumps(ModelConfig.from_name("tiny").tiny_twin().to_dict()))
    return {"root": root, "heldout": heldout, "micro": micro}


def mlflow(cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cluster["mlflow_uri"], registry_uri=cluster["mlflow_uri"])


def aliases(cluster) -> dict[str, str]:
    return {a: str(v) for a, v in mlflow(cluster).get_registered_model(MODEL).aliases.items()}


def job_id(output: str) -> str:
    return re.search(r"submitted (\S+) to ", output).group(1)


def test_job_server_refuses_requests_without_the_token(cluster):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = f"{cluster['dashboard_url']}/api/jobs/"
    token = Path(cluster["token_path"]).read_text().strip()

    def status(headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status({}) == 401
    assert status({"Authorization": "Bearer not-the-token"}) == 403
    assert status({"Authorization": f"Bearer {token}"}) == 200
    with pytest.raises(AuthenticationError, match="Invalid authentication token"):
        JobSubmissionClient(cluster["dashboard_url"], headers={"Authorization": "Bearer wrong"}).list_jobs()
    assert oct(Path(cluster["token_path"]).stat().st_mode & 0o777) == "0o600"


def test_status_reports_the_cluster_and_up_again_starts_nothing(home, cluster):
    status = raybind(home, "cluster", "status", "--json")
    report = json.loads(status.stdout[status.stdout.index("{"):])
    assert report["up"] and report["job_server_http"] == 200 and report["job_server_without_token_http"] == 401
    again = raybind(home, "cluster", "up", "--json")
    assert again.returncode == 0 and "already up" in again.stderr  # progress on stderr, the summary on stdout
    assert json.loads(again.stdout)["job"] == "cluster up"
    assert json.loads((home / "cluster" / "state.json").read_text())["ray"]["sid"] == cluster["ray"]["sid"]


@pytest.fixture(scope="module")
def submitted_pretrain(home, cluster, data):
    """A tiny pretraining submitted as a Ray Job; it registers the first version (the champion)."""
    out = raybind(home, "submit", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                  "--set", f"data.train={data['root'] / '2026-01-01'}", "--set", f"model.name={data['micro']}",
                  "--set", "train.steps=4", "--set", "train.batch_size=8", "--set", "train.num_workers=1",
                  "--set", "train.checkpoint_every=4", "--set", "train.log_every=2", "--set", "optim.warmup_steps=1",
                  "--set", "eval.enabled=false", "--set", f"mlflow.registered_model={MODEL}",
                  "--set", "train.run_name=ops-pretrain", "--follow")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return job_id(out.stdout)


def test_submitted_pretrain_succeeds_with_its_mlflow_run(home, cluster, submitted_pretrain):
    listed = raybind(home, "jobs", "list", "--json")
    job = next(j for j in json.loads(listed.stdout) if j["id"] == submitted_pretrain)
    assert job["status"] == "SUCCEEDED" and job["pipeline"] == "pretrain"
    assert "pipelines.cli.job_entry pretrain --config configs/pretrain/tiny.yaml" in job["entrypoint"]
    runs = raybind(home, "runs", "list", "--json", "--job", "pretrain")
    report = json.loads(runs.stdout)
    assert report["tracking_uri"] == cluster["mlflow_uri"]  # found through the cluster's state file
    (run,) = [r for r in report["runs"] if r["name"] == "ops-pretrain"]
    assert run["status"] == "FINISHED" and run["metrics"]["train/loss"] > 0
    history = mlflow(cluster).get_metric_history(run["run_id"], "train/loss")
    assert [m.step for m in history] == [2, 4]
    (model,) = [m for m in report["models"] if m["name"] == MODEL]
    assert model["versions"][-1]["run_id"] == run["run_id"] and "champion" in model["versions"][-1]["aliases"]
    from ray.job_submission import JobSubmissionClient

    token = Path(cluster["token_path"]).read_text().strip()
    client = JobSubmissionClient(cluster["dashboard_url"], headers={"Authorization": f"Bearer {token}"})
    assert "raybind pretrain: summary" in client.get_job_logs(submitted_pretrain)
    assert client.get_job_info(submitted_pretrain).runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == cluster["mlflow_uri"]


def test_failing_job_exits_nonzero_with_its_last_log_lines(home, cluster):
    out = raybind(home, "submit", "pretrain", "--set", f"data.train={home / 'no-such-data'}",
                  "--set", "train.steps=2", "--follow")
    assert out.returncode == 1, out.stdout[-2000:]
    assert re.search(r"job \S+ FAILED", out.stderr) and "last 30 log lines" in out.stderr
    assert "no shards found" in out.stderr  # the job's own error, from its log
    status = {j["id"]: j["status"] for j in json.loads(raybind(home, "jobs", "list", "--json").stdout)}
    assert status[job_id(out.stdout)] == "FAILED"


def nightly_config(home: Path, data: dict, min_margin: float) -> Path:
    path = home / f"nightly-{min_margin}.yaml"
    path.write_text(json.dumps({
        "data": {"root": str(data["root"]), "heldout": str(data["heldout"]), "max_samples": 64, "batch_size": 64},
        "gate": {"metrics": ["mean_R@1"], "min_margin": min_margin},
        "index": {"batch_size": 32, "root": str(home / "index")},
        "mlflow": {"registered_model": MODEL},
        "pretrain": {"model": {"name": str(data["micro"])}, "optim": {"lr": 2e-3, "warmup_steps": 1},
                     "train": {"steps": 4, "batch_size": 8, "num_workers": 1, "checkpoint_every": 4, "log_every": 2},
                     "eval": {"enabled": False}}}))
    return path


def registry_snapshot(cluster) -> dict:
    c = mlflow(cluster)
    runs = c.search_runs([c.get_experiment_by_name("raybind").experiment_id], max_results=100)
    return {"aliases": aliases(cluster), "versions": len(c.search_model_versions(f"name = '{MODEL}'")),
            "runs": sorted((r.info.run_id, r.info.status) for r in runs)}


def test_nightly_promotes_once_then_changes_nothing(home, cluster, data, submitted_pretrain):
    assert aliases(cluster) == {"candidate": "1", "champion": "1"}
    # A margin every candidate passes: this night must promote, whatever 4 steps did to the metric.
    config = nightly_config(home, data, min_margin=-1.0)
    out = raybind(home, "submit", "nightly", "--config", str(config), "--follow")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert aliases(cluster) == {"candidate": "2", "champion": "2", "previous": "1"}
    c = mlflow(cluster)
    (run,) = c.search_runs([c.get_experiment_by_name("raybind").experiment_id], "tags.`raybind.job` = 'nightly'")
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["raybind.nightly.decision"] == "promoted v2"
    assert tags["raybind.nightly.champion_before"] == "1" and tags["raybind.night"].startswith("2026-01-01-")
    assert metrics["promoted"] == 1.0
    assert metrics["delta/mean_R_at_1"] == pytest.approx(metrics["candidate/mean_R_at_1"]
                                                         - metrics["champion/mean_R_at_1"])
    assert "nightly: gate: mean_R@1: candidate" in out.stdout  # every decision is printed too
    index = json.loads((home / "index" / "v2" / "index.json").read_text())
    assert index["model_version"] == "2" and tags["raybind.nightly.index"] == str(home / "index" / "v2")
    assert tags["raybind.nightly.serve"] == "skipped"  # no Serve app on this cluster: said, not failed

    before = registry_snapshot(cluster)
    again = raybind(home, "nightly", "--config", str(config))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished (promoted v2" in again.stderr and "nothing to do" in again.stderr
    assert registry_snapshot(cluster) == before
    assert sorted(p.name for p in (home / "index").iterdir()) == ["v2"]


def test_candidate_not_better_by_the_margin_is_not_promoted(home, cluster, data, dataset_tools):
    make_samples, write_dataset = dataset_tools
    write_dataset(data["root"] / "2026-01-02", make_samples(64, seed=3), shard_size=32)  # new shards: a new night
    champion = aliases(cluster)["champion"]
    # No model gains 1.0 in R@1 over another: the gate must refuse whatever the numbers are. Run
    # directly this time (the driver joins the cluster through its state file), not as a Ray Job.
    out = raybind(home, "nightly", "--config", str(nightly_config(home, data, min_margin=1.0)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    now = aliases(cluster)
    assert now["champion"] == champion and now["candidate"] == str(int(champion) + 1)
    c = mlflow(cluster)
    run = c.search_runs([c.get_experiment_by_name("raybind").experiment_id], "tags.`raybind.job` = 'nightly'",
                        order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.data.tags["raybind.night"].startswith("2026-01-02-")
    assert run.data.tags["raybind.nightly.decision"] == f"kept v{champion} (v{now['candidate']} not better)"
    assert run.data.metrics["promoted"] == 0.0 and run.data.metrics["delta/mean_R_at_1"] < 1.0
    assert "FAIL" in out.stderr and not (home / "index" / f"v{now['candidate']}").exists()
