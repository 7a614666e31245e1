"""One configuration system for augment and train: typed pydantic models, YAML files, overrides.

Every configuration (`babelcap.pipelines.options.AugmentConfig`,
`babelcap.training.config.TrainConfig` and their sections) is a `ConfigModel`:

- **typed and validated** by pydantic: `clip.top_k: five` is an error, `store_image: png` is an
  error listing the choices;
- **unknown keys are errors naming the key and its section** (`clip.scor_threshold: unknown
  config key ... did you mean 'score_threshold'?`), raised when the configuration is built, before
  any work starts;
- **one number parser**: files, `--set key=value` overrides and flag values all go through the
  same YAML loader (`ConfigLoader`), which reads `2e-1`, `3e-4` and `1.0e-2` as floats (YAML 1.2;
  plain PyYAML follows YAML 1.1 and leaves `2e-1` a string);
- **files plus dotted overrides**: `load(path, ["optim.lr=3e-4", "data.languages=[pt, es]"])`;
- **`${name}` interpolation** from a `variables` mapping the caller passes (`babelcap train
  --world W` passes `{"BABELCAP_WORLD": W}`); a name the mapping lacks falls back to the
  environment variable of that name (read only, never set); an unknown name is an error;
- `to_dict()` gives JSON-plain data (it goes into Parquet metadata and run manifests),
  `save(path)` writes YAML that `load` reads back to an equal configuration;
- **command-line flags derived from the fields** (`Flag`, `add_flags`, `apply_flags`): a flag's
  type, choices and help come from the model (`Field(description=...)`), and old flag names that
  point into sections (`--clip-top-k` -> `clip.top_k`) are explicit aliases.

Errors are `ConfigError`, a `ValueError`: the CLI prints its message without a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from typing_extensions import Self

__all__ = [
    "ConfigError",
    "ConfigLoader",
    "ConfigModel",
    "Flag",
    "FrozenConfigModel",
    "add_flags",
    "apply_flags",
    "apply_overrides",
    "field_at",
    "interpolate",
    "parse_value",
    "parse_yaml",
    "read_config",
    "set_key",
]


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, wrong type or value, unset variable)."""


