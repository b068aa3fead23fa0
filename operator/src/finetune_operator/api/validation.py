"""Checks FinetuneJob manifests with the same model and rules the CRD enforces at admission.

Structure, types, bounds, enums, patterns and unknown fields come from the pydantic models in
``spec.py``; cross-field rules are the CRD's own CEL rules, evaluated by ``cel.py``. Around them, what
kube-apiserver does besides the schema: it decodes the request (nulls pruned, 2.0 an integer), checks
metadata as ObjectMeta (a name or generateName, label syntax, no unknown keys) and refuses unknown
fields in status. Every problem is reported with its field path in kubectl's dotted form, the value
found and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
import types
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from finetune_operator import GROUP, KIND
from finetune_operator.api.cel import evaluate_rules
from finetune_operator.api.crd import openapi_schema
from finetune_operator.api.spec import PATTERN_HINTS, FinetuneJob

_ABSENT = object()
_INT64 = (-(2**63), 2**63 - 1)

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


@dataclass(frozen=True)
class ValidationIssue:
    """One problem: where (kubectl's dotted path), the value found (if any) and what is allowed."""

    path: str
    message: str
    value: Any = _ABSENT

    def __str__(self) -> str:
        where = self.path or "(document)"
        if self.value is _ABSENT:
            return f"{where}: {self.message}"
        return f"{where}: got {_show(self.value)}; {self.message}"


@dataclass
class DocumentReport:
    """The outcome for one YAML document of a file."""

    source: str
    index: int
    name: str | None = None
    issues: list[ValidationIssue] = field(default_factory=list)
    skipped: str | None = None
    job: FinetuneJob | None = None  # the parsed job, when the document is a valid FinetuneJob

    @property
    def label(self) -> str:
        # Quoted as JSON, so that a name with a line break (invalid, and reported) keeps to one line.
        shown = _printable(json.dumps(_shortened(str(self.name), 63), ensure_ascii=False))
        named = f" ({KIND} {shown})" if self.name else ""
        return f"{self.source}: document {self.index}{named}"


class InvalidManifestError(ValueError):
    """Raised by :func:`parse_finetune_job`; ``issues`` lists every problem."""

    def __init__(self, issues: list[ValidationIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(issue) for issue in issues))


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# Control, bidirectional-override and invisible characters: echoed escaped, never as they are.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
# Keys (and names) longer than this are shown shortened in messages: above Kubernetes' longest field
# names (preferredDuringSchedulingIgnoredDuringExecution has 47), so real paths stay whole.
_SHOWN_KEY_CHARS = 64


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(lambda match: json.dumps(match.group())[1:-1], text)


def _shortened(text: str, most: int = _SHOWN_KEY_CHARS) -> str:
    return text if len(text) <= most else text[:most] + "…"


def _shown_key(key: Any) -> str:
    return _printable(_shortened(str(key)))


def dotted(path: tuple[str | int, ...]) -> str:
    """kubectl's form: spec.resources.tolerations[0].effect; keys are shown shortened and escaped."""
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{_shown_key(part)}" if text else _shown_key(part)
    return text


def _real_path(loc: tuple[Any, ...], document: Any) -> tuple[tuple[str | int, ...], Any]:
    """Drops pydantic's union-branch tags from an error location and finds the value there."""
    path: list[str | int] = []
    current: Any = document
    for part in loc:
        if isinstance(current, dict) and isinstance(part, str):
            path.append(part)
            current = current.get(part, _ABSENT)
        elif isinstance(current, list) and isinstance(part, int):
            path.append(part)
            current = current[part] if part < len(current) else _ABSENT
        elif current is _ABSENT and isinstance(part, str):
            path.append(part)
        else:
            break  # a tag such as "constrained-str": the rest names a union branch, not a field
    return tuple(path), current


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``LoraSpec | None`` or ``list[Toleration]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, dict):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _allowed_fields(path: tuple[str | int, ...]) -> list[str]:
    """Field names the model accepts at the object that holds ``path``'s last element."""
    model: type[BaseModel] | None = FinetuneJob
    for part in path[:-1]:
        if isinstance(part, int) or model is None:
            continue
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        model = _model_of(fields[part].annotation) if part in fields else None
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _unknown_field(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown field{hint}; the fields allowed here are: {', '.join(allowed)}"


def _message(error: dict[str, Any], path: tuple[str | int, ...]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return _unknown_field(str(path[-1]), _allowed_fields(path))
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}"
    if kind == "string_pattern_mismatch":
        pattern = error["ctx"]["pattern"]
        return f"must be {PATTERN_HINTS.get(pattern, f'a string matching {pattern}')}"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}"
    return error["msg"].replace("Input should be", "must be").replace("Value error, ", "")


