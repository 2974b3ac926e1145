"""Config dataclasses that are also the command line: fields declared once with `option(...)`.

A field's default, help text, flag, choices, range and whether a resumed run may change it live in
its `option(...)`. From the dataclass this module makes the argparse options (`add_options`), builds
a config from defaults < a --config file < the command line (`build`), reads a saved config back
(`from_dict`), and validates every range and choice on construction (`check_fields`), so a bad
value fails before any model or text is loaded. Nested dataclass fields are sections of the tree;
their options are flat on the command line (`--k`, not `--dictionary.k`), so each name is unique.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from activations.errors import UserError


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    positional: bool = False,
    required: bool = False,
    metavar: str | None = None,
    resume: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with its command-line spelling and checks.

    flag: the option name (default --field-name; a bool defaulting to True becomes --no-field-name).
    low/high: inclusive bounds; above: an exclusive lower bound. resume: a resumed run may change it.
    cli: False for fields the program fills in (not a command-line option).
    """
    meta = dict(
        help=help,
        flag=flag,
        choices=choices,
        low=low,
        high=high,
        above=above,
        positional=positional,
        required=required,
        metavar=metavar,
        resume=resume,
        cli=cli,
    )
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def hints(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a dataclass (annotations are strings under __future__)."""
    return typing.get_type_hints(cls)


def _plain(tp: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a field."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if f.metadata.get("positional"):
        return f.name
    return "--" + f.name.replace("_", "-")


def leaf_fields(cls: type) -> list[tuple[str, dataclasses.Field, Any]]:
    """Every command-line field of a config tree as (section path, field, type), depth first."""
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        if is_section(types_[f.name]):
            out += [(f"{f.name}.{path}" if path else f.name, g, t) for path, g, t in leaf_fields(types_[f.name])]
        elif f.metadata.get("cli", True):
            out.append(("", f, types_[f.name]))
    return out


class _Extend(argparse.Action):
    """A list option: comma-separated values, and repeating the flag adds more."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values if isinstance(values, list) else [values]:
            items += [v.strip() for v in str(value).split(",") if v.strip()]
        if items or not isinstance(values, list):  # a positional list given nothing stays unset (build names it)
            setattr(namespace, self.dest, items)


def add_options(parser: argparse.ArgumentParser, cls: type, group: Any = None, seen: set | None = None) -> None:
    """argparse options for every field of the config tree `cls`; a section becomes an argument group.

    Defaults are not given to argparse (SUPPRESS), so the parsed namespace holds only what the user typed.
    """
    types_ = hints(cls)
    seen = set() if seen is None else seen
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if is_section(tp):
            title = f.metadata.get("help") or f.name
            add_options(parser, tp, parser.add_argument_group(title), seen)
            continue
        if not f.metadata.get("cli", True):
            continue
        if f.name in seen:
            raise ValueError(f"option {f.name} is declared twice in {cls.__name__}'s tree")
        seen.add(f.name)
        target = group or parser
        base, optional = _plain(tp)
        default = _default(f)
        help_text = f.metadata.get("help", "")
        if default not in (None, dataclasses.MISSING, False, True, []) and "default" not in help_text:
            help_text += f" (default {default})"
        kwargs: dict[str, Any] = dict(help=help_text, default=argparse.SUPPRESS)
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("positional"):
            # a missing one is named by build(), like any required field; a list takes every word (RUN RUN ...)
            kwargs["nargs"] = "*" if typing.get_origin(base) is list else "?"
        else:
            kwargs["dest"] = f.name
        if base is bool:
            if default is True:
                flag = f.metadata.get("flag") or "--no-" + f.name.replace("_", "-")
                target.add_argument(flag, action="store_false", **kwargs)
            else:
                target.add_argument(flag_of(f), action="store_true", **kwargs)
            continue
        if typing.get_origin(base) is list:
            kwargs.update(action=_Extend)
        else:
            kwargs["type"] = _parse_as(base)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("positional"):
            target.add_argument(f.name, **{k: v for k, v in kwargs.items() if k != "dest"})
        else:
            target.add_argument(flag_of(f), **kwargs)


def _parse_as(tp: Any):
    """The argparse `type` for a field type; ints accept 250_000 and 1e6-style whole numbers."""
    if tp is int:

        def parse_int(text: str) -> int:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                value = float(text)
                if not value.is_integer():
                    raise
                return int(value)

        parse_int.__name__ = "int"
        return parse_int
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON file of option: value pairs (flat, or nested by section)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path given to --config.")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional dependency, only for YAML config files

            values = yaml.safe_load(path.read_text()) or {}
        else:
            values = json.loads(path.read_text())
    except Exception as e:
        detail = " ".join(str(e).split())  # YAML's messages span lines
        raise UserError(
            f"config file {path} could not be parsed ({type(e).__name__}: {detail}); fix its syntax."
        ) from e
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, not {type(values).__name__}.")
    return values


def flatten(cls: type, values: dict, where: str) -> dict[str, Any]:
    """{field name: value} from a flat or section-nested mapping; unknown keys are a UserError."""
    leaves = {f.name for _, f, _ in leaf_fields(cls)}
    sections = {part for path, _, _ in leaf_fields(cls) for part in path.split(".") if part}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in sections and isinstance(value, dict):
            flat.update(flatten(cls, value, where))
        elif name in leaves:
            flat[name] = value
        else:
            raise UserError(f"{where} has unknown option {key!r}; see the command's --help for valid ones.")
    return flat


def build(cls: type, values: dict[str, Any]) -> Any:
    """The config tree `cls` with `values` ({field name: value}, flat) over the defaults, validated."""
    types_ = hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if is_section(tp):
            kwargs[f.name] = build(tp, values)
        elif f.name in values and f.metadata.get("cli", True):
            kwargs[f.name] = coerce(f, tp, values[f.name])
        elif _default(f) is dataclasses.MISSING and f.init:
            what = f.name.upper() if f.metadata.get("positional") else flag_of(f)
            raise UserError(f"{what} is required ({f.metadata.get('help', '')}); give it on the command line.")
    return cls(**kwargs)


def coerce(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """A value from a file or the command line as the field's type, or a UserError naming the field."""
    base, optional = _plain(tp)
    name = flag_of(f)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} cannot be empty (null); give a value or leave it out for the default.")
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"{name} must be a list (or comma-separated), got {value!r}.")
        return [coerce_scalar(name, item, v.strip() if isinstance(v, str) else v) for v in items if v != ""]
    if typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list of numbers, got {value!r}.")
        return tuple(coerce_scalar(name, float, v) for v in value)
    return coerce_scalar(name, base, value)


