"""Reading a config tree, whatever the tree: YAML presets (`base:` chains), dotted overrides, and the
checks every field gets from its declaration alone (type, finite floats, the field's range).

A field is declared with `doc(default, help, range="(0, 1)")`; the range lives in the field's metadata
so that one generic check covers every numeric field of every tree and the generated config
reference shows it. The trees themselves (pretraining, fine-tuning) and their cross-field rules live
in `mae_scale.config`, `mae_scale.finetune_config` and `mae_scale.config_checks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mae_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message is one line meant for the user."""


def config_warning(message: str) -> None:
    """One line on stderr for a config that runs but probably not as meant. Configs are read before the
    process group exists, so the launcher's RANK is the only rank known: only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else repr(x)


@dataclass(frozen=True)
class Range:
    """An interval in the usual notation, "(0, 1)", "[0, inf)", "[1, 4294967295]"."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"bad range {text!r}; write it like (0, 1) or [1, inf)")
        return cls(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")

    def contains(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def doc(default: Any, help: str, range: Optional[str] = None, **kwargs: Any) -> Any:
    """A dataclass field with its docstring and allowed range kept in metadata (used for validation
    messages and the generated config reference)."""
    metadata = {"help": help, "range": Range.parse(range) if range else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


# ---------------------------------------------------------------------------------------------
# YAML: strict UTF-8, no duplicate keys, `base:` chains without cycles.


class _DuplicateKey(Exception):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: safe_load
    silently keeps the last one, so half of an edited preset would be ignored without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges are overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {first} and {line}); keep one")
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_preset(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """The preset's mapping with its `base:` chain resolved (paths relative to the preset's folder)."""
    path = Path(path)
    if not path.is_file():
        if _chain:
            raise ConfigError(f"config file {_chain[-1]} names base: {path}, which does not exist")
        raise ConfigError(f"config file {path} does not exist; pass a YAML preset such as "
                          "configs/pretrain/mae_vit_tiny_smoke.yaml")
    if path.resolve() in _chain:
        loop = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise ConfigError(f"config file {path}: the base: chain loops ({loop}); remove one base:")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        raise ConfigError(f"config file {path} is empty (or only comments); a run needs a preset: start from one "
                          "in configs/ with base: and change what differs")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping (key: value lines) at the top level, "
                          f"not a {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {path}: base: must name another preset file, e.g. "
                          f"base: mae_vit_huge_patch14_800ep.yaml (got {base!r})")
    return deep_merge(read_preset(path.parent / base, (*_chain, path.resolve())), data)


def apply_overrides(data: dict, overrides: list[str], cls: type) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested mapping."""
    data = dict(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=10")
        try:
            value = parse_yaml(raw, f"override {item!r}") if raw != "" else ""
        except ConfigError as exc:
            if "appears twice" in str(exc):
                raise
            value = raw  # not YAML: the raw text (a string field takes it; any other field refuses it)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
        _keep_string(data, cls, parts, raw)
    return data


def _keep_string(data: dict, cls: type, parts: list[str], raw: str) -> None:
    """A value typed as str stays the raw text even if YAML reads it as a number (run_name=123)."""
    node, tp = data, cls
    for part in parts[:-1]:
        tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
        node = node.get(part)
        if not isinstance(node, dict):
            return
    if dataclasses.is_dataclass(tp) and typing.get_type_hints(tp).get(parts[-1]) is str:
        if not isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = raw


# ---------------------------------------------------------------------------------------------
# Mapping -> typed tree: every field's type, finiteness and range, from its declaration.


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = typing.get_args(tp)
        return " or ".join(type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is list:
        inner = typing.get_args(tp)[0]
        if typing.get_origin(inner) is Literal:
            return "list, each " + type_name(inner)
        return f"list of {type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alt in inner[:-1]:  # str or list: the first alternative the value fits
            try:
                return coerce(value, alt, key)
            except ConfigError:
                pass
        try:
            return coerce(value, inner[-1], key)
        except ConfigError:
            if len(inner) == 1:
                raise
            raise ConfigError(f"{key}={_short(value)} has the wrong type; expected {type_name(tp)}") from None
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"{key}={_short(value)} is not allowed; use {type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={_short(value)} has the wrong type; expected {type_name(tp)}, e.g. [0.9, 0.95]")
        return [coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads 1e-4 as text; people mean the number
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"{key}={_short(value)} has the wrong type; expected {type_name(tp)}")
    if tp is float:
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if not math.isfinite(value):  # a NaN learning rate would train to NaN, silently
            raise ConfigError(f"{key}={value} is not a finite number; NaN and infinities are refused")
    return value


def check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    rng: Optional[Range] = f.metadata.get("range")
    if rng is None or value is None:
        return
    if isinstance(value, list):
        if not all(rng.contains(v) for v in value):
            raise ConfigError(f"{key}={_short(value)} must hold numbers {rng.describe()}")
    elif not rng.contains(value):
        raise ConfigError(f"{key}={_short(value)} must be {rng.describe()}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """The typed tree `cls` from a mapping; unknown keys, wrong types, non-finite floats and values out
    of a field's range are refused naming the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted((str(k) for k in set(data) - set(names)))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys under {prefix.rstrip('.') or 'the top level'}: "
                          + ", ".join(names))
    kwargs = {}
    for f in fields:
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = coerce(data[f.name], tp, prefix + f.name)
            check_range(f, kwargs[f.name], prefix + f.name)
    return cls(**kwargs)


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf of a config tree, in declaration order."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp))
    return out


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def reference_markdown(cls: type) -> list[str]:
    """One markdown table row per field: the README's config reference is generated from this."""
    rows = []
    for key, f, tp in leaf_fields(cls):
        rng = f.metadata.get("range")
        kind = type_name(tp) + (f", {rng.describe()}" if rng else "")
        rows.append(f"| `{key}` | {kind} | `{default_of(f)!r}` | {f.metadata.get('help', '')} |")
    return rows
