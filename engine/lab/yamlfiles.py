"""YAML config files read strictly: one-line errors naming the file and line, duplicate keys refused, and
``key=value`` overrides parsed as YAML. Shared by training, sweep and distillation-chain configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from engine.lab.errors import ConfigError


def parse_key_value(item: str, example: str) -> tuple[str, Any]:
    """Split a ``--set`` item at the first ``=`` and read the value as YAML (``false`` -> False, ``1e-3`` -> 1e-3).

    Text that is not YAML is kept as typed. Shared by training and sweep configs.

    Raises:
        ConfigError: there is no ``=`` or the key is empty (``example`` shows the right form).
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. --set {example})")
    try:
        return key, (yaml.safe_load(raw) if raw.strip() else None)
    except yaml.YAMLError:
        return key, raw  # not YAML (e.g. "a: b: c"): keep the text as typed


class _DuplicateKey(Exception):
    """A mapping names one key twice (raised inside the YAML loader, reported with the file name)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping; PyYAML would silently keep the last."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden by design
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        except TypeError:  # an unhashable key: the mapping constructor reports it
            break
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line error as one line: where (line, column) and what, with the fix to make."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    detail = f"{problem} ({' '.join(context.split())})" if context else problem
    return f"{where}{detail}; not valid YAML, fix that line (e.g. 'key: value', two-space indents, no tabs)"


def read_yaml_mapping(path: str | os.PathLike, what: str, hint: str) -> dict[str, Any]:
    """Read a YAML config file that must hold a non-empty mapping with each key once.

    Raises:
        ConfigError: the file is missing (``hint`` says where presets are), is not YAML, is empty, is not a
            mapping, or gives a key twice (the message names the key and both lines).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; name a YAML file ({hint})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                          "UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: key {dup.key!r} is given twice (lines {dup.first_line} and {dup.line}); "
                          "keep one of them") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_error_line(exc)}") from None
    if raw is None or raw == {}:
        # An empty file would otherwise train the defaults (the small preset), which nobody asks for by accident.
        raise ConfigError(f"{what} {path} is empty (no key: value lines); {hint}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of key: value lines, got {type(raw).__name__}")
    return raw
