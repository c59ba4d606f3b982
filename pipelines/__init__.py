"""Kubeflow pipelines, one per file, each with its compiled YAML beside it (see README, "Status")."""
