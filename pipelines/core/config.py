"""Typed job configs: dataclasses loaded from YAML, overridden by `--set a.b=value`, validated early.

Every job owns a small frozen dataclass. `load_config(Cls, path, overrides)` builds it strictly:
unknown keys, wrong types and values outside a `Literal[...]` fail with a `ConfigError` naming the
field (`train.lr`) and what is allowed, before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid. The message names the field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_scalar(field: str, value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{field}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{field}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value) if not isinstance(value, str) else tp(yaml.safe_load(value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{field}: expected {tp.__name__}, got {value!r}") from exc
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{field}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{field}: unsupported config type {_type_name(tp)}")


def coerce(field: str, value: Any, tp: Any) -> Any:
    """Convert a YAML / command-line value to the annotated type, or raise ConfigError."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=field)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{field}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        errors = []
        for arg in args:
            try:
                return coerce(field, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field}: {value!r} matches none of {errors}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        item_tp = (get_args(tp) or (Any,))[0]
        return tuple(coerce(f"{field}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (str, Any)
        return {coerce(field, k, key_tp): coerce(f"{field}.{k}", v, val_tp) for k, v in value.items()}
    return _coerce_scalar(field, value, tp)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, strictly (unknown keys are errors)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config field(s) {', '.join(where + u for u in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(f"{prefix}.{name}" if prefix else name, value, hints[name])
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a range check in __post_init__: name the full path
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """YAML file (optional) + `key.path=value` overrides -> validated `cls` instance."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def require(condition: bool, field: str, message: str) -> None:
    """Range checks in `__post_init__`: `require(self.lr > 0, "lr", "must be > 0")`."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
