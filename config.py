"""One configuration system for the whole project.

Configs are dataclasses that live next to the code they configure; each field is documented by a string
literal right after it (an attribute docstring, as CleanRL and tyro read them), which `m2rl config show`
and `m2rl train --help-config` print with the field's type and default. Entry points build them from a
YAML file in `configs/` plus command-line overrides:

    cfg = load_config(TrainConfig, "configs/train.yaml", ["learner.loss.kind=grpo", "+eval.temperature=0.7"])

Overrides use Hydra's spelling:
- `key.sub=value` sets a key of the schema, whether or not the file sets it;
- `+key.sub=value` adds a key the file does not set (an error if the file, or an earlier override,
  already sets it: use `key=value` to change a value on purpose);
- `++key.sub=value` adds or overrides, whichever applies (the same as `key=value` here, since every key
  of the schema exists with its default).
A key that is not in the schema is an error in every spelling.

Every problem (missing file, bad YAML, unknown key, wrong type, bad value) raises `ConfigError` whose
message names the key and the file, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and where it came from."""


def _describe(source: str | None) -> str:
    return f" (in {source})" if source else ""


def type_label(tp: Any) -> str:
    """How a field's type reads in YAML terms: `float | null`, `cispo | grpo`, `list[str]`, `LossConfig`."""
    if tp is type(None) or tp is None:
        return "null"
    if tp is Any:
        return "any"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(str(v) if isinstance(v, str) else json.dumps(v) for v in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(option) for option in get_args(tp))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        args = get_args(tp)
        return f"{name}[{', '.join('...' if a is Ellipsis else type_label(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _value_kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict) else "list" if isinstance(value, (list, tuple)) else "scalar"


