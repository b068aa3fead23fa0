"""The FinetuneJob API and the Kubernetes operator that runs it."""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FinetuneJob"
PLURAL = "finetunejobs"
