"""Kubernetes' own schemas for the pod-placement types a FinetuneJob passes to its worker pods.

``spec.resources.affinity`` is a core/v1 Affinity. Its CRD schema is derived from the JSON schemas of
Kubernetes (as the ``kubernetes-validate`` package ships them, for the API server version the project
tests against): every ``$ref`` resolved, ``[type, "null"]`` made one type, and turned into a structural
schema the API server accepts. Kubernetes' Go validation of those types, which its OpenAPI schema does
not carry, is added as OVERLAYS: the operators' enums, the weights' range, label-key syntax, and bounds
on every string, list and map (which CEL cost estimation needs).

The derivation needs ``kubernetes-validate`` (a development dependency); its result is committed as
``kube_schemas_generated.py``, which a test compares with a fresh derivation. Regenerate with::

    .venv/bin/python -m finetune_operator.api.kube_schemas \\
        > operator/src/finetune_operator/api/kube_schemas_generated.py

:func:`schema_problems` checks a value against such a schema, for pydantic (the CEL rules in it are
run by ``cel.py``, as for the rest of the CRD).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

# The Kubernetes version whose schemas the derivation reads: the kube-apiserver of tests/test_apiserver.py.
KUBERNETES_SCHEMA_VERSION = "1.36.0"
AFFINITY_DEFINITION = "io.k8s.api.core.v1.Affinity"
TOLERATION_DEFINITION = "io.k8s.api.core.v1.Toleration"

# A label key (a qualified name): an optional DNS-1123 subdomain prefix and '/', then at most 63 letters,
# digits, '-', '_' or '.', starting and ending with a letter or digit. The prefix's limit of 253
# characters is PREFIX_LENGTH_RULE (a regular expression cannot bound it and its structure at once).
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
)
QUALIFIED_NAME_OR_EMPTY = f"^({QUALIFIED_NAME[1:-1]})?$"
MAX_QUALIFIED_NAME_LENGTH = 253 + 1 + 63
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
QUALIFIED_NAME_WORDS = (
    "a label key: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, "
    "optionally after a DNS subdomain prefix of at most 253 characters and '/' (e.g. example.com/pool)"
)
LABEL_VALUE_WORDS = (
    "empty, or at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)


def _cel_literal(pattern: str) -> str:
    return "'" + pattern.replace("\\", "\\\\").replace("'", "\\'") + "'"


def prefix_length_rule(subject: str = "self") -> str:
    """CEL: the DNS prefix of the label key ``subject`` (before '/') is at most 253 characters."""
    return f"!{subject}.matches({_cel_literal('^[^/]{254,}/')})"


def label_key_rule(subject: str) -> str:
    """CEL: ``subject`` is a label key."""
    return f"{subject}.matches({_cel_literal(QUALIFIED_NAME)}) && {prefix_length_rule(subject)}"


def map_keys_rule(where: str) -> dict[str, str]:
    """An x-kubernetes-validations entry: every key of the map is a label key."""
    return {
        "rule": f"self.all(k, {label_key_rule('k')})",
        "message": f"{where} keys must be {QUALIFIED_NAME_WORDS}",
    }


def _key_string(where: str) -> dict[str, Any]:
    return {
        "maxLength": MAX_QUALIFIED_NAME_LENGTH,
        "pattern": QUALIFIED_NAME,
        "x-kubernetes-validations": [
            {
                "rule": prefix_length_rule(),
                "message": f"{where} has a prefix before '/' of at most 253 characters",
            }
        ],
    }


_NODE_OPERATORS = ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
_LABEL_OPERATORS = ["In", "NotIn", "Exists", "DoesNotExist"]
_WEIGHT = {"minimum": 1, "maximum": 100}
# Kubernetes' Go validation of these types, per definition and property (merged over the derived node).
OVERLAYS: dict[str, dict[str, dict[str, Any]]] = {
    "io.k8s.api.core.v1.NodeSelectorRequirement": {
        "key": _key_string("a node selector requirement's key"),
        "operator": {"enum": _NODE_OPERATORS},
    },
    "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelectorRequirement": {
        "key": _key_string("a label selector requirement's key"),
        "operator": {"enum": _LABEL_OPERATORS},
    },
    "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector": {
        "matchLabels": {
            "maxProperties": 64,
            "x-kubernetes-validations": [map_keys_rule("matchLabels")],
        },
    },
    "io.k8s.api.core.v1.PodAffinityTerm": {
        "topologyKey": _key_string("topologyKey"),
    },
    "io.k8s.api.core.v1.PreferredSchedulingTerm": {"weight": _WEIGHT},
    "io.k8s.api.core.v1.WeightedPodAffinityTerm": {"weight": _WEIGHT},
}
# Bounds where Kubernetes has none (CEL cost estimation needs every string, list and map bounded).
MAX_STRING_LENGTH = 253  # values are label values (63) or, in matchFields, node names (DNS subdomains)
MAX_ITEMS = 64
MAX_VALUES = 256
_ITEM_STRINGS = {  # list properties whose items are strings of a known kind
    "matchLabelKeys": {"maxLength": MAX_QUALIFIED_NAME_LENGTH, "pattern": QUALIFIED_NAME},
    "mismatchLabelKeys": {"maxLength": MAX_QUALIFIED_NAME_LENGTH, "pattern": QUALIFIED_NAME},
    "namespaces": {"maxLength": 63},
}


def load_definitions(version: str = KUBERNETES_SCHEMA_VERSION) -> dict[str, Any]:
    """Kubernetes' JSON schema definitions as kubernetes-validate ships them (a development dependency)."""
    from importlib.resources import files

    folder = files("kubernetes_validate").joinpath("kubernetes-json-schema", f"v{version}-local-strict")
    return json.loads(folder.joinpath("_definitions.json").read_text())["$defs"]