def _structural_issues(error: ValidationError, document: Any) -> list[ValidationIssue]:
    """One issue per field; for int-or-string unions, the branch that matches the value's type."""
    by_path: dict[tuple[str | int, ...], list[tuple[dict[str, Any], Any]]] = {}
    for item in error.errors():
        path, value = _real_path(item["loc"], document)
        by_path.setdefault(path, []).append((dict(item), value))
    issues = []
    for path, errors in by_path.items():
        specific = [(e, v) for e, v in errors if e["type"] not in _TYPE_WORDS] or errors
        if len(errors) > 1 and specific is errors:
            words = " or ".join(_TYPE_WORDS[e["type"]] for e, _ in errors)
            issues.append(ValidationIssue(dotted(path), f"must be {words}", errors[0][1]))
            continue
        first, value = specific[0]
        issues.append(ValidationIssue(dotted(path), _message(first, path), value))
    return issues


@cache
def _schema() -> dict[str, Any]:
    return openapi_schema()


def _value_at(document: Any, path: tuple[str | int, ...]) -> Any:
    current = document
    for part in path:
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            return _ABSENT
    return current


def defaulted(job: FinetuneJob) -> dict[str, Any]:
    """The object as the API server stores it: every default applied, absent optionals left out."""
    return job.model_dump(by_alias=True, exclude_none=True, mode="json")


def rule_issues(document: dict[str, Any], old: dict[str, Any] | None = None) -> list[ValidationIssue]:
    """Violations of the CRD's CEL rules in a defaulted object (transition rules when ``old`` is given)."""
    if old is None:
        violations = evaluate_rules(_schema(), document)
    else:
        violations = evaluate_rules(_schema(), document, old)
    # Rules on the whole object (metadata.name) name the field in their message; the value would be
    # the whole manifest, so it is left out.
    return [
        ValidationIssue(
            dotted(v.path), _quoted_shortened(v.message), _value_at(document, v.path) if v.path else _ABSENT
        )
        for v in violations
    ]


def _quoted_shortened(message: str) -> str:
    """A rule's message with each long quoted value in it (a messageExpression echoes the name) shortened."""
    shortened = re.sub(r'"([^"]{61,})"', lambda m: f'"{_shortened(m.group(1))}"', message)
    return _printable(shortened)


# --- What the API server does before and besides the schema ----------------------------------------
# The decoding and metadata checks of kube-apiserver (1.36) for a custom resource, as tests/test_apiserver.py
# finds them on the real server: each changes what is valid, so `finetune validate` does them too.

# metav1.ObjectMeta's fields: strict field validation refuses any other key under metadata.
OBJECT_META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)
# The name generator keeps this much of generateName and appends 5 random characters of
# "bcdfghjklmnpqrstvwxz2456789"; "xxxxx" stands for them (every rule judges all such names alike).
GENERATED_NAME_PREFIX_LENGTH = 58
GENERATED_NAME_SUFFIX = "xxxxx"
GENERATED_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
# go-openapi takes a JSON number for an integer when it is integral and within +-2**53.
_LARGEST_EXACT_INTEGER = 2**53
_DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_MAX_ANNOTATIONS_BYTES = 256 * 1024
_QUALIFIED_NAME_WORDS = (
    "a qualified name: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
    "digit, optionally after a DNS subdomain prefix and '/' (e.g. example.com/team)"
)


