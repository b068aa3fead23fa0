"""Generates the FinetuneJob CustomResourceDefinition from the pydantic models in ``spec.py``.

``python -m finetune_operator.api.crd > crds/finetunejob.yaml`` writes it; a test fails when the committed
file differs. The walk covers exactly the Python types the spec uses and raises on anything else, so a
new kind of field cannot silently produce a wrong schema.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from finetune_trainer.config import UriRules
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from finetune_operator import GROUP, KIND, PLURAL, VERSION
from finetune_operator.api.spec import (
    CelRule,
    FinetuneJob,
    FinetuneJobSpec,
    FinetuneJobStatus,
    FiniteNumbers,
    KubeSchema,
)

SHORT_NAMES = ["ftj"]
CATEGORIES = ["ml"]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of the planned steps done",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.metrics.evalLoss"},
    # `kubectl get ftj -o wide` (priority 1): the base model beside the fine-tune.
    {
        "name": "Base-Eval-Loss",
        "type": "number",
        "jsonPath": ".status.baseMetrics.evalLoss",
        "description": "The base model's eval loss, before the first step",
        "priority": 1,
    },
    {
        "name": "Answer-Acc",
        "type": "number",
        "jsonPath": ".status.metrics.answerAccuracy",
        "description": "Share of generated replies that match the reference (evaluation.generation)",
        "priority": 1,
    },
    {
        "name": "Base-Answer-Acc",
        "type": "number",
        "jsonPath": ".status.baseMetrics.answerAccuracy",
        "description": "The base model's answer accuracy, before the first step",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _rule_schema(rule: CelRule) -> dict[str, str]:
    entry = {"rule": rule.rule}
    if rule.message:
        entry["message"] = rule.message
    if rule.message_expression:
        entry["messageExpression"] = rule.message_expression
    if rule.field_path:
        entry["fieldPath"] = rule.field_path
    if rule.reason:
        entry["reason"] = rule.reason
    return entry


def _apply_constraints(schema: dict[str, Any], constraints: list[Any]) -> None:
    """Maps pydantic/annotated-types constraints onto OpenAPI v3 keywords for the schema's type."""
    length_keys = {
        "string": ("minLength", "maxLength"),
        "array": ("minItems", "maxItems"),
        "object": ("minProperties", "maxProperties"),
    }
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Ge):
            schema["minimum"] = constraint.ge
        elif isinstance(constraint, annotated_types.Gt):
            schema["minimum"] = constraint.gt
            schema["exclusiveMinimum"] = True
        elif isinstance(constraint, annotated_types.Le):
            schema["maximum"] = constraint.le
        elif isinstance(constraint, annotated_types.Lt):
            schema["maximum"] = constraint.lt
            schema["exclusiveMaximum"] = True
        elif isinstance(constraint, (annotated_types.MinLen, annotated_types.MaxLen)):
            min_key, max_key = length_keys[schema["type"]]
            if isinstance(constraint, annotated_types.MinLen):
                schema[min_key] = constraint.min_length
            else:
                schema[max_key] = constraint.max_length
        elif getattr(constraint, "pattern", None) is not None:
            schema["pattern"] = constraint.pattern
        elif isinstance(constraint, UriRules):
            schema.setdefault("x-kubernetes-validations", []).extend(
                {"rule": rule.cel, "message": rule.words} for rule in constraint.rules
            )
        elif isinstance(constraint, FiniteNumbers):
            pass  # JSON has no NaN or Infinity: the API server's decoder already refuses them
        else:
            raise TypeError(f"no CRD mapping for constraint {constraint!r}")


def _type_schema(annotation: Any) -> dict[str, Any]:
    """The schema of one Python type, with constraints from ``Annotated`` metadata."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extras = get_args(annotation)
        schema = _type_schema(base)
        constraints: list[Any] = []
        for extra in extras:
            if isinstance(extra, FieldInfo):
                if isinstance(extra.json_schema_extra, dict):
                    schema.update(copy.deepcopy(extra.json_schema_extra))
                constraints.extend(extra.metadata)
            else:
                constraints.append(extra)
        kube_schemas = [c for c in constraints if isinstance(c, KubeSchema)]
        if kube_schemas:
            # A Kubernetes type: its own (derived, structural) schema replaces the free-form one.
            (kube_schema,) = kube_schemas
            schema = copy.deepcopy(kube_schema.schema)
        _apply_constraints(schema, [c for c in constraints if not isinstance(c, KubeSchema)])
        return schema
    if origin in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _type_schema(members[0])
        member_schemas = [_type_schema(member) for member in members]
        if sorted(schema["type"] for schema in member_schemas) == ["integer", "string"]:
            # A Kubernetes int-or-string: each member's constraints apply to values of its own type.
            schema = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
            for member_schema in member_schemas:
                schema.update({k: v for k, v in member_schema.items() if k != "type"})
            return schema
        raise TypeError(f"no CRD mapping for union {annotation!r}")
    if origin is Literal:
        values = list(get_args(annotation))
        return {"type": "string", "enum": values}
    if origin is list:
        (item,) = get_args(annotation)
        return {"type": "array", "items": _type_schema(item)}
    if origin is dict:
        key, value = get_args(annotation)
        if key is not str:
            raise TypeError(f"map keys must be strings: {annotation!r}")
        if value is Any:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "additionalProperties": _type_schema(value)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_schema(annotation)
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in simple:
        return {"type": simple[annotation]}
    raise TypeError(f"no CRD mapping for {annotation!r}")


def _crd_default(field: FieldInfo) -> Any:
    """The default the API server should apply, or PydanticUndefined for none.

    A nested object defaults to its fields' own defaults, spelled out: the API server checks each
    default against the CEL rules as written (``{}`` fails ``self.offload == 'none'``: no such key),
    before any nested default is filled in. Empty maps and lists and ``None`` need no default.
    """
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return _object_default(type(value)) if isinstance(value, BaseModel) else PydanticUndefined
    if field.default is None:
        return PydanticUndefined
    return field.default


def _object_default(model: type[BaseModel]) -> dict[str, Any]:
    """What the API server makes of ``{}`` for ``model``: each field's own default, recursively."""
    defaults = {key: _crd_default(field) for key, field in _properties(model)}
    return {key: value for key, value in defaults.items() if value is not PydanticUndefined}