# --------------------------------------------------------------------------------- numbers


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `3e-4` and `2e-1` are numbers, not strings
    (YAML 1.1 wants a dot: `3.0e-4`). Learning rates and thresholds are written that way."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "") -> Any:
    """YAML (or JSON, a subset of it) with the one number parser; no arbitrary objects."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source or 'config'}: not valid YAML: {exc}") from None


def parse_value(raw: str) -> Any:
    """One value written on the command line (`--set a.b=VALUE`, a numeric flag): YAML, so
    `3e-4` is a float, `true` a bool, `[pt, es]` a list, `null` None and `1e-3x` a string."""
    return parse_yaml(raw, f"value {raw!r}")


def read_config(path: str | Path | None) -> dict[str, Any]:
    """A config file (`.yaml`, `.yml` or `.json`) as a dict; None -> {}."""
    if path is None:
        return {}
    text = Path(path).read_text()  # FileNotFoundError names the file
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a configuration must be a mapping of keys to values")
    return dict(data)


# --------------------------------------------------------------------------------- overrides


def set_key(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with dotted `key` set to `value` (sections created as needed; the
    input is not changed)."""
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"bad config key {key!r}")
    out = dict(data)
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, BaseModel):
            child = child.model_dump()
        elif not isinstance(child, Mapping):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key!r}: {where} is a value, not a section")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with `section.key=value` strings applied (values parsed as YAML)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        out = set_key(out, key, parse_value(raw))
    return out


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(
    value: Any,
    variables: Mapping[str, str] | None = None,
    environ: bool = True,
    where: str = "",
) -> Any:
    """A copy of `value` with `${name}` replaced in every string: from `variables`, else (when
    `environ`) from the environment variable of that name. An unset name is an error."""
    if isinstance(value, Mapping):
        return {
            k: interpolate(v, variables, environ, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(
            interpolate(v, variables, environ, f"{where}[{i}]") for i, v in enumerate(value)
        )
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if variables is not None and name in variables:
            return str(variables[name])
        if environ and name in os.environ:
            return os.environ[name]
        hint = " (pass --world DIR)" if name == "BABELCAP_WORLD" else ""
        raise ConfigError(f"{where or 'config'}: ${{{name}}} is not set{hint}")

    return _VARIABLE.sub(substitute, value)


# --------------------------------------------------------------------------------- models


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X (other unions stay as they are)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _section_class(annotation: Any) -> type[BaseModel] | None:
    inner = _unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _model_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The section class at `path` (field names) inside `model`, or None."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None or part not in current.model_fields:
            return None
        current = _section_class(current.model_fields[part].annotation)
    return current


def field_at(model: type[BaseModel], key: str) -> FieldInfo:
    """The field a dotted key names (`clip.top_k` -> ClipConfig.top_k)."""
    *sections, name = key.split(".")
    owner = _model_at(model, sections)
    if owner is None or name not in owner.model_fields:
        raise ConfigError(f"{model.__name__} has no key {key!r}")
    return owner.model_fields[name]


def _describe(exc: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper())]
        key = ".".join(str(p) for p in loc)
        full = f"{prefix}.{key}" if prefix and key else (prefix or key)
        if err["type"] == "extra_forbidden":
            section = _model_at(model, [p for p in loc[:-1] if isinstance(p, str)])
            known = sorted(section.model_fields) if section is not None else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = ".".join(str(p) for p in ([prefix] if prefix else []) + loc[:-1])
            lines.append(
                f"unknown config key {full!r}{hint} (known in {where or 'the top level'}: "
                f"{', '.join(known)})"
            )
        elif not full:
            lines.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "missing":
            lines.append(f"{full}: required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{full}: {msg} (got {err['input']!r})")
    return lines


def _config_error(
    exc: ValidationError, model: type[BaseModel], source: str | None = None, prefix: str = ""
) -> ConfigError:
    lines = _describe(exc, model, prefix)
    head = f"invalid {model.__name__}" + (f" ({source})" if source else "")
    if len(lines) == 1:
        return ConfigError(f"{head}: {lines[0]}")
    return ConfigError(head + ":\n  " + "\n  ".join(lines))


def _is_number(annotation: Any) -> bool:
    inner = _unwrap_optional(annotation)
    return inner in (int, float)


class ConfigModel(BaseModel):
    """Base of every babelcap configuration section.

    Unknown keys are rejected (`extra="forbid"`), assignments are validated, numbers arrive
    through the one YAML parser, and a bool is not accepted where a number is expected
    (`seed: true` is an error, not 1). A section given as a mapping fills in the *field's*
    default section, not the class defaults (so `method.lora: {r: 4}` keeps the method's
    `modules_to_save: [proj]`).
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        coerce_numbers_to_str=True,  # `model.pretrained: 2024` is the text "2024"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, not a bool")
        if isinstance(value, Mapping) and field is not None:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel) and _section_class(field.annotation) is not None:
                return {**default.model_dump(), **value}
        return value

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, type(self)) from None

    # Only the message differs from BaseModel.__init__: tell pydantic so, and it keeps
    # validating nested sections with its own code (not through this __init__).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    # -- building
    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | BaseModel | None, source: str | None = None, prefix: str = ""
    ) -> Self:
        """Validate plain data (no interpolation). `source` (a file) and `prefix` (where the
        data sits in a larger configuration) make error messages point at the right place."""
        if isinstance(data, cls):
            return data.model_copy(deep=True)
        if isinstance(data, BaseModel):
            data = data.model_dump()
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(
                f"{prefix or cls.__name__}: expected a mapping of keys to values, got {data!r}"
            )
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise _config_error(exc, cls, source, prefix) from None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        overrides: Iterable[str] = (),
        variables: Mapping[str, str] | None = None,
    ) -> Self:
        """From a YAML/JSON file (or the defaults), `section.key=value` overrides and `${name}`
        variables (see `interpolate`)."""
        data = apply_overrides(read_config(path), overrides)
        return cls.from_dict(
            interpolate(data, variables), source=str(path) if path is not None else None
        )

    def updated(self, changes: Mapping[str, Any] | Iterable[str]) -> Self:
        """A validated copy with dotted keys changed (`{"run.seed": 3}` or `["run.seed=3"]`);
        this configuration stays as it is."""
        data = self.model_dump()
        if isinstance(changes, Mapping):
            for key, value in changes.items():
                data = set_key(data, key, value)
        else:
            data = apply_overrides(data, changes)
        return type(self).from_dict(data)

    # -- writing
    def to_dict(self) -> dict[str, Any]:
        """JSON-plain data (tuples as lists), in field order; `from_dict` reads it back."""
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Write YAML that `load` reads back to an equal configuration."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        Path(path).write_text(text)


class FrozenConfigModel(ConfigModel):
    """An immutable, hashable, picklable configuration (the pipeline's: pickled into DoFns).
    Change one with `updated(...)` or `model_copy(update=...)`."""

    model_config = ConfigDict(frozen=True)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets a config key.

    The flag's type, choices and help come from the field; `name` keeps an old flag name
    (`--clip-top-k` for `clip.top_k`); `also` sets further keys to the same value, and with
    `only_present` only in sections the configuration has (`--device` -> every model's device);
    `append` collects repeated flags into a list (`--prompt`, `--shards`); `mapping` takes
    repeated `KEY=VALUE` items for the section `key` (`--filter min_words=3` -> `text.min_words`).
    """

    key: str
    name: str | None = None
    help: str | None = None
    also: tuple[str, ...] = ()
    only_present: bool = False
    append: bool = False
    mapping: bool = False
    group: str | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.name or "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _is_text(annotation: Any) -> bool:
    return _unwrap_optional(annotation) is str


def _is_sequence(annotation: Any) -> bool:
    return get_origin(_unwrap_optional(annotation)) in (list, tuple, Sequence)


def _flag_type(annotation: Any, key: str):
    """argparse `type`: the value parsed by the one YAML parser and checked by pydantic."""
    adapter = TypeAdapter(annotation)
    inner = _unwrap_optional(annotation)

    def convert(raw: str) -> Any:
        value = parse_value(raw)
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number")
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc.errors()[0]['msg']}") from None

    convert.__name__ = getattr(inner, "__name__", key)
    return convert


def _help(flag: Flag, field: FieldInfo) -> str:
    text = flag.help or field.description or ""
    default = field.default
    if default not in (PydanticUndefined, None) and isinstance(default, (int, float, str)):
        text = f"{text} (default: {default})" if text else f"default: {default}"
    if flag.also or flag.key != flag.dest:
        keys = ", ".join((flag.key, *flag.also))
        text = f"{text} [{keys}]" if text else f"[{keys}]"
    return text.replace("%", "%%")


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` (dest `overrides`), the same for every
    command built on a config model; `example` is a `--set` value shown in the help."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example} (value parsed as YAML)",
    )


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flags: Iterable[Flag]):
    """Add the flags to `parser` (in argument groups where `Flag.group` says); every default is
    None, so only flags given on the command line change the configuration."""
    groups: dict[str, Any] = {}
    for flag in flags:
        target: Any = parser
        if flag.group:
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            target = groups[flag.group]
        if flag.mapping:
            section = _model_at(model, flag.key.split("."))
            known = ", ".join(section.model_fields) if section else ""
            target.add_argument(
                flag.flag,
                dest=flag.dest,
                action="append",
                default=None,
                metavar=flag.metavar or "KEY=VALUE",
                help=(flag.help or f"a {flag.key} setting") + (f"; KEY: {known}" if known else ""),
            )
            continue
        field = field_at(model, flag.key)
        annotation = field.annotation
        inner = _unwrap_optional(annotation)
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": None, "help": _help(flag, field)}
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(inner) is Literal:
            kwargs["choices"] = list(get_args(inner))
        elif flag.append:
            kwargs["action"] = "append"
        elif _is_sequence(annotation) or _is_text(annotation):
            pass  # text as typed; lists as "a, b" for the field's validator (parse_list)
        else:
            kwargs["type"] = _flag_type(annotation, flag.key)
        target.add_argument(flag.flag, **kwargs)


def apply_flags(
    data: Mapping[str, Any],
    args: argparse.Namespace,
    model: type[BaseModel],
    flags: Iterable[Flag],
) -> dict[str, Any]:
    """A copy of `data` with the values of the flags given on the command line."""
    out = dict(data)
    flags = list(flags)
    for flag in sorted(flags, key=lambda f: f.only_present):  # fan-out flags last
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if flag.mapping:
            section = _model_at(model, flag.key.split("."))
            known = list(section.model_fields) if section is not None else []
            for item in value:
                name, sep, raw = item.partition("=")
                name = name.strip().replace("-", "_")
                if not sep or not raw.strip() or (known and name not in known):
                    raise ConfigError(
                        f"{flag.flag} {item!r}: expected KEY=VALUE with KEY one of {known}"
                    )
                out = set_key(out, f"{flag.key}.{name}", parse_value(raw.strip()))
            continue
        for key in (flag.key, *flag.also):
            section = key.rpartition(".")[0]
            if flag.only_present and section and not isinstance(_get(out, section), Mapping):
                continue
            out = set_key(out, key, value)
    return out


def _get(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node
