"""Loading and validating configs: NVIDIA device plugin `version: v1` files, env and flags.

`load_config(text)` is pure: it parses YAML (or JSON) text into a frozen `Config`, or raises one
`ConfigError` whose message lists the problems as `<source>: <field path>: <what is wrong>`.
Parsing is bounded (sharing.yaml_text): size, depth, value length and alias expansion are
limited before any value is built, and duplicate keys are errors. Messages are bounded too:
values are shortened with a marker and at most MAX_MESSAGE_CHARS are kept, the rest counted.
`apply_overrides` layers environment variables and command-line flags on top (flag > env >
file > default, facts §2) and validates the result the same way.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sharing.config_models import (
    Config,
    FieldIssue,
    Flags,
    Health,
    Mps,
    MpsReplicatedResource,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
)
from sharing.errors import ConfigError
from sharing.text import short_repr, shorten
from sharing.yaml_text import YamlLimitError, parse_yaml, yaml_problem

__all__ = [
    "Config",
    "ConfigError",
    "Flags",
    "Health",
    "Mps",
    "MpsReplicatedResource",
    "Override",
    "OVERRIDES",
    "ReplicatedResource",
    "Sharing",
    "TimeSlicing",
    "apply_overrides",
    "default_config",
    "load_config",
]

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Override:
    """A config field that a command-line flag and an environment variable can set."""

    flag: str  # long option without dashes, e.g. "mig-strategy"
    env: str
    path: tuple[str, ...]  # aliases from the top, e.g. ("flags", "migStrategy")
    kind: str = "str"  # "str", "bool" or "list" (comma-separated in the environment)


OVERRIDES: tuple[Override, ...] = (
    Override("mig-strategy", "MIG_STRATEGY", ("flags", "migStrategy")),
    Override("fail-on-init-error", "FAIL_ON_INIT_ERROR", ("flags", "failOnInitError"), "bool"),
    Override("mps-root", "MPS_ROOT", ("flags", "mpsRoot")),
    Override("nvidia-driver-root", "NVIDIA_DRIVER_ROOT", ("flags", "nvidiaDriverRoot")),
    Override("nvidia-dev-root", "NVIDIA_DEV_ROOT", ("flags", "nvidiaDevRoot")),
    Override(
        "pass-device-specs", "PASS_DEVICE_SPECS", ("flags", "plugin", "passDeviceSpecs"), "bool"
    ),
    Override(
        "device-list-strategy",
        "DEVICE_LIST_STRATEGY",
        ("flags", "plugin", "deviceListStrategy"),
        "list",
    ),
    Override("device-id-strategy", "DEVICE_ID_STRATEGY", ("flags", "plugin", "deviceIDStrategy")),
    Override(
        "cdi-annotation-prefix", "CDI_ANNOTATION_PREFIX", ("flags", "plugin", "cdiAnnotationPrefix")
    ),
    Override("cdi-kind", "CDI_KIND", ("flags", "plugin", "cdiKind")),
    Override("nvidia-ctk-path", "NVIDIA_CTK_PATH", ("flags", "plugin", "nvidiaCTKPath")),
    Override(
        "container-driver-root", "CONTAINER_DRIVER_ROOT", ("flags", "plugin", "containerDriverRoot")
    ),
    Override(
        "shared-devices-allocation-policy",
        "SHARED_DEVICES_ALLOCATION_POLICY",
        ("flags", "plugin", "sharedDevicesAllocationPolicy"),
    ),
    Override("labels-file", "GFD_OUTPUT_FILE", ("flags", "gfd", "outputFile")),
)

MAX_MESSAGE_CHARS = 480  # a ConfigError's message; problems past it are counted, not shown
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_config(text: str, *, source: str = "<config>") -> Config:
    """Parse and validate config text (YAML or JSON).

    Raises:
        ConfigError: the text is not YAML, not a mapping, or fails validation; the message names
            `source`, each field path, the value and what is allowed.
    """
    source = shorten(source, 160)
    try:
        data = parse_yaml(text)
    except YamlLimitError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # a scalar that cannot be converted (a date)
        raise ConfigError(f"{source}: a value cannot be read: {yaml_problem(err)}") from None
    if data is None:
        raise ConfigError(
            f'{source}: the file is empty; write at least "version: v1" (an empty file is '
            "refused, so a file caught half-written changes nothing)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: must be a mapping of keys, got {type(data).__name__} "
            f"{short_repr(data)}"
        )
    return _validate(data, lambda _loc: source)


def default_config() -> Config:
    """The config gpushare uses without a file: every default, no sharing."""
    return Config.model_validate({"version": "v1"})


def apply_overrides(config: Config, env: Mapping[str, str], flags: Mapping[str, object]) -> Config:
    """The config with environment variables and flags applied (flag > env > file > default).

    `flags` maps option names ("mig-strategy" or "mig_strategy") to values; None means unset.
    Unknown flag names are errors, unrelated environment variables are ignored.

    Raises:
        ConfigError: an unknown flag, or a value that fails validation (naming the flag or the
            environment variable it came from).
    """
    known = {o.flag for o in OVERRIDES}
    given = {name.replace("_", "-"): value for name, value in flags.items() if value is not None}
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"flag --{name}: unknown flag{hint}")
    data = config.model_dump(by_alias=True, exclude_unset=True)
    sources: dict[tuple[str, ...], str] = {}
    for override in OVERRIDES:
        if override.flag in given:
            value, label = given[override.flag], f"flag --{override.flag}"
        elif override.env in env:
            value, label = _from_env(env[override.env], override.kind), override.env
        else:
            continue
        _set_path(data, override.path, value)
        sources[override.path] = label
    if not sources:
        return config

    def source_of(loc: Loc) -> str:
        path = tuple(p for p in loc if isinstance(p, str))
        return sources.get(path, "config")

    return _validate(data, source_of)


def _from_env(raw: str, kind: str) -> object:
    """Convert an environment variable's text to the field's type where the meaning is clear."""
    if kind == "bool" and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    if kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    """Set a nested key, creating mappings on the way."""
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def _validate(data: dict[str, Any], source_of: typing.Callable[[Loc], str]) -> Config:
    """Validate a mapping into a Config, turning pydantic errors into one ConfigError."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_join_problems(err, source_of)) from None


