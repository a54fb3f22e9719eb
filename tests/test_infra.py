"""infra/: every manifest parses, uses only the KubeRay / Kubernetes field names listed here (KubeRay
ray.io/v1 as of v1.5.1, which added authOptions; batch/v1 CronJob; apps/v1 Deployment), and matches
the project: one image built from infra/Dockerfile at the installed Ray version, `raybind` commands
the real CLI parses, config files that exist and load with their --set overrides, a Serve config that
Ray's schema and the serving settings accept. No cluster needed."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE_ROOT = "/home/ray/raybind"  # WORKDIR of infra/Dockerfile: the repo's files live there
IMAGE_NAME = "ghcr.io/raybind/raybind"

# Allowed fields per object type (a typo such as `entryPoint` or `authOption` fails here).
FIELDS = {
    "RayClusterSpec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "authOptions",
                       "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"},
    "AuthOptions": {"mode"},
    "HeadGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"},
    "RayJobSpec": {"entrypoint", "runtimeEnvYAML", "jobId", "metadata", "shutdownAfterJobFinishes",
                   "ttlSecondsAfterFinished", "activeDeadlineSeconds", "rayClusterSpec", "clusterSelector",
                   "submitterPodTemplate", "submitterConfig", "entrypointNumCpus", "entrypointNumGpus",
                   "entrypointResources", "suspend", "submissionMode", "backoffLimit", "managedBy", "deletionStrategy"},
    "RayServiceSpec": {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                       "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy",
                       "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds"},
    "CronJobSpec": {"schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend", "jobTemplate",
                    "successfulJobsHistoryLimit", "failedJobsHistoryLimit"},
    "JobSpec": {"parallelism", "completions", "activeDeadlineSeconds", "backoffLimit", "template",
                "ttlSecondsAfterFinished", "podFailurePolicy", "completionMode", "suspend", "selector"},
    "PodSpec": {"containers", "initContainers", "volumes", "restartPolicy", "serviceAccountName", "nodeSelector",
                "tolerations", "affinity", "securityContext", "imagePullSecrets", "terminationGracePeriodSeconds"},
    "Container": {"name", "image", "command", "args", "env", "envFrom", "ports", "resources", "volumeMounts",
                  "readinessProbe", "livenessProbe", "workingDir", "imagePullPolicy", "securityContext", "lifecycle"},
    "DeploymentSpec": {"replicas", "selector", "template", "strategy", "revisionHistoryLimit", "minReadySeconds"},
    "ServiceSpec": {"type", "selector", "ports", "clusterIP"},
}
API_VERSIONS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1", "CronJob": "batch/v1",
                "Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1", "Secret": "v1", "Namespace": "v1",
                "ServiceAccount": "v1", "Role": "rbac.authorization.k8s.io/v1",
                "RoleBinding": "rbac.authorization.k8s.io/v1"}


def documents() -> list[tuple[str, dict]]:
    """Every object of every infra/*.yaml, plus RayJob templates kept inside ConfigMaps."""
    out = []
    for path in sorted(INFRA.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        out.append((f"{path.name}:{key}", yaml.safe_load(text)))
    return out


def check(obj: dict, kind: str, where: str) -> None:
    unknown = set(obj) - FIELDS[kind]
    assert not unknown, f"{where}: {kind} has unknown field(s) {sorted(unknown)}"


def check_pod(pod: dict, where: str) -> list[dict]:
    check(pod, "PodSpec", where)
    for c in pod["containers"] + pod.get("initContainers", []):
        check(c, "Container", f"{where} container {c['name']}")
    return pod["containers"]


def check_cluster(spec: dict, where: str) -> list[dict]:
    """A RayClusterSpec: fields, token auth on, the installed Ray version; returns its containers."""
    import ray

    check(spec, "RayClusterSpec", where)
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']} != {ray.__version__}"
    check(spec["authOptions"], "AuthOptions", where)
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray token auth must be on"
    check(spec["headGroupSpec"], "HeadGroupSpec", where)
    containers = check_pod(spec["headGroupSpec"]["template"]["spec"], where)
    for group in spec.get("workerGroupSpecs", []):
        check(group, "WorkerGroupSpec", f"{where} group {group['groupName']}")
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        containers += check_pod(group["template"]["spec"], where)
    return containers


def cluster_specs(name: str, doc: dict) -> list[dict]:
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        return check_cluster(spec, name)
    if kind == "RayJob":
        check(spec, "RayJobSpec", name)
        return check_cluster(spec["rayClusterSpec"], name)
    if kind == "RayService":
        check(spec, "RayServiceSpec", name)
        return check_cluster(spec["rayClusterConfig"], name)
    return []


def test_every_manifest_parses_with_known_fields_and_the_project_image():
    import ray

    docs = documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayCluster", "RayJob", "RayService", "CronJob", "Deployment", "Service"} <= kinds
    images = set()
    for name, doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], f"{name}: {doc['kind']} apiVersion {doc['apiVersion']}"
        assert doc["metadata"].get("namespace") in (None, "raybind"), name
        for container in cluster_specs(name, doc):
            images.add(container["image"])
        if doc["kind"] == "Deployment":
            check(doc["spec"], "DeploymentSpec", name)
            for c in check_pod(doc["spec"]["template"]["spec"], name):
                images.add(c["image"])
            assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        if doc["kind"] == "Service":
            check(doc["spec"], "ServiceSpec", name)
    assert images == {f"{IMAGE_NAME}:{ray.__version__}"}, images
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311" in dockerfile and f"WORKDIR {IMAGE_ROOT}" in dockerfile
    for copied in ("models/", "pipelines/", "serving/", "configs/", "requirements.lock", "pyproject.toml"):
        assert (REPO / copied.rstrip("/")).exists(), copied


def parse_cli(command: str):
    """Parse a `raybind ...` command line with the real CLI parser; check its config file exists (in
    the image = in this repo) and loads with its --set overrides."""
    from pipelines.cli.commands import all_pipelines
    from pipelines.cli.main import build_parser
    from pipelines.core.config import load_config

    argv = shlex.split(command)
    assert argv[0] == "raybind", command
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    config = Path(args.config.replace(IMAGE_ROOT, str(REPO), 1))
    assert args.config.startswith(IMAGE_ROOT) and config.is_file(), f"{command}: no config {config} in the repo"
    words = " ".join(w for w in argv[1:] if not w.startswith("-"))
    job = next(j for key, j in all_pipelines().items() if words.startswith(key))
    return load_config(job.config_cls, config, args.overrides)


def test_commands_in_the_manifests_are_real_cli_commands():
    entrypoints = {name: doc["spec"]["entrypoint"] for name, doc in documents() if doc["kind"] == "RayJob"}
    assert len(entrypoints) == 2, entrypoints  # pretraining, and the nightly template in the CronJob's ConfigMap
    pretrain = parse_cli(entrypoints["rayjob-pretrain.yaml"])
    assert pretrain.data.train.startswith("s3://") and pretrain.train.storage.startswith("s3://")
    nightly = parse_cli(entrypoints["nightly-cronjob.yaml:rayjob.yaml"])
    assert nightly.data.root.startswith("s3://") and nightly.data.heldout.startswith("s3://")
    assert nightly.serve.enabled is False  # the RayService follows the champion alias itself (refresh_s)


def test_cronjob_forbids_overlap_and_creates_the_nightly_rayjob():
    (_, cron), = [(n, d) for n, d in documents() if d["kind"] == "CronJob"]
    check(cron["spec"], "CronJobSpec", "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    from pipelines.ops.schedule import check_cron

    check_cron(cron["spec"]["schedule"])
    job = cron["spec"]["jobTemplate"]["spec"]
    check(job, "JobSpec", "CronJob job")
    (container,) = check_pod(job["template"]["spec"], "CronJob pod")
    script = container["command"][-1]
    # The pod waits for the RayJob to end, so Forbid really spans the whole night.
    assert "kubectl create -f /templates/rayjob.yaml" in script and "jobDeploymentStatus" in script
    mount = container["volumeMounts"][0]
    volume = next(v for v in job["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmaps = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "ConfigMap"}
    assert "rayjob.yaml" in configmaps[volume["configMap"]["name"]]["data"] and mount["mountPath"] == "/templates"
    sa = job["template"]["spec"]["serviceAccountName"]
    role = next(d for _, d in documents() if d["kind"] == "Role" and d["metadata"]["name"] == sa)
    assert {"create", "get"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]


def test_rayservice_serve_config_is_valid_for_ray_and_the_app():
    from ray.serve.schema import ServeDeploySchema

    from serving.settings import AppArgs

    (_, svc), = [(n, d) for n, d in documents() if d["kind"] == "RayService"]
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app" and (REPO / "serving" / "app.py").is_file()
    users = {d["name"]: d.get("user_config") for d in app["deployments"]}
    AppArgs.model_validate({**app["args"], "embedder": users["Embedder"], "searcher": users["Searcher"]})
    token_env = app["args"]["gateway"]["token_env"]
    for container in cluster_specs("rayservice.yaml", svc):
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in container.get("env", [])}
        assert refs.get(token_env, {}).get("name") == "raybind-serve-token", f"{container['name']}: no token secret"


def test_mlflow_uses_postgres_and_s3_and_its_service_matches_the_tracking_uri():
    docs = {(d["kind"], d["metadata"].get("name", "")): d for _, d in documents()}
    (container,) = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"])
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert docs[("Secret", "raybind-mlflow-db")]["stringData"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert args["--artifacts-destination"].startswith("s3://")
    service = docs[("Service", "mlflow")]
    uri = docs[("ConfigMap", "raybind-env")]["data"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://mlflow.raybind.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    assert args["--port"] == str(service["spec"]["ports"][0]["port"])
    for option in container["args"]:  # every option is one the installed `mlflow server` knows
        assert option.split("=", 1)[0] in mlflow_server_options(), option


_OPTIONS: set[str] = set()


def mlflow_server_options() -> set[str]:
    if not _OPTIONS:
        import click
        from mlflow.cli import server

        assert isinstance(server, click.Command)
        _OPTIONS.update(opt for p in server.params for opt in p.opts)
    return _OPTIONS
