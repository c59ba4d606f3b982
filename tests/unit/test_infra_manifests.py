"""The Kubernetes manifests under infra/ agree with the `full` preset and the endpoint names.

Pure: reads files only (no cluster, no kustomize binary).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from onerec.config import PROJECT_ROOT, load_config
from onerec.endpoints import ENDPOINT_VARS

INFRA = PROJECT_ROOT / "infra"
YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> list[dict]:
    return [d for p in YAML_FILES for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} '{name}' under infra/, found {len(found)}"
    return found[0]


def _ingestor_container() -> dict:
    (container,) = _one("Deployment", "onerec-ingestor")["spec"]["template"]["spec"]["containers"]
    return container


def test_yaml_files_exist_and_parse():
    assert len(YAML_FILES) >= 10, f"too few manifests under {INFRA}"
    for path in YAML_FILES:
        for doc in _docs(path):
            assert isinstance(doc, dict) and "kind" in doc, f"{path}: a document without `kind`"


@pytest.mark.parametrize("kustomization", sorted(INFRA.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.parent.relative_to(INFRA)))
def test_kustomization_resources_exist(kustomization):
    resources = _docs(kustomization)[0]["resources"]
    for res in resources:
        target = (kustomization.parent / res).resolve()
        ok = target.is_file() or (target / "kustomization.yaml").is_file()
        assert ok, f"{kustomization}: resource '{res}' is neither a file nor a kustomization folder"


def test_prod_overlay_composes_every_part():
    resources = _docs(INFRA / "overlays/prod/kustomization.yaml")[0]["resources"]
    assert {Path(r).name for r in resources} >= {"base", "kafka", "redis", "ingestor"}


def test_kafka_topics_equal_the_full_preset():
    cfg = load_config("full").kafka
    topics = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in _kind("KafkaTopic")}
    assert set(topics) == {t.name for t in cfg.topics()}, "KafkaTopic names != configs/full.yaml kafka:"
    for want in cfg.topics():
        got = topics[want.name]
        assert got["spec"]["partitions"] == want.partitions, f"topic {want.name}: partitions"
        assert got["metadata"]["labels"]["strimzi.io/cluster"] == "onerec-kafka"


def test_kafka_cluster_matches_the_bootstrap_endpoint():
    _one("Kafka", "onerec-kafka")
    bootstrap = _one("ConfigMap", "onerec-endpoints")["data"]["KAFKA_BOOTSTRAP"]
    assert bootstrap.startswith("onerec-kafka-kafka-bootstrap.kafka.svc:")  # Strimzi's service name


def test_redis_service_matches_the_redis_url():
    port = _one("Service", "onerec-redis")["spec"]["ports"][0]["port"]
    assert f"onerec-redis.onerec.svc:{port}/" in _one("ConfigMap", "onerec-endpoints")["data"]["REDIS_URL"]


def test_endpoints_configmap_holds_every_endpoint_var():
    data = _one("ConfigMap", "onerec-endpoints")["data"]
    assert set(ENDPOINT_VARS) <= set(data), f"missing: {set(ENDPOINT_VARS) - set(data)}"


def test_ingestor_runs_ingest_and_exposes_the_metrics_port():
    ingest = load_config("full").ingest
    container = _ingestor_container()
    assert "ingest" in container["command"]
    assert {"configMapRef": {"name": "onerec-endpoints"}} in container["envFrom"]
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [ingest.metrics_port]
    annotations = _one("Deployment", "onerec-ingestor")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ingest.metrics_port)


def test_ingestor_replicas_do_not_exceed_partitions():
    replicas = _one("Deployment", "onerec-ingestor")["spec"]["replicas"]
    assert replicas <= load_config("full").kafka.user_events.partitions, "extra replicas would sit idle"


def test_dockerfile_copies_existing_paths():
    lines = (INFRA / "docker/Dockerfile").read_text().splitlines()
    sources = [s for line in lines if line.startswith("COPY ") for s in line.split()[1:-1]]
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert (PROJECT_ROOT / src).exists(), f"infra/docker/Dockerfile: COPY {src} does not exist"


# --------------------------------------------------------------------------- MLflow and pipelines


def test_prod_overlay_composes_mlflow_and_pipelines_but_starts_no_training():
    resources = {Path(r).name for r in _docs(INFRA / "overlays/prod/kustomization.yaml")[0]["resources"]}
    assert {"mlflow", "pipelines"} <= resources
    pipeline_resources = _docs(INFRA / "pipelines/kustomization.yaml")[0]["resources"]
    assert "pytorchjob-train.yaml" not in pipeline_resources   # a template, submitted per run


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts_on_the_tracking_uri():
    uri = _one("ConfigMap", "onerec-endpoints")["data"]["MLFLOW_TRACKING_URI"]
    port = _one("Service", "mlflow")["spec"]["ports"][0]["port"]
    assert uri == f"http://mlflow.onerec.svc:{port}"
    (container,) = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "--backend-store-uri \"postgresql://" in command and "@mlflow-postgres:5432/" in command
    assert "--serve-artifacts" in command and "--artifacts-destination s3://mlflow/" in command
    assert f"--port {port}" in command
    secrets = {e["secretRef"]["name"] for e in container["envFrom"]}
    assert secrets == {"mlflow-db", "mlflow-s3"}
    _one("StatefulSet", "mlflow-postgres")
    _one("StatefulSet", "mlflow-minio")


def test_mlflow_image_pins_the_projects_mlflow_range():
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    dockerfile = (INFRA / "docker/Dockerfile.mlflow").read_text()
    (pin,) = [line.strip().strip('",') for line in pyproject.splitlines() if line.strip().startswith('"mlflow>=')]
    assert f'"{pin}"' in dockerfile, f"infra/docker/Dockerfile.mlflow must install {pin} like pyproject.toml"


def test_schedule_job_creates_the_recurring_retrain_run_from_the_full_preset():
    cfg = load_config("full")
    job = _one("Job", "onerec-schedule-retrain")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["command"] == ["onerec", "pipelines", "schedule", "retrain", "--config", "full"]
    assert {"configMapRef": {"name": "onerec-endpoints"}} in container["envFrom"]
    assert "KFP_HOST" in _one("ConfigMap", "onerec-endpoints")["data"]
    assert job["serviceAccountName"] == _one("ServiceAccount", "onerec-pipelines")["metadata"]["name"]
    # the pipeline's pods run in the KFP profile namespace, where the ConfigMap and Feast volume are
    assert _docs(INFRA / "pipelines/kustomization.yaml")[0]["namespace"] == cfg.pipelines.namespace
    assert _docs(INFRA / "base/kustomization.yaml")[0].get("namespace", "onerec") == cfg.pipelines.namespace


def test_pytorchjob_trains_with_onerec_train_on_every_replica_and_shared_volumes():
    import sys

    sys.path.insert(0, str(PROJECT_ROOT))
    from pipelines import FEAST_MOUNT, FEAST_PVC

    (job,) = [d for d in _docs(INFRA / "pipelines/pytorchjob-train.yaml") if d["kind"] == "PyTorchJob"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role, spec in specs.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch", role            # what the training operator looks for
        assert container["command"][:2] == ["onerec", "train"] and "--resume" in container["command"]
        assert {"configMapRef": {"name": "onerec-endpoints"}} in container["envFrom"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert claims["feast"] == FEAST_PVC and mounts["feast"] == FEAST_MOUNT
        assert claims["models"] == _one("PersistentVolumeClaim", "onerec-models")["metadata"]["name"]
    ingestor_claims = {v.get("persistentVolumeClaim", {}).get("claimName")
                       for v in _one("Deployment", "onerec-ingestor")["spec"]["template"]["spec"]["volumes"]}
    assert FEAST_PVC in ingestor_claims                     # the volume the ingestor writes features to


def test_inferenceservice_runs_the_predictor_on_a_gpu_with_a_canary():
    (isvc,) = _kind("InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    (container,) = predictor["containers"]
    assert container["command"] == ["python", "-m", "serving"]
    args = container["args"]
    assert args[args.index("--model_name") + 1] == isvc["metadata"]["name"]
    assert args[args.index("--preset") + 1] == "full" and args[args.index("--device") + 1] == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"configMapRef": {"name": "onerec-endpoints"}} in container["envFrom"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in predictor["volumes"]}
    assert "onerec-feast" in claims
    assert "serving" in {Path(r).name for r in _docs(INFRA / "overlays/prod/kustomization.yaml")[0]["resources"]}


def _container(kind: str, name: str) -> dict:
    (container,) = _one(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_abtest_workloads_share_the_postgres_ab_store():
    from onerec.endpoints import AB_STORE_URL

    postgres = _one("StatefulSet", "ab-postgres")
    assert postgres["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "ab-db"}}]
    for kind, name in (("Deployment", "onerec-reward-joiner"), ("Deployment", "onerec-dashboard"),
                       ("Deployment", "onerec-guardrail-watcher")):
        url = _env(_container(kind, name))[AB_STORE_URL]
        assert url.startswith("postgresql+psycopg://") and "@ab-postgres.onerec.svc:5432/" in url, name
    assert _container("Deployment", "onerec-reward-joiner")["command"][:3] == ["onerec", "rewards", "join"]
    assert "../../abtest" in _docs(INFRA / "overlays/prod/kustomization.yaml")[0]["resources"]


def test_dashboard_serves_the_full_presets_port_and_health_endpoint():
    cfg = load_config("full")
    container = _container("Deployment", "onerec-dashboard")
    assert container["command"][:2] == ["onerec", "dashboard"]
    assert container["ports"] == [{"name": "http", "containerPort": cfg.abtest.dashboard_port}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert _env(container)["AB_ACTION_TOKEN"]["secretKeyRef"]["optional"] is True     # read-only without it
    (port,) = _one("Service", "onerec-dashboard")["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_guardrail_watcher_is_off_in_production_by_default():
    assert load_config("full").abtest.watch is False
    assert load_config("small").abtest.watch is True          # on in the demo
    watcher = _one("Deployment", "onerec-guardrail-watcher")
    assert watcher["spec"]["replicas"] == 0
    assert "abtest.watch=true" in _container("Deployment", "onerec-guardrail-watcher")["command"]
