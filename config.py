"""One configuration system for the whole project.

Configs are dataclasses that live next to the code they configure. Entry points build them from a
YAML file in `configs/` plus `key.sub=value` overrides from the command line:

    cfg = load_config(TrainConfig, "configs/train.yaml", ["rl.eps_high=4.0", "env.id=m2rl/Shell-v0"])

Every problem (missing file, bad YAML, unknown key, wrong type) raises `ConfigError` whose message
names the key and the file, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and where it came from."""


def _describe(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check `value` against the annotation `tp`, converting only where no information is lost."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            f"config key '{key}'{_describe(source)}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(
            f"config key '{key}'{_describe(source)}: expected one of {list(get_args(tp))}, got {value!r}"
        )
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}'{_describe(source)}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(
                    f"config key '{key}'{_describe(source)}: expected {len(args)} items, got {len(value)}"
                )
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}'{_describe(source)}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_type, f"{key}.{k}", source): _coerce(v, value_type, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}'{_describe(source)}: expected a mapping for {tp.__name__}, got {value!r}"
            )
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}'{_describe(source)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}'{_describe(source)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string; a number written that way is still a number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise ConfigError(f"config key '{key}'{_describe(source)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}'{_describe(source)}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config key '{key}'{_describe(source)}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}'{_describe(source)}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; absent keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config{_describe(source)}: expected a mapping at '{prefix or '<top>'}', got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'{_describe(source)}; known keys here: {known}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key '{prefix}{missing[0]}'{_describe(source)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ConfigError(f"invalid config{_describe(source)} at '{prefix or '<top>'}': {exc}") from exc


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe view of a config dataclass (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key set twice in one mapping: YAML would silently keep the last one."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._checked: set[int] = set()
        self._check_duplicates(node, "")
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, prefix: str) -> None:
        """Depth-first in document order, so the first duplicate in the file is the one reported."""
        if id(node) in self._checked:  # an alias seen before (or a recursive one)
            return
        self._checked.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_duplicates(item, f"{prefix.rstrip('.')}[{index}].")
            return
        if not isinstance(node, yaml.MappingNode):
            return
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)  # type: ignore[no-untyped-call]
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise ConfigError(f"duplicate key '{prefix}{key}' in {self.name} line {line} "
                                      f"(first set on line {first_line[key]})")
                first_line[key] = line
                self._check_duplicates(value_node, f"{prefix}{key}.")
            else:
                self._check_duplicates(value_node, prefix)


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as text; bytes that are not UTF-8 are a ConfigError naming `what`, the byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}, offset {exc.start})"
        ) from None


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; bad YAML or a duplicate key is a ConfigError naming `source` and the line."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"bad YAML in {source}{where}: {problem}") from exc
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or unreadable file, bad YAML, text that is not UTF-8 or a duplicate
    key is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    data = parse_yaml(decode_utf8(raw, f"config file {path}"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError(f"bad override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparseable value is taken as the literal string
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set (creating nested mappings)."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path` (if any), then the command-line overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else None
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + command-line overrides" if source else "command-line overrides"
    return from_dict(cls, data, source=source)


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config mappings; a key
    present on one side only shows None on the other. Sorted by key."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [(key, flat_old.get(key), flat_new.get(key)) for key in sorted(flat_old.keys() | flat_new.keys())
            if flat_old.get(key) != flat_new.get(key)]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