def _properties(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    return [(field.alias or name, field) for name, field in model.model_fields.items()]


def field_schema(field: FieldInfo) -> dict[str, Any]:
    annotation = field.annotation
    schema = _type_schema(Annotated[annotation, field]) if field.metadata else _type_schema(annotation)
    if not field.description:
        raise ValueError(f"field {field.alias} has no description: every CRD field must explain itself")
    schema.pop("description", None)  # the field's own words win over its model's docstring
    schema = {"description": field.description, **schema}
    default = _crd_default(field)
    if default is not PydanticUndefined:
        schema["default"] = default
    return schema


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """An object schema for a model: its fields, required list, description and CEL rules."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for key, field in _properties(model):
        properties[key] = field_schema(field)
        if field.is_required():
            required.append(key)
    schema: dict[str, Any] = {"type": "object"}
    if model.__doc__:
        schema["description"] = " ".join(model.__doc__.split())
    schema["properties"] = properties
    if required:
        schema["required"] = required
    rules = getattr(model, "__cel_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [_rule_schema(rule) for rule in rules]
    return schema


def openapi_schema() -> dict[str, Any]:
    """The root schema of a FinetuneJob object."""
    status = model_schema(FinetuneJobStatus)
    return {
        "type": "object",
        "description": " ".join((FinetuneJob.__doc__ or "").split()),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind: FinetuneJob."},
            "metadata": {"type": "object"},
            "spec": model_schema(FinetuneJobSpec),
            "status": status,
        },
        "x-kubernetes-validations": [_rule_schema(rule) for rule in FinetuneJob.__cel_rules__],
    }


def custom_resource_definition() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated from finetune_operator/api/spec.py by `make crd`. Do not edit by hand.\n"


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)


def _constraints_text(schema: dict[str, Any]) -> str:
    words = []
    if "enum" in schema:
        words.append("one of " + ", ".join(f"`{v}`" if v else '`""`' for v in schema["enum"]))
    if "minimum" in schema:
        words.append(("> " if schema.get("exclusiveMinimum") else ">= ") + str(schema["minimum"]))
    if "maximum" in schema:
        words.append(("< " if schema.get("exclusiveMaximum") else "<= ") + str(schema["maximum"]))
    if "pattern" in schema:
        words.append(f"matches `{schema['pattern']}`")
    for key, word in (("maxLength", "characters"), ("maxItems", "items"), ("maxProperties", "entries")):
        if key in schema:
            words.append(f"at most {schema[key]} {word}")
    return "; ".join(words)


def _type_text(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "quantity"
    if schema.get("type") == "array":
        return f"list of {_type_text(schema['items'])}"
    if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type_text(schema['additionalProperties'])}"
    return str(schema.get("type"))


def _reference_rows(schema: dict[str, Any], path: str) -> list[str]:
    rows = []
    required = set(schema.get("required", []))
    for key, child in schema.get("properties", {}).items():
        child_path = f"{path}.{key}"
        default = (
            "required" if key in required else json.dumps(child["default"]) if "default" in child else ""
        )
        cells = [
            f"`{child_path}`",
            _type_text(child),
            default,
            _constraints_text(child),
            child["description"],
        ]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        item_schema = child.get("items", {})
        rows += _reference_rows(child, child_path) + _reference_rows(item_schema, f"{child_path}[]")
    return rows


def _rules_text(schema: dict[str, Any], path: str) -> list[str]:
    lines = [
        f"- `{path or 'FinetuneJob'}`: {rule['message']} (`{rule['rule']}`)"
        for rule in schema.get("x-kubernetes-validations", [])
    ]
    for key, child in schema.get("properties", {}).items():
        lines += _rules_text(child, f"{path}.{key}" if path else key)
    return lines


def render_reference_markdown() -> str:
    """docs/reference.md: every field with its type, default, bounds and description, and every rule."""
    root = openapi_schema()
    lines = [
        "<!-- Generated from finetune_operator/api/spec.py by `make crd`. Do not edit by hand. -->",
        "# FinetuneJob field reference",
        "",
        "| Field | Type | Default | Allowed | Description |",
        "| --- | --- | --- | --- | --- |",
        *_reference_rows(root["properties"]["spec"], "spec"),
        "",
        "## Cross-field rules (CEL, enforced by the API server and by `finetune validate`)",
        "",
        *_rules_text(root, ""),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "crd"
    sys.stdout.write(render_reference_markdown() if target == "reference" else render_crd_yaml())


if __name__ == "__main__":
    main()