def coerce_scalar(name: str, tp: Any, value: Any) -> Any:
    """One scalar as int/float/str/bool, or a UserError with the field's name and the bad value."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return _parse_as(int)(value)
            except ValueError:
                pass
        raise UserError(f"{name} must be a whole number, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{name} must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{name} must be text, got {value!r}.")
    return value


def check_fields(cfg: Any) -> None:
    """Every field's declared choices and range (call from __post_init__): one UserError naming the
    option, the value and what it must be."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        m = f.metadata
        if value is None or isinstance(value, bool) or not m:
            continue
        name = flag_of(f)
        if m.get("choices") and value not in m["choices"]:
            raise UserError(f"{name} {value!r} is not one of {', '.join(map(str, m['choices']))}; pick one of them.")
        if not isinstance(value, (int, float)):
            continue
        default = _default(f)
        fix = f"e.g. {name} {default} (the default)" if isinstance(default, (int, float)) else "a value in range"
        if not math.isfinite(value):
            raise UserError(f"{name} {value!r} is not a finite number; pass {fix}.")
        if m.get("low") is not None and value < m["low"]:
            raise UserError(f"{name} {value!r} is too small: {m['help']} must be at least {m['low']:g}; pass {fix}.")
        if m.get("high") is not None and value > m["high"]:
            raise UserError(f"{name} {value!r} is too large: {m['help']} must be at most {m['high']:g}; pass {fix}.")
        if m.get("above") is not None and not value > m["above"]:
            raise UserError(f"{name} {value!r} is out of range: {m['help']} must be above {m['above']:g}; pass {fix}.")


def to_dict(cfg: Any) -> dict:
    """The config tree as nested plain data (JSON-able), every field included."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, where: str) -> Any:
    """A config tree from its to_dict form (a saved run's config): each section's command-line fields are
    read from that section (fields the program fills in are left to it), and every value is checked."""
    return build(cls, _section_values(cls, data, where))


def _section_values(cls: type, data: dict, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}; "
            "restore the file or start a new run."
        )
    types_ = hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if is_section(types_[f.name]):
            values.update(_section_values(types_[f.name], data.get(f.name, {}), where))
        elif f.metadata.get("cli", True) and f.name in data:
            values[f.name] = data[f.name]
    return values


def resumable_fields(cls: type) -> set[str]:
    """The names of the fields a resumed run may change (declared with resume=True)."""
    return {f.name for _, f, _ in leaf_fields(cls) if f.metadata.get("resume")}


def explicit_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """What the user typed: the namespace without argparse's bookkeeping."""
    return {k: v for k, v in vars(namespace).items() if k not in ("command", "config")}
