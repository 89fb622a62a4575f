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

A field may give more spellings of its option (``metadata={"aliases": ("--num-threads",)}``).
Numeric fields may bound their values with ``metadata={"min": ..., "max": ...}`` (inclusive; a
``"min_open"`` bound is exclusive). A value from a config file is checked against the same type,
choices and bounds as the command-line option, and a bad one is a :class:`UserError` naming the
file and the option. A field with ``metadata={"cli_only": True}`` (``trust_remote_code``: it lets a
model directory's Python code run) is only ever switched on by the command line: a config file that
sets it is refused.

A field whose type is itself a config dataclass is a *nested* config (litgpt style): its fields
become options of the command under their own flat names (``FinetuneConfig.backbone.split_layer``
is ``--split-layer``), so options shared by several commands are declared once. A config file may
give them in a section named after the field (``backbone: {split_layer: 2}``) or at its top level
(``split_layer: 2``), and the same checks apply either way (``cli_only`` included).
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

from llm_features.errors import UserError, shown_as_click_error

T = TypeVar("T")

# The options every stage shares, declared once: each command's config uses these fields.
DATA_DIR_HELP = "Workspace data directory (default: $LLMFEAT_DATA_DIR, else the repo's data/, feast_repo/data)."
DEVICE_HELP = "Where the model runs: cpu, cuda, cuda:N, or auto (cuda when available)."
THREADS_HELP = ("CPU threads for torch (default: the cores this process may use that other processes are not "
                "keeping busy, at least 1; logged).")


def data_dir_field() -> Any:
    """The ``--data-dir`` option (None: :func:`llm_features.workspace.resolve_data_dir` decides)."""
    return dataclasses.field(default=None, metadata={"help": DATA_DIR_HELP})


def device_field(default: str = "auto") -> Any:
    """The ``--device`` option (resolved by :func:`llm_features.devices.resolve_device`)."""
    return dataclasses.field(default=default, metadata={"help": DEVICE_HELP})


def threads_field(default: int | None = None, help: str = THREADS_HELP, aliases: tuple[str, ...] = ()) -> Any:
    """A torch intra-op thread count option (None: :mod:`llm_features.threads` picks and logs it);
    ``aliases``: more spellings of the option (the ranker's ``--threads`` also answers to ``--num-threads``,
    the other stages' spelling)."""
    return dataclasses.field(default=default, metadata={"help": help, "min": 1, "aliases": aliases})


@dataclasses.dataclass
class RuntimeArgs:
    """Where and how a model stage runs (``--device``, ``--num-threads``), declared once and nested in
    each stage's config (``cfg.runtime``)."""

    device: str = device_field()
    num_threads: int | None = threads_field()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _click_type(tp: Any, meta: Any = None) -> tuple[Any, bool]:
    """(click type, multiple) for a field annotation (and its bounds, from the field metadata)."""
    tp, _ = _unwrap_optional(tp)
    meta = meta or {}
    origin = get_origin(tp)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(tp)]), False
    if origin in (list, tuple):
        inner = get_args(tp)[0]
        return _click_type(inner, meta)[0], True
    if tp is Path:
        return click.Path(path_type=Path), False
    if tp in (int, float) and any(k in meta for k in ("min", "max", "min_open")):
        lo = meta.get("min", meta.get("min_open"))
        rng = click.IntRange if tp is int else click.FloatRange
        return rng(min=lo, max=meta.get("max"), min_open="min_open" in meta), False
    if tp in (int, float, str, bool):
        return tp, False
    raise TypeError(f"unsupported config field type {tp!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _nested_type(tp: Any) -> type | None:
    """The config dataclass a field annotation names (a nested config), else None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def leaf_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, annotation) of every option of ``cls``, a nested config's fields in its place; their
    names are the options' names, so they must not clash."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = _nested_type(hints[f.name])
        out.extend(leaf_fields(sub) if sub else [(f, hints[f.name])])
    names = [f.name for f, _ in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TypeError(f"{cls.__name__}: options {clash} are declared twice (nested configs share one "
                        "namespace)")
    return out


def flatten_values(cls: type, values: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """``values`` with each nested config's section (``backbone: {...}``) lifted to the top level, the
    form the command line has; a key given both in its section and at the top level is refused."""
    hints = typing.get_type_hints(cls)
    flat = dict(values)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = _nested_type(hints[f.name])
        if sub is None or f.name not in flat:
            continue
        section = flat.pop(f.name)
        if isinstance(section, sub):
            section = {g.name: getattr(section, g.name) for g in dataclasses.fields(sub)}
        if not isinstance(section, dict):
            raise UserError(f"section {f.name!r} must be a mapping of option names to values, got "
                            f"{section!r}", file=where, option=None if where else "--config")
        inner = flatten_values(sub, {str(k).replace("-", "_"): v for k, v in section.items()}, where)
        known = {g.name for g, _ in leaf_fields(sub)}
        unknown = sorted(set(inner) - known)
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)} in section {f.name!r} ({sub.__name__})",
                            file=where, option=None if where else "--config")
        both = sorted(set(inner) & set(flat))
        if both:
            raise UserError(f"{', '.join(both)} given both in section {f.name!r} and at the top level",
                            file=where, option=None if where else "--config", fix="Keep one of them.")
        flat.update(inner)
    return flat


def config_dict(cfg: Any, nested: bool = True) -> dict[str, Any]:
    """The JSON-ready values of a config dataclass instance (paths as strings, tuples as lists):
    nested configs as sections, or with ``nested=False`` one key per command-line option."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            sub = config_dict(v, nested)
            if nested:
                out[f.name] = sub
            else:
                out.update(sub)
        else:
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def check_value(name: str, tp: Any, meta: Any, value: Any, where: str | None = None) -> Any:
    """``value`` of field ``name`` checked (and coerced) like its command-line option would be."""
    tp, optional = _unwrap_optional(tp)
    meta = meta or {}
    if value is None:
        if optional:
            return None
        raise UserError("must not be null", file=where, option=_flag(name))
    origin = get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        inner = get_args(tp)[0]
        return origin(check_value(name, inner, meta, v, where) for v in value)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}",
                            file=where, option=_flag(name))
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(f"expected a path, got {value!r}", file=where, option=_flag(name))
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"expected true or false, got {value!r}", file=where, option=_flag(name))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"expected an integer, got {value!r}", file=where, option=_flag(name))
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"expected a number, got {value!r}", file=where, option=_flag(name))
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"expected a finite number, got {value!r}", file=where, option=_flag(name))
    elif tp is str:
        if not isinstance(value, str):
            raise UserError(f"expected a string, got {value!r}", file=where, option=_flag(name))
        return value
    if tp in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        if "min_open" in meta and not value > meta["min_open"]:
            raise UserError(f"{value!r} must be greater than {meta['min_open']}", file=where, option=_flag(name))
        if lo is not None and value < lo:
            raise UserError(f"{value!r} must be at least {lo}", file=where, option=_flag(name))
        if hi is not None and value > hi:
            raise UserError(f"{value!r} must be at most {hi}", file=where, option=_flag(name))
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping of config fields."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"not valid JSON ({e})", file=path, option="--config") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, without importing yaml up front
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"not valid YAML ({first})", file=path, option="--config") from None
    if not isinstance(data, dict):
        raise UserError("expected a mapping of option names to values", file=path, option="--config")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[T], values: dict[str, Any], where: str | None = None,
                 checked: frozenset[str] = frozenset()) -> T:
    """Instantiate ``cls`` from plain values, checking each against its option's type, choices and
    bounds and rejecting unknown keys; ``where`` (a config file) is named in errors. Fields in
    ``checked`` came from the command line, which click has already checked. A nested config's
    values may be in its section or at the top level (:func:`flatten_values`)."""
    values = flatten_values(cls, values, where)
    leaves = {f.name: (f, tp) for f, tp in leaf_fields(cls)}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}", file=where,
                        option=None if where else "--config")
    checked_values = {name: _checked_value(name, leaves[name][1], leaves[name][0].metadata, value, where,
                                           name in checked) for name, value in values.items()}
    return _assemble(cls, checked_values)


