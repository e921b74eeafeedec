"""Pydantic JSON schema → Kubernetes structural schema.

The API server accepts only "structural" OpenAPI v3 in a CRD: every node typed, no
``$ref``, no ``anyOf`` except the int-or-string form, no ``additionalProperties`` beside
``properties``. Pydantic writes JSON Schema; this module translates one into the other so
the CRD can be derived from the relay's own settings model instead of being kept by hand.
"""

from __future__ import annotations

import copy
from typing import Any

from smtprelay.config import DURATION_PATTERN, OPTIONAL_DURATION_PATTERN, QUANTITY_PATTERN

Schema = dict[str, Any]

# JSON Schema words the API server does not know or that read badly in `kubectl explain`.
_DROPPED = ("title", "format", "$defs")

_DURATION_UNITS = (("h", 3600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
_QUANTITY_UNITS = (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024), ("", 1))


def format_duration(seconds: float) -> str:
    """The shortest duration string the relay parses back to ``seconds`` (1800 → ``30m``)."""
    millis = round(seconds * 1000)
    for unit, size in _DURATION_UNITS:
        if millis % size == 0:
            return f"{millis // size}{unit}"
    raise AssertionError("unreachable: 1ms divides every whole number of milliseconds")


def format_quantity(size: int) -> str:
    """The shortest binary quantity the relay parses back to ``size`` (26214400 → ``25Mi``)."""
    for unit, factor in _QUANTITY_UNITS:
        if size % factor == 0:
            return f"{size // factor}{unit}"
    raise AssertionError("unreachable: 1 divides every integer")


def structural(schema: Schema, *, defaults: Any = None) -> Schema:
    """Inline ``$ref``s, collapse optional ``anyOf``s, and set defaults from a model instance.

    ``defaults`` is the model's own default instance dumped by alias in JSON mode; pydantic's
    schema leaves out ``default_factory`` values and writes durations and sizes as numbers,
    so the defaults are taken from the instance and written the way a user would.
    """
    definitions = schema.get("$defs", {})
    return _convert(schema, definitions, defaults)


def _resolve(node: Schema, definitions: Schema) -> Schema:
    if "$ref" not in node:
        return node
    name = node["$ref"].removeprefix("#/$defs/")
    merged: Schema = copy.deepcopy(definitions[name])
    merged.update({key: value for key, value in node.items() if key != "$ref"})
    return merged


def _collapse_optional(node: Schema) -> Schema:
    """``anyOf: [X, null]`` → X: a missing field is how Kubernetes says "unset"."""
    if "anyOf" not in node or node.get("x-kubernetes-int-or-string"):
        return node
    branches = [branch for branch in node["anyOf"] if branch.get("type") != "null"]
    if len(branches) != 1:
        raise ValueError(f"cannot express anyOf {node['anyOf']!r} in a structural schema")
    collapsed = {key: value for key, value in node.items() if key != "anyOf"}
    return {**branches[0], **collapsed}


def _default_for(node: Schema, value: Any) -> Any:
    if value is None or value == []:
        return None  # unset is the default; an empty list would only be noise
    if node.get("pattern") == OPTIONAL_DURATION_PATTERN and value == 0:
        return "0"
    if node.get("pattern") in (DURATION_PATTERN, OPTIONAL_DURATION_PATTERN) and isinstance(
        value, int | float
    ):
        return format_duration(float(value))
    if node.get("pattern") == QUANTITY_PATTERN and isinstance(value, int):
        return format_quantity(value)
    if node.get("type") == "object":
        # The object's own fields carry their defaults; `{}` lets the API server apply them
        # when the whole section is left out.
        return {}
    return value


def _convert(node: Schema, definitions: Schema, defaults: Any) -> Schema:
    node = _collapse_optional(_resolve(node, definitions))
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED or key == "default":
            continue
        if key == "additionalProperties" and "properties" in node:
            continue  # unknown fields are pruned by the API server (and refused by kubectl)
        if key == "properties":
            out[key] = {
                name: _convert(
                    child,
                    definitions,
                    defaults.get(name) if isinstance(defaults, dict) else None,
                )
                for name, child in value.items()
            }
        elif key == "items":
            out[key] = _convert(value, definitions, None)
        else:
            out[key] = copy.deepcopy(value)
    default = _default_for(out, defaults)
    if default is not None:
        out["default"] = default
    return ordered(out)


_KEY_ORDER = (
    "description",
    "type",
    "anyOf",
    "x-kubernetes-int-or-string",
    "format",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "maxItems",
    "default",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
)


def ordered(node: Schema) -> Schema:
    """Description first, then type and constraints, children last: reads well as YAML."""
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def without(node: Schema, *path: str) -> Schema:
    """A copy of ``node`` with the property at ``path`` (a chain of property names) removed."""
    result = copy.deepcopy(node)
    parent = result
    for name in path[:-1]:
        parent = parent["properties"][name]
    del parent["properties"][path[-1]]
    return result
