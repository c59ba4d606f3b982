"""Kubeflow pipelines, one per file, each with its compiled YAML beside it (see README, "Pipelines").

`on_cluster(tasks, feast_task)` is how every pipeline's tasks run on a cluster: no caching (each
run must read today's features, rewards and registry), the endpoints from the ConfigMap all
onerec workloads use (infra/base), and the Feast repo + offline store from the shared volume
(infra/ingestor) for the task that reads them. kfp.local ignores the last two (its steps inherit
the calling process's environment).
"""
from kfp import kubernetes

ENDPOINTS_CONFIGMAP, FEAST_PVC = "onerec-endpoints", "onerec-feast"
ENDPOINT_KEYS = ("MLFLOW_TRACKING_URI", "REDIS_URL", "ONEREC_FEAST_DIR")   # the last: the volume's mount path
FEAST_MOUNT = "/feast"


def on_cluster(tasks, feast_task) -> None:
    for task in tasks:
        task.set_caching_options(False)
        kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIGMAP, {k: k for k in ENDPOINT_KEYS})
    kubernetes.mount_pvc(feast_task, pvc_name=FEAST_PVC, mount_path=FEAST_MOUNT)
