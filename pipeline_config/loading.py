"""Reading the pipeline's YAML files into typed configs, and saying what is wrong with them.

`load_pipeline_config` turns a YAML file (or a mapping) plus `--set section.key=value` overrides into a validated
`PipelineConfig` (the schema is pipeline_config/schema.py), collecting every problem into one `ConfigError`. The sweep
space (pipeline_config/sweep.py) reads its file with the same reader (`read_yaml_mapping`, which keeps the line of
every key) and words its problems with the same helpers (`validation_problems`, `did_you_mean`).
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_config.schema import PipelineConfig

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """Invalid configuration; `problems` lists every finding, one line each."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid configuration in {source}" if source else "invalid configuration"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


# --- the run config -------------------------------------------------------------------------------------------------


def load_pipeline_config(
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Read, override and validate a config. Raises ConfigError listing every problem.

    `source`: a YAML file, or the config as a mapping (sections of keys); default: the embedded default config.
    `overrides`: `section.key=value` strings (typed against the schema, see `parse_override`) or a mapping of
    `section.key` to already-typed values."""
    if isinstance(source, Mapping):
        name, raw = "<mapping>", copy.deepcopy(dict(source))
    else:
        name = str(source) if source is not None else str(DEFAULT_CONFIG_PATH)
        raw = read_yaml_mapping(name, "top level must be a mapping of sections (model:, data:, training: ...)").data
    problems: list[str] = []
    if isinstance(overrides, Mapping):
        items = [(str(k).split("."), v, f"{k}={v}") for k, v in overrides.items()]
    else:
        items = []
        for item in overrides or []:
            try:
                items.append((*parse_override(item), item))
            except ValueError as exc:
                problems.append(str(exc))
    for keys, value, text in _merged_key_by_key(items):
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                problems.append(f"--set {text}: {k} is not a section")
                break
        else:
            node[keys[-1]] = value
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, PipelineConfig))
        raise ConfigError(problems, name) from None
    if problems:
        raise ConfigError(problems, name)
    return cfg


def dump_pipeline_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (what a run saves next to its adapter)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value`, the value typed against the schema: a string field takes the text as it is
    (`data.response_template=[/INST]` stays a string); other fields read it as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    annotation = field_annotation(keys)
    if raw.strip() in ("null", "~") and _accepts_none(annotation):
        return keys, None  # an optional field set back to unset (`--set model.gguf_file=null`)
    if _takes_text_verbatim(annotation):
        return keys, raw
    if not raw.strip():
        return keys, ""
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as exc:  # includes tags such as !!python/name:..., which safe_load refuses
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--set {item!r}: the value is not a plain YAML value ({problem})") from None


def _merged_key_by_key(items: list[tuple[list[str], Any, str]]) -> list[tuple[list[str], Any, str]]:
    """A mapping given as a value (`training: {max_steps: 4}` in a sweep space's overrides, or `--set
    training={max_steps: 4}`) sets its keys one by one: no field takes a mapping, so it never replaces a whole
    section (which would silently reset every other key of it to its default)."""
    flat = []
    for keys, value, text in items:
        if isinstance(value, Mapping) and value:
            flat += _merged_key_by_key([([*keys, str(k)], v, text) for k, v in value.items()])
        else:
            flat.append((keys, value, text))
    return flat


# --- the schema's keys and types ------------------------------------------------------------------------------------


def known_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every key of `model` as written in a file, sections and their keys: ['model', 'model.name_or_path', ...]."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(known_keys(ann, prefix + name + "."))
    return keys


def field_annotation(keys: list[str], model: type[BaseModel] = PipelineConfig) -> Any:
    """The schema's type for a dotted key split at its dots (None if the key names no field)."""
    for i, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            return None
        if i == len(keys) - 1:
            return field.annotation
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


def _takes_text_verbatim(annotation: Any) -> bool:
    """True for a field whose values are only strings (str, str | None, a Literal of strings)."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a is type(None) or _takes_text_verbatim(a) for a in args)
    return False


def _accepts_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


# --- messages -------------------------------------------------------------------------------------------------------


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The hint for a mistyped `name`: " (did you mean 'x'?)" with the closest of `known`, '' when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validation_problems(
    exc: ValidationError,
    model: type[BaseModel],
    file: YamlMapping | None = None,
    missing: str = "required field missing",
) -> list[str]:
    """One line per error of `model.model_validate`: the dotted key and what is wrong with it, an unknown key with
    the known one it is closest to. With the `file` the data came from, each line starts with the key's line in it.
    `missing`: what to say of a required key that is absent."""
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key, at = ".".join(loc), file.at(*loc) if file else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            problems.append(f"{at}{key}: unknown key{did_you_mean(key, known_keys(model))}")
        elif err["type"] == "missing":
            problems.append(f"{at}{key}: {missing}")
        elif not key:
            problems.append(msg)  # a check of the whole config (PipelineConfig's cross-field checks)
        elif err["type"] == "value_error":
            problems.append(f"{at}{key}: {msg}")
        else:
            problems.append(f"{at}{key}: {msg} (got {err.get('input')!r})")
    return problems


# --- reading a YAML file --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YamlMapping:
    """A YAML file whose top level is a mapping, with the line of every key in it (for messages)."""

    source: str
    text: str
    data: dict[str, Any]
    lines: dict[tuple[str, ...], int]  # {('parameters', 'lora.r'): 7, ...}, 1-based

    def at(self, *path: str) -> str:
        """'line N, ' for the key at `path` (as nested in the file); '' where the file has no such key."""
        line = self.lines.get(path)
        return f"line {line}, " if line else ""


def read_yaml_mapping(source: str, top_level: str, error: type[ConfigError] = ConfigError) -> YamlMapping:
    """The YAML file `source`; an empty file is an empty mapping. Raises ConfigError when the file is missing, a folder
    or not UTF-8, and `error` (ConfigError or a subclass) when it is not YAML text, has a syntax error (with its line
    and column) or its top level is not a mapping (then `top_level` is the message, saying what it should hold)."""
    text = _read_config_text(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: most likely a binary file that happens to decode
        raise error(
            [
                f"config file {source} is not YAML text (character #x{exc.character:04x} at position {exc.position}):"
                " pass a YAML config file"
            ]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise error([f"{where}YAML syntax error: {getattr(exc, 'problem', exc)}"], source) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise error([top_level], source)
    return YamlMapping(source, text, raw, _key_lines(yaml.compose(text)))


def _key_lines(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every mapping key under `root`, by its path of keys."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...], above: tuple[int, ...]) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in above:  # an alias can make a node its own child
            return
        for key, value in node.value:
            sub = (*path, str(key.value))
            lines[sub] = key.start_mark.line + 1
            walk(value, sub, (*above, id(node)))

    if root is not None:
        walk(root, (), ())
    return lines


def _read_config_text(source: str) -> str:
    """The config file's text (UTF-8). Raises ConfigError naming the file when it is missing, a folder or binary."""
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"config file {source} not found: pass an existing --config path"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {source} is a folder: pass the path of a YAML config file in it"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {source} cannot be read ({exc.strerror or exc})"]) from None
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some Windows editors write
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                f"config file {source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                "pass a YAML config file"
            ]
        ) from None