def config_from_options(cls: type[T], **values: Any) -> T:
    """``cls`` from values keyed by option name, a nested config's at the top level or in its section
    (``TrainConfig`` from ``epochs=1, llm_mode="dense"``): keyword arguments, so not checked like a
    file's values; unknown names are refused."""
    values = flatten_values(cls, values)
    unknown = sorted(set(values) - {f.name for f, _ in leaf_fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no option(s) {', '.join(unknown)}")
    return _assemble(cls, values)


def _assemble(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from checked values keyed by option name (each nested config from its fields' values)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = _nested_type(hints[f.name])
        if sub is not None:
            mine = {g.name for g, _ in leaf_fields(sub)}
            kwargs[f.name] = _assemble(sub, {k: v for k, v in values.items() if k in mine})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)  # type: ignore[call-arg]


def _checked_value(name: str, tp: Any, meta: Any, value: Any, where: str | None, from_cli: bool) -> Any:
    if from_cli:
        tp, _ = _unwrap_optional(tp)
        if value is not None and tp is Path:
            return Path(value)
        if value is not None and get_origin(tp) in (list, tuple):
            return get_origin(tp)(value)
        return value
    value = check_value(name, tp, meta, value, where)
    if value and meta.get("cli_only"):
        raise UserError("is taken from the command line only, never from a file", file=where,
                        option=_flag(name), fix=f"Pass {_flag(name)} on the command line if you mean it.")
    return value


def validate_config(cfg: Any, where: str | None = None) -> None:
    """Check every field of a config dataclass instance (built by the Python API, say) like its
    command-line option; raises :class:`UserError` naming the first bad option."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if _nested_type(hints[f.name]) is not None:
            validate_config(getattr(cfg, f.name), where)
            continue
        if _required(f) and getattr(cfg, f.name) is None:
            continue  # a required option the command itself reports
        check_value(f.name, hints[f.name], f.metadata, getattr(cfg, f.name), where)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _option(f: dataclasses.Field, tp: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of field ``f`` (annotation ``tp``)."""
    ctype, multiple = _click_type(tp, f.metadata)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    )
    flag = _flag(f.name)
    help_text = f.metadata.get("help", "")
    if ctype is bool:
        decl = f"{flag}/--no-{f.name.replace('_', '-')}"
        return click.option(decl, f.name, default=default, show_default=True, help=help_text)
    if multiple:
        default = tuple(default or ())
    return click.option(
        flag, *f.metadata.get("aliases", ()), f.name, type=ctype, multiple=multiple, default=default,
        show_default=not _required(f) and default is not None, required=False, help=help_text,
    )


def dataclass_options(cls: type[T]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command so it receives one ``cfg: cls`` argument (a nested config's fields
    are options too, under their own names)."""
    leaves = leaf_fields(cls)
    # no default: required, from the command line or the --config file (so not click's required=True)
    required_fields = [f.name for f, _ in leaves if _required(f)]

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, config_file: Path | None = None, **kwargs: Any) -> Any:
            with shown_as_click_error():  # the command line's boundary: the library raises plain UserErrors
                return run(*args, config_file=config_file, **kwargs)

        def run(*args: Any, config_file: Path | None, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            where = str(config_file) if config_file else None
            values = flatten_values(cls, load_config_file(config_file), where) if config_file else {}
            from_cli = set()
            for f, _ in leaves:
                v = kwargs.pop(f.name)
                src = ctx.get_parameter_source(f.name)
                given = src is not None and src.name != "DEFAULT"
                if given or f.name not in values:
                    values[f.name] = v
                    from_cli.add(f.name)
            for name in required_fields:
                if values.get(name) is None:
                    raise UserError("is required", option=_flag(name),
                                    fix=f"Give {_flag(name)} on the command line or `{name}:` in a --config file.")
            return fn(*args, cfg=build_config(cls, values, where, frozenset(from_cli)), **kwargs)

        opts = [_option(f, tp) for f, tp in leaves]
        opts.append(
            click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         default=None, help="JSON or YAML file with the same options; the command line wins.")
        )
        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return decorator