def _join_problems(err: ValidationError, source_of: typing.Callable[[Loc], str]) -> str:
    """One line per problem, as many as fit in MAX_MESSAGE_CHARS; the rest counted."""
    problems = err.errors(include_url=False, include_context=True, include_input=True)
    lines: list[str] = []
    used = 0
    for shown, error in enumerate(problems):
        line = shorten(f"{source_of(error['loc'])}: {_describe(error)}", 300)
        left = len(problems) - shown - 1
        tail = len(f"\n(and {left} more problems)") if left else 0
        if lines and used + len(line) + 1 + tail > MAX_MESSAGE_CHARS:
            lines.append(f"(and {len(problems) - shown} more problems)")
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines)


def format_loc(loc: Sequence[str | int]) -> str:
    """A pydantic location as a field path: `sharing.mps.resources[0].replicas`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = shorten(str(part), 40)
            out += f".{text}" if out else text
    return out


def _describe(error: Mapping[str, Any]) -> str:
    """`<path>: <message>` for one pydantic error."""
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "invalid_key":
        where = format_loc(loc[:-1]) or "top level"
        return f"{where}: keys must be strings, got {short_repr(value)}"
    if kind == "extra_forbidden":
        return f"{format_loc(loc)}: unknown key; {_suggest(loc)}"
    cause = ctx.get("error")
    if isinstance(cause, FieldIssue):
        return f"{format_loc(loc)}{cause.subpath}: {cause.message}"
    return f"{format_loc(loc)}: {_message(kind, value, ctx, error['msg'])}"


def _message(kind: str, value: object, ctx: Mapping[str, Any], default: str) -> str:
    """Our wording for a pydantic error type."""
    shown = short_repr(value)
    length = len(value) if isinstance(value, str | tuple | list | dict) else 0
    simple = {
        "missing": "required, but missing",
        "bool_type": f"must be true or false, got {shown}",
        "int_type": f"must be an integer, got {shown}",
        "string_type": f"must be a string, got {shown}",
        "tuple_type": f"must be a list, got {shown}",
        "model_type": f"must be a mapping of keys, got {shown}",
        "model_attributes_type": f"must be a mapping of keys, got {shown}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}, got {shown}",
        "less_than_equal": f"must be <= {ctx.get('le')}, got {shown}",
        "too_short": "must list at least one entry",
        "too_long": f"must list at most {ctx.get('max_length')} entries, got {length:,}",
        "string_too_long": f"must be at most {ctx.get('max_length')} characters, got {length:,}",
    }
    if kind in simple:
        return simple[kind]
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {shown}"
    if kind == "value_error":
        return shorten(str(ctx.get("error", default)), 240)
    return f"{shorten(default, 120)}, got {shown}"


def _suggest(loc: Loc) -> str:
    """A hint for an unknown key: the same key elsewhere, a close key here, or the valid keys."""
    key = str(loc[-1])
    parent = _model_at(loc[:-1])
    siblings = list(_aliases(parent)) if parent else []
    if len(key) > 64:
        return f"valid keys here: {', '.join(siblings)}"
    for path in _all_paths(Config):
        if path.rsplit(".", 1)[-1].lower() == key.lower() and path != format_loc(loc):
            return f"did you mean {path}?"
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    prefix = format_loc(loc[:-1])
    if close:
        return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"valid keys here: {', '.join(siblings)}"


def _aliases(model: type[BaseModel]) -> dict[str, Any]:
    """Key -> annotation for one model."""
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation (X, X | None, tuple[X, ...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (tuple, list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class that validates the mapping at a location."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        model = _submodel(_aliases(model).get(part))
    return model


def _all_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key path of the schema, list items shown as `[]`."""
    for key, annotation in _aliases(model).items():
        path = f"{prefix}{key}"
        yield path
        sub = _submodel(annotation)
        if sub is not None:
            is_list = typing.get_origin(annotation) is tuple
            yield from _all_paths(sub, f"{path}[]." if is_list else f"{path}.")
