"""Recipes: a YAML file plus dotted command-line overrides, read into the typed sections of `finetune.config`.

A recipe has the sections of `finetune.config.SECTIONS` and one section named after its method (`lora:`,
`dreambooth:`, ...) holding that method's options. Every key is checked against the dataclasses before anything heavy
happens: an unknown key, a wrong type or an impossible combination stops the job with a message that names the key
and lists what is valid. This module sits above the methods (it asks their registry for each method's options), so
that `finetune.config` stays a leaf.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.config import SECTIONS, Config, ConfigError
from finetune.methods import get_method_class, method_names


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NULL_WORDS = ("null", "none", "~", "")


class OverrideText(str):
    """The text after `=` of a command-line override: read by the type of the field it sets, never as YAML, so that
    `#`, `: ` and brackets stay literal in strings and `no` stays 'no' in a string field."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML with the 1.2 booleans only: `no`, `yes`, `on`, `off` stay strings (`train.mixed_precision: no`); bool
    fields still accept them (see _coerce)."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _ListSyntaxError(ConfigError):
    """An override that starts like a list but is not one."""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: 'line 3, column 7: mapping values are not allowed here'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _from_text(text: str, tp, key: str) -> Any:
    """An override's text read as the annotation `tp` asks: numbers, booleans, null and lists only where the field
    takes them; strings are kept exactly as typed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in NULL_WORDS:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_text(text, arg, key)
            except _ListSyntaxError:
                raise  # more useful than "expected list[int] | null"
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for wanted in (text, text.strip()):
            if wanted in choices:
                return wanted
        folded = [c for c in choices if isinstance(c, str) and c.lower() == text.strip().lower()]
        if len(folded) == 1:
            return folded[0]
        raise ConfigError(f"{key}: {text!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        (item_type,) = typing.get_args(tp)[:1]
        stripped = text.strip()
        if stripped.startswith("["):
            example = "[a, b]" if item_type is str else "[1, 2]"
            try:  # BaseLoader: every item stays text, read below by the item type
                items = yaml.load(stripped, Loader=yaml.BaseLoader)
            except yaml.YAMLError as err:
                raise _ListSyntaxError(
                    f"{key}: {text!r} is not a list ({_yaml_problem(err)}); write it as {key}={example}, quoting "
                    "items that hold commas or brackets"
                ) from None
            if not isinstance(items, list) or any(isinstance(item, (list, dict)) for item in items):
                raise _ListSyntaxError(f"{key}: {text!r} is not a flat list; write it as {key}={example}")
        elif stripped == "":
            items = []
        elif item_type is str:
            items = [text]  # one string where a list is expected (a prompt may hold commas)
        else:
            items = stripped.split(",")  # `block_out_channels=32,64` as well as [32, 64]
        return [_from_text(item, item_type, f"{key}[{i}]") for i, item in enumerate(items)]
    if tp is type(None):
        if text.strip().lower() in NULL_WORDS:
            return None
        raise ConfigError(f"{key}: expected null, got {text!r}")
    if tp is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            pass
        try:
            number = float(text.strip())
        except ValueError:
            number = math.nan
        if number.is_integer():  # 1e3
            return int(number)
        raise ConfigError(f"{key}: expected an integer, got {text!r}")
    if tp is float:
        try:
            number = float(text.strip())
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
        raise ConfigError(f"{key}: expected a number, got {text!r}")
    if tp is str:
        return str(text)
    if tp is Any:
        try:
            return yaml.load(text, Loader=_RecipeLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot read {text!r} ({_yaml_problem(err)})") from None
    raise ConfigError(f"{key}: unsupported type {tp}")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp` (int -> float is allowed); raise ConfigError naming `key`."""
    if isinstance(value, OverrideText):
        return _from_text(str(value), tp, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            # YAML 1.1 (a recipe built by other code, or a dict) reads `no` as False: the word the user wrote
            word = {False: "no", True: "yes"}[value]
            if word in choices:
                return word
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected: `targets=to_q`
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_type,) = typing.get_args(tp)[:1]
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in ("yes", "on", "true", "no", "off", "false"):  # the recipe loader keeps yes/no/on/off as text
            return word in TRUE_WORDS
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def build_dataclass(cls: type, values: dict | None, prefix: str):
    """Instantiate `cls` from a dict, rejecting unknown keys and wrong types with messages that name the key."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"'{prefix}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}.{unknown[0]}'. Valid keys in '{prefix}': {', '.join(sorted(fields)) or '(none)'}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=2e-4` -> (['optim', 'lr'], OverrideText('2e-4')): the value is read later by the type of the field
    it sets (see _from_text), not as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {text!r}: empty key part")
    return path, OverrideText(raw)


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Read a recipe (YAML path or dict), apply dotted overrides, check everything, return a Config."""
    if recipe is None:
        raw: dict = {}
    elif isinstance(recipe, dict):
        raw = dict(recipe)
    else:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"recipe {str(path)!r} cannot be read: {err.strerror or err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[keys[-1]] = value

    method = raw.pop("method", None)
    if method is None:
        raise ConfigError(f"the recipe has no 'method' key. Valid methods: {', '.join(method_names())}")
    if isinstance(method, OverrideText):
        method = str(method).strip()
    method_cls = get_method_class(method)
    valid_sections = sorted([*SECTIONS, method])
    unknown = sorted(set(raw) - set(valid_sections))
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'. Valid top-level keys: method, {', '.join(valid_sections)}")
    sections = {name: build_dataclass(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    options = build_dataclass(method_cls.Options, raw.get(method), method)
    config = Config(method=method, method_options=options, **sections)
    if config.diffusion.timestep_spacing is not None and not getattr(method_cls, "takes_timestep_spacing", False):
        raise ConfigError(
            f"diffusion.timestep_spacing applies to the pixel-space DDPM methods (unconditional, class_conditional, "
            f"ddpm_finetune), not {method}: leave it unset (a text-to-image pipeline keeps its base model's scheduler)"
        )
    method_cls.check_config(config)  # combinations that only this method knows are impossible
    if config.data.masked_loss and not hasattr(method_cls, "bucket_multiple"):
        raise ConfigError(
            f"data.masked_loss: the {method} method has no masked loss; it is for the text-to-image methods (lora, "
            "dreambooth, textual_inversion). Set data.masked_loss=false"
        )
    if config.data.aspect_buckets and not hasattr(method_cls, "bucket_multiple"):
        raise ConfigError(
            f"data.aspect_buckets: the {method} method trains on data.resolution squares; aspect-ratio buckets are "
            "for the text-to-image methods (lora, dreambooth, textual_inversion). Set data.aspect_buckets=false"
        )
    return config


def _section_help(name: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"\n[{name}]"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {name}.{f.name}: {_type_name(hints[f.name])} = {default!r}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return lines


def help_topics() -> list[str]:
    """What `--help TOPIC` takes: a section of every recipe, or a method."""
    return [*SECTIONS, *method_names()]


def format_help(topic: str | None = None, usage: str | None = None) -> str:
    """Every option of every section and method, with its type, default and help; or those of one section or
    method (`topic`). An unknown topic is a ConfigError listing the topics."""
    if topic is not None:
        if topic in SECTIONS:
            return "\n".join(_section_help(topic, SECTIONS[topic])).lstrip("\n")
        if topic in method_names():
            method_cls = get_method_class(topic)
            lines = [f"method '{topic}': {method_cls.summary}"]
            if dataclasses.fields(method_cls.Options):
                lines += _section_help(topic, method_cls.Options)
            else:
                lines.append(f"(no options of its own: a recipe sets method: {topic} and the common sections)")
            return "\n".join(lines)
        raise ConfigError(f"--help {topic}: no such section or method. Topics: {', '.join(help_topics())}")
    lines = [
        usage
        or "usage: accelerate launch -m finetune RECIPE.yaml [section.key=value ...]\n"
        "       python -m finetune RECIPE.yaml [section.key=value ...]",
        "",
        f"method: one of {', '.join(method_names())}",
    ]
    for name, cls in SECTIONS.items():
        lines += _section_help(name, cls)
    for name in method_names():
        method_cls = get_method_class(name)
        lines += [f"\n== method '{name}': {method_cls.summary}"]
        if dataclasses.fields(method_cls.Options):
            lines += _section_help(name, method_cls.Options)
    return "\n".join(lines)