def _type_kind(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (list, tuple, typing.Sequence):
        return "list"
    return "scalar"


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check `value` against the annotation `tp`, converting only where no information is lost."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: dict[Any, ConfigError] = {}
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors[option] = exc
        # A mapping or a list that only one option can take: that option's error names the nested key.
        same_kind = [o for o in errors if _type_kind(o) == _value_kind(value) != "scalar"]
        if len(same_kind) == 1:
            raise errors[same_kind[0]]
        raise ConfigError(
            f"config key '{key}'{_describe(source)}: expected {type_label(tp)}, got {value!r}"
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
    raise ConfigError(f"config key '{key}'{_describe(source)}: expected {type_label(tp)}, got {value!r}")


def from_dict(
    cls: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "", base: T | None = None
) -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; absent keys keep their defaults, or the
    values of `base` when one is given (a nested mapping then updates base's nested section)."""
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
    kwargs: dict[str, Any] = {} if base is None else {name: getattr(base, name) for name in fields}
    for name, value in data.items():
        current = kwargs.get(name)
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and isinstance(current, hints[name]):
            kwargs[name] = from_dict(hints[name], value, source, f"{prefix}{name}.", base=current)
        else:
            kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", source)
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


# ------------------------------------------------------------------------------------------- field docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its documentation} for a dataclass, read from the source of the class (and its bases).

    The documentation of a field is the string literal right after it (an attribute docstring); a field
    without one falls back to the comment at the end of its line, then to the comment lines right above it,
    so a note written as a comment still shows."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where no source is kept (an exec'd string, the REPL)
            continue
        docs.update(_docs_in_class_source(source))
    return docs


def _docs_in_class_source(source: str) -> dict[str, str]:
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    comments: dict[int, str] = {}  # line -> comment text, for the fallback
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    docs: dict[str, str] = {}
    statements = body.body
    for index, statement in enumerate(statements):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        name = statement.target.id
        following = statements[index + 1] if index + 1 < len(statements) else None
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[name] = " ".join(inspect.cleandoc(following.value.value).split())
            continue
        end = statement.end_lineno or statement.lineno
        if end in comments:
            docs[name] = comments[end]
            continue
        above, line = [], statement.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        if above:
            docs[name] = " ".join(above)
    return docs


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config schema, as `m2rl config show` lists it."""

    key: str  # dotted; items of a list of sections are `key[].sub`
    type: str  # type_label of the annotation
    default: Any  # plain YAML-safe value; dataclasses.MISSING when the key is required
    doc: str
    section: bool  # a nested dataclass whose keys follow


def schema_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of dataclass `cls`, nested sections expanded depth-first in declaration order."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    keys: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default: Any = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = dataclasses.MISSING
        key = f"{prefix}{f.name}"
        section = _section_type(tp)
        item = _list_item_section(tp)
        doc = docs.get(f.name) or (_class_doc(section) if section else "")
        keys.append(KeyDoc(key, type_label(tp), default, " ".join(doc.split()), section is not None))
        if section is not None:
            keys.extend(schema_keys(section, f"{key}."))
        elif item is not None:
            keys.extend(schema_keys(item, f"{key}[]."))
    return keys


def _class_doc(cls: type) -> str:
    """The class's own docstring; "" for the signature text dataclasses put there when it has none."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if get_origin(tp) in (Union, types.UnionType):
        options = [o for o in get_args(tp) if dataclasses.is_dataclass(o)]
        if len(options) == 1 and all(o is type(None) or o in options for o in get_args(tp)):
            return options[0]  # type: ignore[no-any-return]
    return None


def _list_item_section(tp: Any) -> type | None:
    if get_origin(tp) in (list, tuple) and get_args(tp) and dataclasses.is_dataclass(get_args(tp)[0]):
        return get_args(tp)[0]  # type: ignore[no-any-return]
    return None


def resolve_key(cls: type, dotted: str) -> KeyDoc:
    """The schema entry of a dotted key (`learner.loss.kind`); an unknown key is a ConfigError that says
    which part is unknown and what is known there."""
    keys = {k.key: k for k in schema_keys(cls)}
    if dotted in keys:
        return keys[dotted]
    parts = dotted.split(".")
    for length in range(len(parts), 0, -1):
        parent = ".".join(parts[: length - 1])
        if not parent or parent in keys:
            break
    here = sorted(k.key[len(parent) + 1 if parent else 0:] for k in keys.values()
                  if k.key.startswith(f"{parent}.") or not parent)
    here = [k for k in here if "." not in k]
    raise ConfigError(f"unknown config key '{dotted}'; known keys{f' in {parent}' if parent else ''}: {', '.join(here)}")


def format_schema(cls: type, config: Any = None, width: int = 100) -> str:
    """Every key of `cls` with its type, value and meaning, one block per key:

        learner.loss.kind: cispo | grpo | dapo | gspo = cispo
            Which policy loss ...

    With `config` (an instance of cls), the value shown is the config's, followed by the default when it
    differs."""
    values = _flatten_all(to_dict(config)) if config is not None else {}
    out: list[str] = []
    for entry in schema_keys(cls):
        if entry.section:
            head = f"{entry.key}: {entry.type} (section)"
        else:
            default = "(required)" if entry.default is dataclasses.MISSING else _show_value(entry.default)
            if entry.default is dataclasses.MISSING and entry.key not in values:
                head = f"{entry.key}: {entry.type} (required)"
            elif entry.key in values and _show_value(values[entry.key]) != default:
                head = f"{entry.key}: {entry.type} = {_show_value(values[entry.key])}  (default {default})"
            else:
                head = f"{entry.key}: {entry.type} = {default}"
        out.append(head)
        doc = entry.doc or "(undocumented)"
        out.extend(textwrap.wrap(doc, width=width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out) + "\n"


def _show_value(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else (value or '""')


def _flatten_all(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every key, sections included (they map to their whole mapping)."""
    flat: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat[f"{prefix}{key}"] = value
            flat.update(_flatten_all(value, f"{prefix}{key}."))
    return flat


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


OverrideMode = Literal["set", "add", "force"]
_OVERRIDE_PREFIX: dict[str, OverrideMode] = {"++": "force", "+": "add"}


@dataclass(frozen=True)
class Override:
    """One command-line override: `key.sub=value` (set), `+key.sub=value` (add), `++key.sub=value` (force)."""

    path: list[str]
    value: Any
    mode: OverrideMode = "set"

    @property
    def key(self) -> str:
        return ".".join(self.path)


def parse_override(text: str) -> Override:
    """`a.b.c=value`, `+a.b.c=value` or `++a.b.c=value` -> Override (value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError(f"bad override '{text}': expected key.sub=value (or +key.sub=value, ++key.sub=value)")
    key, raw = text.split("=", 1)
    key = key.strip()
    mode: OverrideMode = "set"
    for prefix, prefix_mode in _OVERRIDE_PREFIX.items():  # "++" before "+"
        if key.startswith(prefix):
            key, mode = key[len(prefix):], prefix_mode
            break
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{text}': empty key")
    if key.startswith("+"):
        raise ConfigError(f"bad override '{text}': use key=value, +key=value or ++key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparseable value is taken as the literal string
    return Override(key.split("."), value, mode)


def override_key(text: str) -> str:
    """The dotted key an override sets, without its `+`/`++` prefix (`++a.b=1` -> `a.b`)."""
    return text.split("=", 1)[0].strip().lstrip("+")


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Return a copy of `data` (the mapping read from `source`) with each override applied in order,
    creating nested mappings. `+key=value` is refused when the key is already set (see the module
    docstring); whether a key exists in the schema is checked later, by `from_dict`."""
    result = _deep_copy(data)
    for text in overrides:
        override = parse_override(text)
        node = result
        for part in override.path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        last = override.path[-1]
        if override.mode == "add" and last in node:
            where = source or "the config"
            raise ConfigError(
                f"override '{text}': '{override.key}' is already set in {where} (to {json.dumps(node[last], default=str)}); "
                f"use {override.key}=... or ++{override.key}=... to change it"
            )
        node[last] = override.value
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
        data = apply_overrides(data, overrides, source)
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
