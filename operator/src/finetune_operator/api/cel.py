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
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class RuleViolation:
    path: tuple[str | int, ...]
    message: str
    rule: str


@cache
def _program(expression: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


@dataclass(frozen=True)
class _InvalidData:
    """A value the API server cannot hand to CEL as its schema's type: a JSON number such as 2.0 in an
    integer field. Schema validation takes it for an integer, but a rule that reads it fails."""

    message: str


def _to_cel(value: Any) -> Any:
    """``celpy.json_to_cel``, with each :class:`_InvalidData` as an error value: reading it fails the
    rule, while a rule that does not read it (or ``true || ...``) still evaluates, as on the API server."""
    if isinstance(value, _InvalidData):
        return celpy.CELEvalError(value.message)
    if isinstance(value, dict):
        return celpy.celtypes.MapType({celpy.celtypes.StringType(k): _to_cel(v) for k, v in value.items()})
    if isinstance(value, list):
        return celpy.celtypes.ListType([_to_cel(item) for item in value])
    return celpy.json_to_cel(value)


def _evaluate(expression: str, activation: dict[str, Any]) -> Any:
    result = _program(expression).evaluate({name: _to_cel(value) for name, value in activation.items()})
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
            evaluated = str(_evaluate(entry["messageExpression"], activation))
        except Exception:
            evaluated = ""
        # As on the API server: a blank result, or one with a line break, gives way to the message.
        if evaluated.strip() and "\n" not in evaluated and "\r" not in evaluated:
            message = evaluated
    return RuleViolation(path + field_path, message or f"failed rule: {entry['rule']}", entry["rule"])


def _typed(schema: dict[str, Any], value: Any, where: tuple[str | int, ...] = ()) -> Any:
    """Numbers typed by the schema, as Kubernetes CEL types them: 32 in a ``number`` field is 32.0.

    cel-python types values by their Python type and refuses to compare an int with a double. A float
    in an integer field (2.0, which schema validation accepts) is invalid data to the API server's CEL.
    """
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
        # The API server's decoder refuses such a number before any rule runs; a rule that reads it here
        # fails naming its field, instead of an overflow in whichever rule's arithmetic meets it.
        field = ".".join(map(str, where))
        return _InvalidData(f"invalid data, {field} is {value}, beyond int64")
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    int_or_string = bool(schema.get("x-kubernetes-int-or-string"))
    if isinstance(value, float) and (int_or_string or schema.get("type") == "integer"):
        expected = "XIntOrString value to be either a string or integer" if int_or_string else "int"
        field = ".".join(map(str, where))
        return _InvalidData(f"invalid data, expected {expected}, got float64 ({field} is {value!r})")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {key: _typed(properties.get(key, extra), child, (*where, key)) for key, child in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_typed(schema["items"], item, (*where, index)) for index, item in enumerate(value)]
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
