"""The Dockerfile, checked without a Docker engine: targets, extras, pins, users, entrypoints."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named stage, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            name = argument.split(" AS ")[-1].strip() if " AS " in argument else argument
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instruction.upper(), argument.strip()))
    return stages


STAGES = _stages()
TARGETS = {"operator": "operator", "trainer": "trainer"}


def _runs(stage: str) -> str:
    return "\n".join(argument for instruction, argument in STAGES[stage] if instruction == "RUN")


@pytest.mark.parametrize(("stage", "extra"), TARGETS.items())
def test_each_target_installs_its_declared_extra_with_the_constraints(stage: str, extra: str) -> None:
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    installs = [cmd for cmd in re.split(r"&&|\n", _runs(stage)) if "pip install" in cmd]
    assert any(f'".[{extra}]"' in cmd for cmd in installs)
    for command in installs:
        assert "--constraint constraints.txt" in command, command
        assert "==" not in command, f"a second list of pins: {command}"  # pins live in constraints.txt


def test_the_operator_image_has_no_torch() -> None:
    assert "torch" not in _runs("operator")
    assert not {"torch", "deepspeed"} & {
        d.split(">")[0].split("=")[0] for d in PYPROJECT["project"]["optional-dependencies"]["operator"]
    }


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_what_the_images_install() -> None:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {_normal(line.split("==")[0]) for line in lines if "==" in line}
    for extra in ("operator", "trainer"):
        for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
            name = _normal(re.split(r"[<>=\[ ]", requirement)[0])
            assert name in pins, f"{name} ({extra}) is not pinned in constraints.txt"


@pytest.mark.parametrize("stage", TARGETS)
def test_each_target_runs_as_a_non_root_user(stage: str) -> None:
    users = [argument for instruction, argument in STAGES[stage] if instruction == "USER"]
    assert users, f"{stage} sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric, non-zero uid (runAsNonRoot can check only numbers)"


def test_entrypoints_exist() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    (operator_entry,) = [json.loads(a) for i, a in STAGES["operator"] if i == "ENTRYPOINT"]
    assert (
        operator_entry[0] in scripts
        and scripts[operator_entry[0]] == "finetune_operator.controller.runner:main"
    )
    (trainer_entry,) = [json.loads(a) for i, a in STAGES["trainer"] if i == "ENTRYPOINT"]
    assert trainer_entry[:2] == ["python", "-m"]
    module = ROOT / "trainer" / "src" / Path(*trainer_entry[2].split("."))
    assert module.with_suffix(".py").is_file()


def test_trainer_image_user_matches_the_worker_pods() -> None:
    from finetune_operator.controller.manifests import WorkerSettings

    users = [argument for instruction, argument in STAGES["trainer"] if instruction == "USER"]
    assert (
        users[-1]
        == f"{WorkerSettings(default_image='x').run_as_user}:{WorkerSettings(default_image='x').run_as_user}"
    )
