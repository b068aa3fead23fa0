"""Evaluates the CRD's ``x-kubernetes-validations`` rules the way the API server does, with cel-python.

``finetune validate`` runs the rules of the generated CRD schema through this module, and the tests
prove each rule against accepted and rejected objects, so the rules the API server will enforce are
the rules that were tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import celpy

_MISSING = object()


@dataclass(frozen=True)
class RuleViolation:
    path: tuple[str | int, ...]
    message: str
    rule: str


@cache
def _program(expression: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _evaluate(expression: str, activation: dict[str, Any]) -> Any:
    result = _program(expression).evaluate(
        {name: celpy.json_to_cel(value) for name, value in activation.items()}
    )
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def _check_rule(
    entry: dict[str, str], value: Any, old: Any, path: tuple[str | int, ...]
) -> RuleViolation | None:
    activation = {"self": value}
    if old is not _MISSING:
        activation["oldSelf"] = old
    field_path = tuple(part for part in entry.get("fieldPath", "").split(".") if part)
    try:
        passed = bool(_evaluate(entry["rule"], activation))
    except Exception as error:
        return RuleViolation(path + field_path, f"rule could not be evaluated ({error})", entry["rule"])
    if passed:
        return None
    message = entry.get("message", "")
    if "messageExpression" in entry:
        try:
            message = str(_evaluate(entry["messageExpression"], activation))
        except Exception:
            message = message or f"failed rule: {entry['rule']}"
    return RuleViolation(path + field_path, message or f"failed rule: {entry['rule']}", entry["rule"])


def _typed(schema: dict[str, Any], value: Any) -> Any:
    """Numbers typed by the schema, as Kubernetes CEL types them: 32 in a ``number`` field is 32.0.

    cel-python types values by their Python type and refuses to compare an int with a double.
    """
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {key: _typed(properties.get(key, extra), child) for key, child in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_typed(schema["items"], item) for item in value]
    return value


def evaluate_rules(schema: dict[str, Any], value: Any, old: Any = _MISSING) -> list[RuleViolation]:
    """All rule violations in ``value`` (and, where ``old`` is given, transition-rule violations).

    Transition rules (those that use ``oldSelf``) run only where the old object has the same field,
    as on the API server; without ``old`` (a create) they are skipped.
    """
    typed_old = old if old is _MISSING else _typed(schema, old)
    return _violations(schema, _typed(schema, value), typed_old, ())


def _violations(
    schema: dict[str, Any], value: Any, old: Any, path: tuple[str | int, ...]
) -> list[RuleViolation]:
    violations: list[RuleViolation] = []
    for entry in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in entry["rule"] and old is _MISSING:
            continue
        violation = _check_rule(entry, value, old, path)
        if violation is not None:
            violations.append(violation)

    if isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        for key, child_schema in schema.get("properties", {}).items():
            if key in value:
                violations += _violations(child_schema, value[key], old_map.get(key, _MISSING), (*path, key))
        extra_schema = schema.get("additionalProperties")
        if isinstance(extra_schema, dict):
            for key, child in value.items():
                violations += _violations(extra_schema, child, old_map.get(key, _MISSING), (*path, key))
    elif isinstance(value, list) and "items" in schema:
        # Lists here are atomic: the API server correlates no old items, so no transition rules apply.
        for index, item in enumerate(value):
            violations += _violations(schema["items"], item, _MISSING, (*path, index))
    return violations
