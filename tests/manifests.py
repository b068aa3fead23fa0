"""FinetuneJob manifests for tests: the three required fields, plus whatever a test adds."""

from __future__ import annotations

from typing import Any


def minimal_manifest(
    name: str = "job", namespace: str | None = "team", **sections: dict[str, Any]
) -> dict[str, Any]:
    """A valid manifest; each keyword is a spec section merged over the minimal one."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/base/"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": f"s3://out/{name}/"},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": metadata, "spec": spec}
