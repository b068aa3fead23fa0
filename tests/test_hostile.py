"""Hostile manifests through the real CLI: a message and an exit code for each, never a traceback or a hang.

The cases are data files under tests/data/hostile/, one YAML file each; tests/data/hostile/expected.yaml
maps each file to the words `finetune validate` must print, the text it must never print (a raw control
character, a huge key in full) and its exit code. Files validate accepts must render too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api.validation import MAX_FILE_BYTES

from tests.test_validate import run_cli

HOSTILE = Path(__file__).resolve().parent / "data" / "hostile"
EXPECTED: dict[str, dict[str, Any]] = yaml.safe_load((HOSTILE / "expected.yaml").read_text())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    code, out = run_cli(capsys, *argv)
    return code, out, time.monotonic() - started


def test_every_hostile_file_has_an_expectation() -> None:
    files = {path.name for path in HOSTILE.glob("*.yaml")} - {"expected.yaml"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    expected = EXPECTED[name]
    code, output, seconds = _run(["validate", str(HOSTILE / name)], capsys)
    assert code == expected["code"], output
    for words in expected.get("contains", []):
        assert words in output, output[:2000]
    for words in expected.get("absent", []):
        assert words not in output, output[:2000]
    assert seconds < 5, f"{name} took {seconds:.1f} s"
    assert max(len(line) for line in output.splitlines()) < 1000
    if code == 0:
        code, rendered, _ = _run(["render", str(HOSTILE / name)], capsys)
        assert code == 0, rendered


def test_generate_name_renders_with_a_generated_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, output, _ = _run(["render", str(HOSTILE / "generate-name.yaml")], capsys)
    assert code == 0, output
    assert output.startswith("# metadata.generateName 'sweep-': the API server names the job")
    documents = list(yaml.safe_load_all(output))
    names = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "Pod"}
    (pod,) = names
    assert pod.startswith("sweep-") and pod.endswith("-worker-0") and len(pod) == len("sweep-xxxxx-worker-0")


def test_the_cli_process_prints_no_traceback_for_any_hostile_file() -> None:
    files = [str(HOSTILE / name) for name in sorted(EXPECTED)]
    result = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "validate", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    accepted = [str(HOSTILE / name) for name, row in EXPECTED.items() if row["code"] == 0]
    rendered = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "render", *accepted],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr


def test_a_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    for command in ("validate", "render"):
        code, output, seconds = _run([command, str(big)], capsys)
        assert code == 1 and "larger than 1 MiB" in output, output
        assert seconds < 5


def test_stdin_bytes_that_are_not_utf8(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Stdin:
        buffer = __import__("io").BytesIO(b"apiVersion: finetune.dev/v1alpha1\nkind: \xfe\n")

    monkeypatch.setattr(sys, "stdin", Stdin())
    code, output, _ = _run(["validate", "-"], capsys)
    assert code == 1 and "not UTF-8 at line 2, column 7" in output, output
