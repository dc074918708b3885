"""Options dataclasses → command-line flags, in one generic layer: one place for each default.

Every stage has one options dataclass whose fields carry their help text (`option(..., help=...)`). The CLI is
generated from them: `add_options(parser, SfMOptions)` gives a stage command `--mapper`, `--camera-mode`, …;
`add_options(parser, RunConfig)` gives `recon run` every field of every stage as a dotted flag
(`--sfm.mapper global`, `--pairs.num-matched 30`) plus the short names users' scripts already use (`--mapper`),
declared once on the field (`flags=`). `build_options(RunConfig, args)` reads the parsed values back into the
dataclasses, so nothing is restated by hand.

Why our own ~150 lines rather than tyro or simple-parsing: recon keeps old flag names as aliases that differ per
command (`--conf` is the feature conf on `recon run` and `recon extract` but the matcher conf on `recon match`),
takes backend confs as repeatable `KEY=VALUE` JSON items, and must exit 2 with one line on a bad value; both
libraries can be bent to that, with more code than this module.

Field types understood: bool (`--x/--no-x`), int, float, str, Path, Literal[...] (choices), `X | None`, dict
(`KEY=VALUE`, repeatable, dotted keys, JSON values), tuple/list of str (comma-separated), and nested option
dataclasses (a dotted prefix).
"""

from __future__ import annotations

import argparse as _argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feature_backends.errors import ConfigError


def option(default: Any = dataclasses.MISSING, *, help: str, flags: Sequence[str] = (),
           run_flags: Sequence[str] | None = None, default_factory: Any = dataclasses.MISSING,
           cli: bool = True, metavar: str | None = None, argparse: dict | None = None) -> Any:
    """A dataclass field with its help text and extra flag names.

    `flags`: names on the stage's own command (default `--field-name`, always kept). `run_flags`: extra names on
    `recon run` (default: the same as `flags`). `cli=False` keeps a field out of the command line. `argparse`:
    raw argparse keywords that replace the generated ones (e.g. `{"nargs": "?", "const": True}`).
    """
    metadata = {"help": help, "flags": tuple(flags), "run_flags": None if run_flags is None else tuple(run_flags),
                "cli": cli, "metavar": metavar, "argparse": argparse}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_overrides(items: Sequence[str] | None, flag: str = "--conf") -> dict[str, Any]:
    """["a=1", "b.c=x"] → {"a": 1, "b": {"c": "x"}}: values parsed as JSON when they are JSON, never evaluated."""
    conf: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = conf
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return conf


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _is_options(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _argument(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a field type."""
    annotation, _ = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": _argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if annotation is dict or origin is dict:
        return {"action": "append", "metavar": "KEY=VALUE"}
    if origin in (tuple, list) or annotation in (tuple, list):
        return {"type": _comma_list, "metavar": "A,B,…"}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": {int: "N", float: "X", str: "VALUE"}[annotation]}
    if annotation is Path:
        return {"type": Path}
    raise TypeError(f"no command-line form for {annotation!r}")


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_options(parser: _argparse.ArgumentParser, cls: type, prefix: str = "", run: bool = False,
                group: Any = None) -> None:
    """Add a flag for every field of `cls` (recursing into nested option dataclasses under `prefix.`)."""
    target = group or parser.add_argument_group(prefix.rstrip(".") or cls.__name__)
    for field, annotation in _fields(cls):
        if _is_options(annotation):
            add_options(parser, annotation, f"{prefix}{field.name}.", run=run)
            continue
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        name = f"--{prefix}{field.name.replace('_', '-')}"
        extra = meta.get("flags", ())
        if run and meta.get("run_flags") is not None:
            extra = meta["run_flags"]
        names = [name] + [flag for flag in extra if flag != name]
        default = _default(field)
        if meta.get("argparse"):
            keywords = {}
        elif meta.get("parse"):
            keywords = {"type": meta["parse"]}
        else:
            keywords = _argument(annotation, default)
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        help_text = meta.get("help", "")
        help_text = help_text() if callable(help_text) else help_text
        if default is not None and not isinstance(default, dict) and \
                keywords.get("action") != _argparse.BooleanOptionalAction:
            help_text += f" (default: {shown})"
        if meta.get("metavar"):
            keywords["metavar"] = meta["metavar"]
        keywords.update(meta.get("argparse") or {})
        target.add_argument(*names, dest=_dest(prefix, field.name), default=_argparse.SUPPRESS, help=help_text,
                            **keywords)


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace(".", "__")


def build_options(cls: type, args: _argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """The dataclass `cls` with every flag that was given; fields not given keep their declared defaults."""
    values: dict[str, Any] = dict(fixed)
    for field, annotation in _fields(cls):
        if field.name in values:
            continue
        if _is_options(annotation):
            values[field.name] = build_options(annotation, args, f"{prefix}{field.name}.")
            continue
        dest = _dest(prefix, field.name)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        bare, _ = _strip_optional(annotation)
        if (bare is dict or typing.get_origin(bare) is dict) and isinstance(value, list):
            value = parse_overrides(value, f"--{prefix}{field.name.replace('_', '-')}")
        values[field.name] = value
    return cls(**values)


def to_dict(options: Any) -> dict[str, Any]:
    """A JSON-ready record of an options dataclass (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(options), default=str))

