"""One typed dataclass per command; click options and JSON/YAML config files map onto it.

Each field of a command's config dataclass becomes a ``--field-name`` option (help text from
``field(metadata={"help": ...})``). ``--config FILE`` (JSON or YAML) supplies the same fields;
options given on the command line win over the file. The Python API takes the dataclass itself,
so the CLI, a config file and a notebook call are the same thing.

Example::

    @dataclass
    class EncodeConfig:
        batch_size: int = field(default=64, metadata={"help": "texts per batch"})

    @click.command()
    @dataclass_options(EncodeConfig)
    def encode(cfg: EncodeConfig) -> None: ...
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin

import click

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a field annotation."""
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(tp)]), False
    if origin in (list, tuple):
        inner = get_args(tp)[0]
        return _click_type(inner)[0], True
    if tp is Path:
        return click.Path(path_type=Path), False
    if tp in (int, float, str, bool):
        return tp, False
    raise TypeError(f"unsupported config field type {tp!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping of config fields."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values", param_hint="--config")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from plain values, coercing paths and tuples, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise click.BadParameter(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}", param_hint="--config")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp, _ = _unwrap_optional(hints[name])
        if value is not None and tp is Path:
            value = Path(value)
        elif value is not None and get_origin(tp) in (list, tuple):
            value = get_origin(tp)(value)
        kwargs[name] = value
    return cls(**kwargs)  # type: ignore[call-arg]


def dataclass_options(cls: type[T]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command so it receives one ``cfg: cls`` argument."""
    hints = typing.get_type_hints(cls)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, config_file: Path | None = None, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            values = load_config_file(config_file) if config_file else {}
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                v = kwargs.pop(f.name)
                src = ctx.get_parameter_source(f.name)
                given = src is not None and src.name != "DEFAULT"
                if given or f.name not in values:
                    values[f.name] = v
            return fn(*args, cfg=build_config(cls, values), **kwargs)

        opts = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            ctype, multiple = _click_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if ctype is bool:
                decl = f"{flag}/--no-{f.name.replace('_', '-')}"
                opts.append(click.option(decl, f.name, default=default, show_default=True, help=help_text))
            else:
                if multiple:
                    default = tuple(default or ())
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                opts.append(
                    click.option(
                        flag, f.name, type=ctype, multiple=multiple, default=default,
                        show_default=not required and default is not None, required=False, help=help_text,
                    )
                )
        opts.append(
            click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         default=None, help="JSON or YAML file with the same options; the command line wins.")
        )
        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return decorator
