"""The one strict config loader: a YAML / JSON mapping -> nested frozen dataclasses.

    cfg = load(TrainConfig, read_mapping(path, "training config"), where=str(path))

Every config file ldm-deploy reads (training, export, TensorRT build, bench spec) goes through
`load`: an unknown key is refused with its full key path and the keys allowed there, each value is
checked against its field's annotation (int, float, bool, str, `X | None`, `tuple[T, ...]`, dict,
a nested dataclass), and a field may carry bounds (`field(metadata=bounds(1, limits.MAX_BATCH))`).
Every failure is one line naming the key. Semantic checks that involve several keys stay in the
dataclass's `__post_init__`.

A dataclass may take a value of another shape by defining `from_config(value, where)` (export's
`Range` takes `64` or `{min, opt, max}`); `where` is the key's place for messages, `error` the class
to raise. Torch-free: numpy-free, stdlib + PyYAML.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from ldm_deploy.errors import LdmError

_NONE = type(None)


def bounds(lo: float | None = None, hi: float | None = None) -> dict:
    """Field metadata: the value (each element, for a tuple) must lie in lo..hi (either end open when None)."""
    return {"bounds": (lo, hi)}


def read_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML (or JSON: YAML reads it too) file holding a mapping; an empty file is {}. LdmError otherwise."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LdmError(f"cannot read {what} {path}: {first}", hint="fix the file's YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LdmError(f"{what} {path} must hold a mapping of keys to values, got a {type(data).__name__}")
    return data


def load(cls, data: Any, where: str = "", *, kind: str = "", error: type[LdmError] = LdmError):
    """Build dataclass `cls` from `data` (a mapping), recursively, refusing what its fields do not allow.

    `where` prefixes messages (a file path, "manifest export_config"); `kind` names the config in the
    unknown-key message ("unknown build config keys: ..."); `error` is the exception raised (LdmError for
    a file, UsageError where the mapping came from the command line or the caller)."""
    return _load(cls, data, "", _Ctx(where, kind, error))


@dataclasses.dataclass(frozen=True)
class _Ctx:
    where: str
    kind: str
    error: type[LdmError]

    def fail(self, message: str, hint: str | None = None):
        raise self.error(f"{self.where}: {message}" if self.where else message, hint=hint)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _load(cls, data: Any, path: str, ctx: _Ctx):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        ctx.fail(f"{path or 'the config'} must be a mapping of keys to values, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        kind = f"{ctx.kind} " if ctx.kind else ""
        ctx.fail(f"unknown {kind}keys {', '.join(_join(path, k) for k in sorted(unknown))}",
                 hint=f"allowed{' in ' + path if path else ''}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _value(value, hints[name], fields[name], _join(path, name), ctx) for name, value in data.items()}
    return cls(**kwargs)


def _value(value: Any, annotation, f: dataclasses.Field | None, path: str, ctx: _Ctx):
    """`value` checked (and converted: list -> tuple, YAML's "3e-4" -> float) against `annotation`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if _NONE in args:
                return None
            ctx.fail(f"{path} must not be null")
        options = [a for a in args if a is not _NONE]
        if len(options) == 1:
            return _value(value, options[0], f, path, ctx)
        for option in options:       # the first that takes it (e.g. `int | str`)
            try:
                return _value(value, option, f, path, ctx)
            except LdmError:
                continue
        ctx.fail(f"{path} must be {' or '.join(_name(o) for o in options)}, got {_show(value)}")
    if value is None:
        ctx.fail(f"{path} must not be null")
    if dataclasses.is_dataclass(annotation):
        if hasattr(annotation, "from_config"):
            return annotation.from_config(value, _join_where(ctx.where, path), ctx.error)
        return _load(annotation, value, path, ctx)
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            ctx.fail(f"{path} must be a list, got {_show(value)}")
        if args and args[-1] is not Ellipsis:        # tuple[float, float]: a fixed length
            if len(value) != len(args):
                ctx.fail(f"{path} must be a list of {len(args)} values, got {_show(value)}")
            return tuple(_value(v, a, f, f"{path}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
        return tuple(_value(v, args[0], f, f"{path}[{i}]", ctx) if args else v for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            ctx.fail(f"{path} must be a mapping, got {_show(value)}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            ctx.fail(f"{path} must be true or false, got {_show(value)}")
        return value
    if annotation is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            ctx.fail(f"{path} must be an integer, got {_show(value)}")
        return _bounded(int(value), f, path, ctx)
    if annotation is float:
        number = value
        if isinstance(value, str):   # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if not isinstance(number, numbers.Real) or isinstance(number, bool) or math.isnan(number):
            ctx.fail(f"{path} must be a number, got {_show(value)}")
        return _bounded(float(number), f, path, ctx)
    if annotation is str:
        if not isinstance(value, str):
            ctx.fail(f"{path} must be a string, got {_show(value)}")
        return value
    return value     # Any / an annotation the loader does not check


def _bounded(value, f: dataclasses.Field | None, path: str, ctx: _Ctx):
    lo, hi = (f.metadata.get("bounds") if f is not None else None) or (None, None)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        ctx.fail(f"{path} = {value} is outside {span}")
    return value


def _join_where(where: str, path: str) -> str:
    return f"{where}: {path}" if where else path


def _name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_plain(obj: Any) -> Any:
    """A dataclass / nested dict of tuples -> plain dicts and lists (what YAML / JSON write)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


__all__ = ["load", "read_mapping", "bounds", "to_plain"]
