"""Test tiers and the real control plane.

Every test is in one tier, so a contributor can run one with ``pytest -m TIER``:
- ``unit``: pure functions, the emulated API, single processes; seconds.
- ``controlplane``: against the real kube-apiserver, etcd, controller-manager and scheduler started
  once per session (``control_plane``); needs ``make cluster-bin``.
- ``system``: the real trainer (DeepSpeed ranks, S3 on loopback), alone or under the operator.
A module or test marked ``system`` stays there (on the control plane or not); any other test that
takes the control plane is ``controlplane``; the rest are ``unit``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from finetune_trainer.tiny import build_tiny_model

from tests.kube.cluster import GPU_NODES, Identity, RealCluster, chart_rbac, set_up
from tests.kube.controlplane import running_control_plane
from tests.kube.nodes import NodeAgent
from tests.test_chart import render

TIERS = ("unit", "controlplane", "system")

# Renders the last assistant turn unlike the earlier ones (as Qwen3 does with its empty think block),
# so a prefix of the conversation does not render as a prefix of the whole.
LAST_TURN_DIFFERS_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<|assistant|>\\n<think></think>' + m['content'] }}"
    "{% else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endif %}{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """The Hub client in offline mode: any attempt to reach the model hub fails."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizers(tiny_dir: Path) -> dict[str, Any]:
    """The tiny tokenizer with its own template, with none (the fallback) and with a non-prefix template."""
    from transformers import AutoTokenizer

    loaded = {
        name: AutoTokenizer.from_pretrained(tiny_dir) for name in ("template", "fallback", "last-differs")
    }
    loaded["fallback"].chat_template = None
    loaded["last-differs"].chat_template = LAST_TURN_DIFFERS_TEMPLATE
    return loaded


@pytest.fixture(scope="module")
def tokenizer(tokenizers: dict[str, Any]) -> Any:
    return tokenizers["template"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: fast tests of one part (the default tier)")
    config.addinivalue_line("markers", "controlplane: tests against the real Kubernetes control plane")
    config.addinivalue_line("markers", "system: tests that run the real trainer")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "control_plane" in fixtures and not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.controlplane)
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """One real control plane for the session: the CRD, four 8-GPU nodes and a node agent."""
    with running_control_plane(tmp_path_factory.mktemp("control-plane")) as plane:
        cluster = set_up(plane)
        with NodeAgent(cluster.admin, frozenset(GPU_NODES)).running():
            yield cluster


@pytest.fixture
def namespace(control_plane: RealCluster) -> Iterator[str]:
    """A namespace of the test's own, deleted (with everything in it) afterwards."""
    name = control_plane.create_namespace()
    yield name
    control_plane.delete_namespace(name)


@pytest.fixture
def operator_identity(control_plane: RealCluster, namespace: str) -> Identity:
    """The chart's ServiceAccount with the RBAC of `helm install --set watchNamespaces={NS}`: a Role in
    the test's namespace and the small ClusterRole kopf needs to observe namespaces and CRDs."""
    return control_plane.grant("operator", chart_rbac(render({"watchNamespaces": [namespace]})))