def _integral(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer() and abs(value) <= _LARGEST_EXACT_INTEGER


def _decoded(value: Any, schema: dict[str, Any], path: tuple[str | int, ...], floats: list[Any]) -> Any:
    """``value`` as the API server decodes it for ``schema``: null fields pruned (none is nullable) and
    integral numbers such as 2.0 in integer fields taken for integers (their paths go to ``floats``)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return value  # kept as it is, nulls too
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        decoded = {}
        for key, child in value.items():
            child_schema = properties.get(key, extra if isinstance(extra, dict) else None)
            if child_schema is None:
                decoded[key] = child  # an unknown field: the model reports it
            elif child is not None:
                decoded[key] = _decoded(child, child_schema, (*path, key), floats)
        return decoded
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_decoded(item, schema["items"], (*path, i), floats) for i, item in enumerate(value)]
    takes_integers = schema.get("type") == "integer" or schema.get("x-kubernetes-int-or-string")
    if takes_integers and _integral(value):
        floats.append(path)
        return int(value)
    return value


def _as_decoded(document: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    floats: list[Any] = []
    root = dict(_schema())
    # metadata is a Go struct, not a schema: a null there is a field left unset.
    root["properties"] = root["properties"] | {
        "metadata": {"properties": {key: {} for key in OBJECT_META_FIELDS}}
    }
    return _decoded(document, root, (), floats), floats


def _unknown_fields(value: Any, schema: dict[str, Any], path: tuple[str | int, ...]) -> list[ValidationIssue]:
    """Keys the schema does not know, as strict field validation finds them (for status, which the
    model does not check: the API server drops a manifest's status, but not its unknown fields)."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [i for n, item in enumerate(value) for i in _unknown_fields(item, schema["items"], (*path, n))]
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    properties = schema["properties"]
    issues = []
    for key, child in value.items():
        if key in properties:
            issues += _unknown_fields(child, properties[key], (*path, key))
        else:
            issues.append(ValidationIssue(dotted((*path, key)), _unknown_field(key, list(properties)), child))
    return issues


def _int64_issues(value: Any, path: tuple[str | int, ...]) -> list[ValidationIssue]:
    """Integers a JSON decoder into int64 refuses, each named by its field."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return []
        return [
            ValidationIssue(
                dotted(path), f"must be an integer within int64 ({_INT64[0]} to {_INT64[1]})", value
            )
        ]
    if isinstance(value, dict):
        return [issue for key, child in value.items() for issue in _int64_issues(child, (*path, key))]
    if isinstance(value, list):
        return [issue for index, child in enumerate(value) for issue in _int64_issues(child, (*path, index))]
    return []


def _is_subdomain(text: str) -> bool:
    return len(text) <= 253 and _DNS_1123_SUBDOMAIN.fullmatch(text) is not None


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_1123_LABEL.fullmatch(text) is not None


def _is_qualified_name(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not _is_subdomain(prefix):
        return False
    return len(name) <= 63 and _QUALIFIED_NAME_PART.fullmatch(name) is not None


def _metadata_issues(document: dict[str, Any]) -> list[ValidationIssue]:
    """apiVersion and kind present, and metadata as ObjectMeta validation wants it."""
    issues = [
        ValidationIssue(key, "required field is missing")
        for key in ("apiVersion", "kind")
        if key not in document
    ]
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        return issues  # the model reports the type
    issues += [
        ValidationIssue(f"metadata.{key}", _unknown_field(key, list(OBJECT_META_FIELDS)), value)
        for key, value in metadata.items()
        if key not in OBJECT_META_FIELDS
    ]
    namespace = metadata.get("namespace")
    if isinstance(namespace, str) and namespace and not _is_dns_label(namespace):
        issues.append(
            ValidationIssue(
                "metadata.namespace",
                "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and "
                "ending with a letter or digit",
                namespace,
            )
        )
    if not metadata.get("name") and not metadata.get("generateName"):
        issues.append(
            ValidationIssue("metadata.name", "required field is missing (or metadata.generateName)")
        )
    generate_name = metadata.get("generateName")
    # The prefix is checked as a name whose trailing '-' would be followed by more characters.
    if (
        isinstance(generate_name, str)
        and generate_name
        and not _is_subdomain(re.sub("-$", "a", generate_name))
    ):
        issues.append(
            ValidationIssue(
                "metadata.generateName",
                "must be the start of a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')",
                generate_name,
            )
        )
    labels, annotations = metadata.get("labels"), metadata.get("annotations")
    for key, value in (labels or {}).items() if isinstance(labels, dict) else ():
        if not _is_qualified_name(str(key)):
            issues.append(
                ValidationIssue("metadata.labels", f"label keys must be {_QUALIFIED_NAME_WORDS}", key)
            )
        if isinstance(value, str) and (len(value) > 63 or not _LABEL_VALUE.fullmatch(value)):
            issues.append(
                ValidationIssue(
                    dotted(("metadata", "labels", key)),
                    "must be empty, or at most 63 letters, digits, '-', '_' or '.', starting and ending "
                    "with a letter or digit",
                    value,
                )
            )
    if isinstance(annotations, dict):
        for key in annotations:
            if not _is_qualified_name(str(key).lower()):
                issues.append(
                    ValidationIssue(
                        "metadata.annotations", f"annotation keys must be {_QUALIFIED_NAME_WORDS}", key
                    )
                )
        size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())
        if size > _MAX_ANNOTATIONS_BYTES:
            issues.append(
                ValidationIssue(
                    "metadata.annotations", f"may hold at most 256 KiB of keys and values, not {size} bytes"
                )
            )
    return issues


def _as_evaluated(stored: dict[str, Any], floats: list[Any], document: dict[str, Any]) -> dict[str, Any]:
    """What the API server's CEL rules see: the stored object, with the numbers as the request gave them
    (2.0, not 2) and the generated name where only generateName was given."""
    evaluated = json.loads(json.dumps(stored))
    for path in floats:
        _value_at(evaluated, path[:-1])[path[-1]] = _value_at(document, path)
    metadata = evaluated.setdefault("metadata", {})
    if not metadata.get("name") and metadata.get("generateName"):
        metadata["name"] = metadata["generateName"][:GENERATED_NAME_PREFIX_LENGTH] + GENERATED_NAME_SUFFIX
    return evaluated


def validate_object(document: Any) -> tuple[FinetuneJob | None, list[ValidationIssue]]:
    """The parsed job and every problem in one manifest (a dict, as loaded from YAML or the API)."""
    if not isinstance(document, dict):
        return None, [
            ValidationIssue("", "must be a mapping with apiVersion, kind, metadata and spec", document)
        ]
    decoded, floats = _as_decoded(document)
    out_of_range = _int64_issues(decoded, ())
    issues = out_of_range + _metadata_issues(decoded)
    issues += _unknown_fields(decoded.get("status"), _schema()["properties"]["status"], ("status",))
    try:
        job = FinetuneJob.model_validate(decoded)
    except ValidationError as error:
        return None, issues + _structural_issues(error, decoded)
    if out_of_range:
        return None, issues  # the API server refuses to decode them; its CEL rules never run
    evaluated = _as_evaluated(defaulted(job), floats, document)
    name_generated = evaluated["metadata"].get("name") != job.metadata.name
    for issue in rule_issues(evaluated):
        if name_generated and issue.path == "":
            # A rule on the name the API server would generate: the manifest's generateName is to blame.
            issue = ValidationIssue(
                "metadata.generateName",
                f"{issue.message}; the API server names the job after metadata.generateName, "
                f"{GENERATED_NAME_SUFFIX} standing for 5 random characters",
                job.metadata.generate_name,
            )
        issues.append(issue)
    return (job if not issues else None), issues


def generated_name(job: FinetuneJob, rng: random.Random | None = None) -> str | None:
    """Names a job that has only ``metadata.generateName`` as the API server would (the prefix and 5
    random characters) and returns the name; None when the job has a name already."""
    prefix = job.metadata.generate_name
    if job.metadata.name or not prefix:
        return None
    chooser = rng or random.SystemRandom()
    suffix = "".join(chooser.choice(GENERATED_NAME_ALPHABET) for _ in GENERATED_NAME_SUFFIX)
    job.metadata.name = prefix[:GENERATED_NAME_PREFIX_LENGTH] + suffix
    return job.metadata.name


def parse_finetune_job(document: Any) -> FinetuneJob:
    """The job, or :class:`InvalidManifestError` listing every problem."""
    job, issues = validate_object(document)
    if job is None:
        raise InvalidManifestError(issues)
    return job


# --- Reading YAML: bounded, so that no input crashes or stalls `finetune validate` -----------------------
# The limits (documented in docs/api.md, "Limits of what validate reads"): a file is at most 1 MiB (the
# API server takes at most 3 MiB, etcd stores at most 1.5 MiB), nested at most 64 levels deep, and its
# aliases may add at most 10,000 nodes when expanded (a "billion laughs" file adds 10**9), never a
# node that contains the alias itself.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_ALIAS_NODES = 10_000
# Python refuses to convert integers of more digits than this (sys.get_int_max_str_digits).
_MAX_INTEGER_DIGITS = 1000


class ManifestLimitError(yaml.YAMLError):
    """A limit of what validate reads was passed (size, depth, aliases) or a value no JSON holds."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _StrictLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: duplicate keys are errors (plain loading keeps the last one silently)
    and exponents without a dot (``1e-4``) are numbers, as in go-yaml, not strings as in YAML 1.1;
    timestamps stay strings (as go-yaml hands them to JSON); NaN, infinities and the types JSON cannot
    hold (``!!binary``, ``!!set``, ...) are errors. Composing counts depth and alias expansions."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: list[str | None] = []
        self._alias_nodes = 0
        self._sizes: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            self._count_alias(event, node)
            return node
        event = self.peek_event()
        if self._depth >= MAX_DEPTH:
            raise ManifestLimitError(
                f"nested deeper than {MAX_DEPTH} levels, the most allowed", event.start_mark
            )
        self._depth += 1
        self._open_anchors.append(getattr(event, "anchor", None))
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.pop()

    def _count_alias(self, event: yaml.AliasEvent, node: yaml.Node) -> None:
        if event.anchor in self._open_anchors:
            raise ManifestLimitError(
                f"alias *{_printable(str(event.anchor))} refers to a node that contains it", event.start_mark
            )
        size, height = self._size(node)
        self._alias_nodes += size
        if self._alias_nodes > MAX_ALIAS_NODES:
            raise ManifestLimitError(
                f"aliases expand to more than {MAX_ALIAS_NODES} nodes, the most allowed", event.start_mark
            )
        if self._depth + height > MAX_DEPTH:
            raise ManifestLimitError(
                f"alias *{_printable(str(event.anchor))} nests the document deeper than {MAX_DEPTH} levels, "
                "the most allowed",
                event.start_mark,
            )

    def _size(self, node: yaml.Node) -> tuple[int, int]:
        """Nodes and levels of ``node`` with every alias expanded (memoized: shared nodes count once
        each here, and their expansions stay bounded by the checks made when they were composed)."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        sizes = [self._size(child) for child in children]
        result = (1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
        self._sizes[id(node)] = result
        return result

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise ManifestLimitError(
                f"{_printable(str(node.value))[:40]} is not a number JSON (and so Kubernetes) can hold: "
                "NaN and infinities are not, nor numbers beyond 1.8e308",
                node.start_mark,
            )
        return value

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(ch.isalnum() for ch in str(node.value))
        if digits > _MAX_INTEGER_DIGITS:
            raise ManifestLimitError(
                f"an integer of {digits} digits; integers must be within int64 ({_INT64[0]} to {_INT64[1]})",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[tuple[type, Any]] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "found a key that is a list or mapping", key_node.start_mark
            )
        # Typed, so that 1 and true (equal in Python) are not taken for duplicates.
        if (type(key), key) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_printable(_shortened(repr(key), 60))}", key_node.start_mark
            )
        seen.add((type(key), key))
    return loader.construct_mapping(node, deep=deep)


def _not_json(loader: _StrictLoader, node: yaml.Node) -> Any:
    raise ManifestLimitError(
        f"the tag {_printable(str(node.tag))[:60]} names a type JSON (and so Kubernetes) cannot hold",
        node.start_mark,
    )


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor(
    "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node)
)
for _tag in ("binary", "set", "omap", "pairs"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _not_json)


def _yaml_error(error: yaml.YAMLError, text: str) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        character = error.character
        code = f"U+{character:04X}" if isinstance(character, int) else _printable(repr(character))
        return (
            f"YAML error at line {line}, column {column}: the character {code} is not allowed in YAML "
            "(of the control characters, only tab, line feed and carriage return are)"
        )
    mark = getattr(error, "problem_mark", None)
    problem = _shortened(_printable(getattr(error, "problem", None) or str(error)), 200)
    if mark is None:
        return f"YAML error: {problem}"
    return f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _is_finetune_job(document: dict[str, Any]) -> bool:
    api_version = str(document.get("apiVersion", ""))
    return document.get("kind") == KIND or api_version.split("/")[0] == GROUP


def validate_text(text: str, source: str) -> list[DocumentReport]:
    """Reports for every document of a (multi-document) YAML text; each valid job is in its report."""
    reports: list[DocumentReport] = []
    reading = 1  # the number of the document being read, so that a syntax error names it
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)  # inside the try: it refuses control characters as it starts
        while loader.check_data():
            document = loader.get_data()
            report = DocumentReport(source, reading)
            reports.append(report)
            reading += 1
            if document is None:
                report.skipped = "empty document"
            elif isinstance(document, dict) and not _is_finetune_job(document):
                kind = _shortened(_printable(f"{document.get('apiVersion')}, {document.get('kind')}"), 80)
                report.skipped = f"not a {KIND} ({kind})"
            else:
                if isinstance(document, dict) and isinstance(document.get("metadata"), dict):
                    metadata = document["metadata"]
                    report.name = metadata.get("name") or metadata.get("generateName")
                report.job, report.issues = validate_object(document)
    except yaml.YAMLError as error:
        reports.append(
            DocumentReport(source, reading, issues=[ValidationIssue("", _yaml_error(error, text))])
        )
    except RecursionError:  # not expected within MAX_DEPTH; a message all the same, never a traceback
        reports.append(
            DocumentReport(
                source, reading, issues=[ValidationIssue("", f"nested deeper than {MAX_DEPTH} levels")]
            )
        )
    finally:
        if loader is not None:
            loader.dispose()
    if not reports:
        reports.append(DocumentReport(source, 1, skipped="no documents"))
    return reports


def validate_bytes(data: bytes, source: str) -> list[DocumentReport]:
    """:func:`validate_text` for a file's bytes: at most :data:`MAX_FILE_BYTES`, UTF-8 (a byte order
    mark allowed), every problem reported with its line."""
    if len(data) > MAX_FILE_BYTES:
        problem = f"the file is larger than {MAX_FILE_BYTES // 1024 // 1024} MiB, the most validate reads"
        return [DocumentReport(source, 1, issues=[ValidationIssue("", problem)])]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        start = error.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        problem = (
            f"not UTF-8 at line {line}, column {column} (byte 0x{data[start]:02X}); manifests are UTF-8 text"
        )
        return [DocumentReport(source, 1, issues=[ValidationIssue("", problem)])]
    return validate_text(text, source)