def _one_type(node: dict[str, Any]) -> str:
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    (kind,) = [k for k in kinds if k != "null"]
    return kind


def _structural(definitions: dict[str, Any], node: dict[str, Any], name: str, prop: str) -> dict[str, Any]:
    """One node of a definition, resolved and made structural; ``name`` is the definition it is in
    (for OVERLAYS), ``prop`` the property it is the value of."""
    if "$ref" in node:
        target = node["$ref"].rsplit("/", 1)[-1]
        resolved = _structural(definitions, definitions[target], target, prop)
        if "description" in node:
            resolved["description"] = node["description"]
        return resolved
    kind = _one_type(node)
    schema: dict[str, Any] = {}
    if "description" in node:
        schema["description"] = node["description"]
    schema["type"] = kind
    if "format" in node:
        schema["format"] = node["format"]
    if kind == "object" and "properties" in node:
        schema["properties"] = {
            key: {**_structural(definitions, child, name, key), **OVERLAYS.get(name, {}).get(key, {})}
            for key, child in node["properties"].items()
        }
        if node.get("required"):
            schema["required"] = list(node["required"])
    elif kind == "object":
        schema["additionalProperties"] = _structural(definitions, node["additionalProperties"], name, "")
    elif kind == "array":
        schema["maxItems"] = MAX_VALUES if prop == "values" else MAX_ITEMS
        schema["items"] = {
            **_structural(definitions, node["items"], name, ""),
            **_ITEM_STRINGS.get(prop, {}),
        }
    elif kind == "string" and name.endswith(".LabelSelector"):  # the values of matchLabels
        schema["maxLength"] = 63
        schema["pattern"] = LABEL_VALUE
    elif kind == "string":
        schema["maxLength"] = MAX_STRING_LENGTH
    for key in ("x-kubernetes-list-type", "x-kubernetes-map-type"):
        if key in node:
            schema[key] = node[key]
    return schema


def derive_schema(definitions: dict[str, Any], name: str) -> dict[str, Any]:
    """The structural CRD schema of Kubernetes definition ``name``, with OVERLAYS applied."""
    return _structural(definitions, definitions[name], name, "")


def _no_literals(node: Any) -> None:
    """JSON is a Python literal as long as it holds no true, false or null."""
    if isinstance(node, bool) or node is None:
        raise ValueError("the derived schema holds true, false or null, which are not Python literals")
    for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        _no_literals(child)


def render_generated_module(definitions: dict[str, Any] | None = None) -> str:
    """kube_schemas_generated.py: the derived schemas as Python literals (JSON without true, false or
    null, which these schemas do not hold, is one)."""
    definitions = load_definitions() if definitions is None else definitions
    schema = derive_schema(definitions, AFFINITY_DEFINITION)
    _no_literals(schema)
    affinity = json.dumps(schema, indent=1)
    return (
        '"""Generated by `python -m finetune_operator.api.kube_schemas` from the JSON schemas of Kubernetes '
        f'{KUBERNETES_SCHEMA_VERSION}\n(kubernetes-validate). Do not edit by hand."""\n\n'
        "# ruff: noqa: E501\n\n"
        f"AFFINITY_SCHEMA = {affinity}\n"
    )


# --- Checking a value against a structural schema (the subset the derivation produces) -----------------

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}
_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
}


def _where(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_problems(schema: dict[str, Any], value: Any, path: tuple[str | int, ...] = ()) -> list[str]:
    """What makes ``value`` invalid for ``schema``: types, required and unknown fields, enums, bounds and
    patterns, each as "where: got ...; what is wanted" (``where`` relative to the value)."""
    where = _where(path) or "(the value)"
    kind = schema.get("type")
    is_bool = isinstance(value, bool)
    if kind and (not isinstance(value, _JSON_TYPES[kind]) or (is_bool and kind != "boolean")):
        return [f"{where}: got {_shown(value)}; must be {_TYPE_WORDS[kind]}"]
    problems: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: got {_shown(value)}; must be one of {', '.join(schema['enum'])}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{where}: got {value}; must be at least {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{where}: got {value}; must be at most {schema['maximum']}")
    for key, size, words in (
        ("maxLength", len(value) if isinstance(value, str) else 0, "characters"),
        ("maxItems", len(value) if isinstance(value, list) else 0, "items"),
        ("maxProperties", len(value) if isinstance(value, dict) else 0, "entries"),
    ):
        if key in schema and size > schema[key]:
            problems.append(f"{where}: has {size} {words}; at most {schema[key]} are allowed")
    if "pattern" in schema and isinstance(value, str) and re.search(schema["pattern"], value) is None:
        words = QUALIFIED_NAME_WORDS if schema["pattern"] == QUALIFIED_NAME else LABEL_VALUE_WORDS
        problems.append(f"{where}: got {_shown(value)}; must be {words}")
    if isinstance(value, dict):
        properties = schema.get("properties")
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{_where((*path, key))}: required field is missing")
        for key, child in value.items():
            extra = schema.get("additionalProperties")
            child_schema = properties.get(key) if properties is not None else extra
            if child_schema is None:
                allowed = ", ".join(properties or ())
                unknown = f"{_where((*path, key))}: unknown field"
                problems.append(f"{unknown}; the fields allowed here are: {allowed}")
            else:
                problems += schema_problems(child_schema, child, (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += schema_problems(schema["items"], item, (*path, index))
    return problems


if __name__ == "__main__":
    sys.stdout.write(render_generated_module())
