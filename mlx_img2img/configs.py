"""Config values from a model's JSON files, checked against the types the code declares for them.

A model folder is untrusted input like a flag: a value of the wrong type ("layers_per_block": "2"), a list
given as a string, a zero count, all become one ``ModelFormatError`` naming the file and the field, before
any layer is built. The configs are dataclasses whose annotations say what each field takes (``Count`` for
sizes and numbers of things); ``config_from_dict`` builds one, ``check_fields`` checks plain mappings.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ModelFormatError

T = TypeVar("T")


class Count(int):
    """The annotation of a field that counts or sizes something (channels, layers, heads, timesteps): an
    integer from 1 to MAX_COUNT. Values stay plain ints; only the check reads it."""


MAX_COUNT = 1_000_000  # far above any real config (vocabularies, timesteps, channels); MLX sizes are 32-bit


def source_of(values: Mapping[str, Any], default: str) -> str:
    """The file the values were read from (``weights.read_json`` remembers it), else `default`."""
    path = getattr(values, "path", None)
    return str(path) if path is not None else default


def _matches(value: Any, kind: Any) -> bool:
    origin = get_origin(kind)
    if kind is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, k) for k in get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, Count):  # JSON true/false are not numbers here, though Python's bool is an int
        return isinstance(value, int) and not isinstance(value, bool) and (kind is int or 1 <= value <= MAX_COUNT)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if kind is str:
        return isinstance(value, str)
    if kind in (list, tuple) or origin in (list, tuple):
        item = (get_args(kind) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    origin = get_origin(kind)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(k) for k in get_args(kind))
    if origin in (list, tuple):
        return f"a list of ({_describe((get_args(kind) or (Any,))[0])})"
    names = {bool: "true or false", int: "an integer", Count: f"an integer from 1 to {MAX_COUNT:,}", float: "a number",
             str: "a string", type(None): "null", list: "a list", tuple: "a list", Any: "anything"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_fields(values: Mapping[str, Any], kinds: Mapping[str, Any], where: str) -> None:
    """Every key of `values` that `kinds` declares must hold a value of that kind; else a ModelFormatError
    naming `where` (the file) and the field."""
    for key, kind in kinds.items():
        if key in values and not _matches(values[key], kind):
            shown = json.dumps(values[key], default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ModelFormatError(f"{where}: {key} must be {_describe(kind)}, not {shown}")


def config_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """The config dataclass `cls` from the fields of `values` it declares (others are ignored, null means
    the default), each checked against its annotation."""
    where = source_of(values, f"the {cls.__name__}")
    if not isinstance(values, Mapping):
        raise ModelFormatError(f"{where}: expected a JSON object {{...}}, not {type(values).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in values.items() if k in names and v is not None}
    check_fields(given, get_type_hints(cls), where)
    return cls(**given)
