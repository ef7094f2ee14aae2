"""Reading and writing run configurations: a YAML file and dotted overrides, layered on the schema's
defaults (``gan_dist.config``) and checked field by field, so a typo or a bad value stops the run before
any process group exists, with a message that names the key; and the resolved config as a dict, YAML
and the ``--help`` listing.

Why not OmegaConf's structured configs: OmegaConf 2.3's take no ``Literal`` and no tuples,
which hold every choice and pair here (``amp.dtype``, ``optim.g_betas``, ``augment.policy``); it has no
numeric bounds, so each range check would be written again; a section whose type follows another
key (``model.<arch>.*``) is custom either way; and its errors span several lines. This parser is the
one-line, key-naming check that ``--help`` and exit status 2 are built on, with no dependency.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gan_dist.config import ARCHITECTURES, DATASETS, LOSSES, TERMS, Config, ConfigError, Registry

REGISTRIES = (ARCHITECTURES, LOSSES, TERMS, DATASETS)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"off", "on"} & set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if args[1:] == (Ellipsis,):
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    """Apply the field's ge/gt/le/lt bounds to a number, or to each number of a list."""
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for name, holds, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                                   ("lt", operator.lt, "<")):
            bound = meta.get(name)
            if bound is not None and not holds(v, bound):
                raise ConfigError(f"{key}: expected values {word} {bound}, got {value!r}")


def from_dict(cls: type, data: typing.Mapping[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested mapping; every key and value is checked."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    variants = {f.metadata["options_of"]: f.name for f in fields.values() if f.metadata["options_of"]}
    sections = {f.name: f.metadata["sections_of"] for f in fields.values() if f.metadata.get("sections_of")}
    known = {name: f for name, f in fields.items() if not f.metadata["options_of"] and name not in sections}
    kwargs: dict[str, Any] = {}
    for name in sorted(data, key=lambda n: n not in variants):  # the choosers first: they decide the sections
        value, key = data[name], f"{prefix}{name}"
        holder = next((f for f, registry in sections.items() if name in registry.names()), None)
        if holder is not None:
            kind = sections[holder].options(name)
            kwargs.setdefault(holder, {})[name] = from_dict(kind, value if value is not None else {}, f"{key}.")
            continue
        if name not in known:
            kwargs.update(_variant_section(cls, known, variants, kwargs, name, value, prefix, sections))
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value if value is not None else {}, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_range(kwargs[name], known[name].metadata, key)
            if known[name].metadata["registry"] is not None:
                known[name].metadata["registry"].check(kwargs[name])
    return cls(**kwargs)


def _variant_section(cls: type, known: dict[str, dataclasses.Field], variants: dict[str, str],
                     chosen: dict[str, Any], name: str, value: Any, prefix: str,
                     sections: dict[str, Registry]) -> dict[str, Any]:
    """The options of the entry ``name``, when a chooser field of ``cls`` chose it; else a ConfigError."""
    for selector, options in variants.items():
        registry: Registry = known[selector].metadata["registry"]
        if name not in registry.names():
            continue
        picked = chosen.get(selector, known[selector].default)
        if name != picked:
            inner = next(iter(value), None) if isinstance(value, typing.Mapping) else None
            key = f"{prefix}{name}" + (f".{inner}" if inner is not None else "")
            raise ConfigError(f"{key}: applies with {prefix}{selector}={name}, and this config has "
                              f"{prefix}{selector}={picked}")
        kind = registry.options(name)
        if kind is None:
            raise ConfigError(f"{prefix}{name}: {prefix}{selector}={name} takes no options")
        return {options: from_dict(kind, value if value is not None else {}, f"{prefix}{name}.")}
    entries = [n for s in variants for n in known[s].metadata["registry"].names()]
    entries += [n for registry in sections.values() for n in registry.names()]
    raise ConfigError(f"unknown config key '{prefix}{name}'; known here: {', '.join([*known, *entries])}")


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value), so ``true``, ``3`` and ``[1, 2]`` get their types."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key=value")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated as a whole."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            check_duplicates(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
            loaded = yaml.safe_load(text)
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                              "name a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping at the top level")
        tree = loaded or {}
    return resolve(tree, overrides)


def check_duplicates(node: yaml.Node | None, path: str, prefix: str = "") -> None:
    """A key given twice in one mapping of a YAML file is an error naming it and both lines: YAML would keep
    the second value without a word."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, value in node.value:
        name = f"{prefix}{key.value}"
        line = key.start_mark.line + 1
        if name in seen:
            raise ConfigError(f"{name}: given twice in {path}, on lines {seen[name]} and {line}; keep one")
        seen[name] = line
        check_duplicates(value, path, f"{name}.")


def resolve(tree: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """A nested mapping (a YAML file, a checkpoint's config) plus dotted overrides, validated."""
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    import_extensions(tree.get("imports"))
    return from_dict(Config, tree)


class ImportFailed(ConfigError):
    """A module that ``imports`` names could not be imported (or failed while importing)."""

    def __init__(self, module: str, e: Exception) -> None:
        super().__init__(f"imports: cannot import {module!r} ({type(e).__name__}: {e})")
        self.module, self.missing = module, isinstance(e, ModuleNotFoundError)


def import_extensions(modules: Any) -> None:
    """Import the modules ``imports`` names, so that what they register is there when the rest is checked
    (a value that is not a list of names is left for the check to report)."""
    if not isinstance(modules, list | tuple):
        return
    for registry in REGISTRIES:  # the built-in entries first: a module that takes one of their names says so here
        registry.names()
    for name in modules:
        if not isinstance(name, str):
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # a user's module: anything it raises is their error, shown in one line
            raise ImportFailed(name, e) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (tuples become lists): safe for YAML, JSON and ``weights_only``.

    A chosen entry's options appear under its name (``model: {arch: dcgan, dcgan: {...}}``).
    """

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out = {}
            for f in dataclasses.fields(v):
                value = getattr(v, f.name)
                if f.metadata.get("options_of"):
                    if value is not None:
                        out[getattr(v, f.metadata["options_of"])] = plain(value)
                elif f.metadata.get("sections_of"):
                    out |= {name: plain(section) for name, section in value.items()}
                else:
                    out[f.name] = plain(value)
            return out
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "", when: str = "") -> list[str]:
    """One line per leaf key: name, type, default and meaning (for ``--help``); every registered
    entry's options, with the choice they apply to."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get("sections_of"):
            registry = f.metadata["sections_of"]
            for name in registry.names():
                doc = (registry[name].__doc__ or "").strip().splitlines()
                note = f" ({doc[0].rstrip('.')})" if doc else when
                lines += describe(registry.options(name), f"{prefix}{name}.", note)
            continue
        if f.metadata["options_of"]:
            selector = next(g for g in dataclasses.fields(cls) if g.name == f.metadata["options_of"])
            registry: Registry = selector.metadata["registry"]
            for name in registry.names():
                if registry.options(name) is not None:
                    lines += describe(registry.options(name), f"{prefix}{name}.", f" (with {registry.key}={name})")
            continue
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.", when)
            continue
        default = f.default
        registry = f.metadata["registry"]
        kind = " | ".join(map(repr, registry.names())) if registry else _type_name(tp)
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {prefix}{f.name} ({kind}) = {shown}\n      {f.metadata['help']}{when}")
    return lines
