"""Typed configuration: dataclass sections with help text and checks, loaded from a YAML recipe plus dotted overrides.

A recipe is a YAML file with the sections below and one section named after its method (`lora:`, `dreambooth:`, …)
holding that method's options. Every key is checked against the dataclasses before anything heavy happens: an
unknown key, a wrong type or an impossible combination stops the job with a message that names the key and lists
what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import InputError


class ConfigError(InputError):
    """A recipe or override that cannot be used; the message names the key and says how to fix it."""


def option(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with help text (shown by `--help`)."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------------------------
# sections shared by every method
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = option(
        None, "Hub id or local folder of the base model (a diffusers pipeline folder). None: build from scratch."
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = option(None, "Weights variant to load, e.g. 'fp16' for *.fp16.safetensors.")
    allow_pickle: bool = option(
        False, "Allow loading .bin/.ckpt pickle weights. Off: only safetensors load (pickle files can run code)."
    )


@dataclass
class DataConfig:
    dataset: str = option(
        "digits",
        "'digits' (scikit-learn's bundled 8x8 digits), a local image folder (optionally with metadata.jsonl or .txt "
        "captions), or a Hub dataset id.",
    )
    dataset_config_name: str | None = option(None, "Config name of a Hub dataset.")
    split: str = option("train", "Dataset split to train on.")
    image_column: str = option("image", "Column holding the images.")
    caption_column: str = option("text", "Column holding the captions (text-conditioned methods).")
    label_column: str = option("label", "Column holding integer class labels (class-conditional methods).")
    resolution: int = option(16, "Training resolution in pixels (images are resized, then cropped to a square).")
    center_crop: bool = option(True, "Center crop after resizing (False: random crop).")
    random_flip: bool = option(False, "Randomly flip images horizontally.")
    channels: int | None = option(None, "Image channels (1 or 3). None: 1 for digits, 3 otherwise.")
    max_samples: int | None = option(None, "Use only the first N examples (quick experiments, tests).")
    repeats: int = option(1, "Repeat the dataset N times per epoch (small DreamBooth sets).")
    verify_images: bool = option(True, "Decode every image once at start and skip unreadable ones (with a count).")
    num_workers: int = option(0, "DataLoader worker processes.")
    bad_metadata: Literal["skip", "error"] = option(
        "skip",
        "A bad line of metadata.jsonl/.csv (not JSON, not UTF-8, no file_name, a missing file, a duplicate, a caption "
        "that is not text when the method uses captions) or an unreadable .txt caption: 'skip' it (reported with its "
        "line number and counted), or 'error': stop at the first one.",
    )
    # 'use' by default: kohya's scripts train an image that has no .txt caption (with the empty/default caption), and
    # an image a user put in the folder is meant to be trained on; `datasets`' imagefolder drops it without a word,
    # which is the surprise this replaces. The summary at start names them either way.
    unlisted_images: Literal["use", "skip"] = option(
        "use",
        "Images of a folder that metadata.jsonl/.csv does not list (or, with .txt captions, that have no .txt): "
        "'use' them without a caption (the empty prompt; DreamBooth's instance_prompt), or 'skip' them. Counted and "
        "named in the summary at start.",
    )
    max_image_pixels: int | None = option(
        64_000_000,
        "Largest image (width x height) to train on: a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale when that "
        "brings it under the limit, any other is skipped and counted, never decoded. null: no limit of ours (PIL's "
        "decompression-bomb limit still applies).",
    )

    def __post_init__(self):
        if self.resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null, got {self.channels}")
        if self.repeats < 1:
            raise ConfigError(f"data.repeats must be >= 1, got {self.repeats}")
        if self.max_image_pixels is not None and self.max_image_pixels < self.resolution**2:
            raise ConfigError(
                f"data.max_image_pixels must be null or at least data.resolution^2 = {self.resolution**2}, got "
                f"{self.max_image_pixels}"
            )


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "torch AdamW, or bitsandbytes AdamW8bit.")
    lr: float = option(1e-4, "Peak learning rate.")
    scale_lr: bool = option(False, "Multiply lr by the global batch size (per-process batch x processes x accum).")
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.999, "Adam beta2.")
    adam_epsilon: float = option(1e-8, "Adam epsilon.")
    weight_decay: float = option(1e-2, "Decoupled weight decay.")
    max_grad_norm: float | None = option(1.0, "Clip the gradient norm to this value (null: no clipping).")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant_with_warmup", "LR schedule (diffusers.optimization.get_scheduler).")
    lr_warmup_steps: int = option(0, "Optimizer steps of linear warmup.")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"optim.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = option(1000, "Diffusion timesteps (from-scratch models).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = option(
        "linear", "Noise schedule of from-scratch models ('squaredcos_cap_v2' is the cosine schedule)."
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = option(
        None, "What the model predicts. None: keep the base model's scheduler setting (epsilon from scratch)."
    )
    snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is usual.")
    noise_offset: float = option(0.0, "Noise offset (per-channel constant added to the noise); 0.05-0.1 is usual.")
    sampler: Literal["ddim", "ddpm"] = option("ddim", "Scheduler used for sample grids and saved pipelines.")
    num_inference_steps: int = option(50, "Sampling steps for sample grids and validation.")

    def __post_init__(self):
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"diffusion.snr_gamma must be positive or null, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise ConfigError(f"diffusion.noise_offset must be >= 0, got {self.noise_offset}")


@dataclass
class EMAConfig:
    use_ema: bool = option(False, "Keep an exponential moving average of the trained weights and save it.")
    decay: float = option(0.9999, "Maximum EMA decay.")
    use_ema_warmup: bool = option(True, "Ramp the decay up (1 - (1 + step/inv_gamma)^-power).")
    inv_gamma: float = option(1.0, "EMA warmup inv_gamma.")
    power: float = option(0.75, "EMA warmup power (3/4 suits short runs, 2/3 long ones).")
    update_after_step: int = option(0, "Start averaging after this many optimizer steps.")

    def __post_init__(self):
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class TrainConfig:
    output_dir: str = option("outputs/run", "Folder for checkpoints, samples, logs and the final model.")
    seed: int = option(0, "Seed of everything random: data order, augmentation, noise, init.")
    max_train_steps: int = option(1000, "Optimizer steps to train.")
    train_batch_size: int = option(16, "Batch size per process.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Mixed precision. None: accelerate's setting (launch flag / config file). Trainable weights stay fp32."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    allow_tf32: bool = option(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    log_every: int = option(10, "Log loss and lr every N optimizer steps.")
    sample_every: int = option(0, "Write a sample grid every N steps (0: only at the end).")
    num_samples: int = option(16, "Images in each sample grid.")
    eval_every: int = option(0, "Evaluate samples against real data every N steps (0: off).")
    eval_num_samples: int = option(256, "Images generated for each evaluation.")
    report_to: Literal["auto", "tensorboard", "wandb", "jsonl", "none"] = option(
        "auto",
        "Tracker: 'auto' is tensorboard when installed, otherwise a JSONL log. train_log.jsonl is always written.",
    )
    process_group_timeout_s: int = option(
        1800, "Seconds a rank waits for the others (validation, saving) before failing with an error."
    )
    progress_bar: bool = option(True, "Show a tqdm progress bar.")

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "sample_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    checkpointing_steps: int = option(500, "Save a resumable checkpoint-<step> folder every N steps (0: never).")
    checkpoints_total_limit: int | None = option(None, "Keep at most N checkpoints; older ones are deleted.")
    resume_from_checkpoint: str | None = option(
        None, "'latest' (the newest checkpoint in output_dir, if any) or a checkpoint folder to resume from."
    )

    def __post_init__(self):
        if self.checkpointing_steps < 0:
            raise ConfigError(f"checkpoint.checkpointing_steps must be >= 0, got {self.checkpointing_steps}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoint.checkpoints_total_limit must be >= 1 or null")


@dataclass
class HubConfig:
    push_to_hub: bool = option(
        False,
        "Upload the final output folder (checkpoints excluded). The token comes from HF_TOKEN or `hf auth login`.",
    )
    hub_model_id: str | None = option(None, "Repository id, e.g. 'user/my-lora'. None: the output folder's name.")
    private: bool = option(False, "Create the repository as private.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "diffusion": DiffusionConfig,
    "ema": EMAConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "hub": HubConfig,
}


@dataclass
class Config:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    method_options: Any = None  # the method's own dataclass, read from the section named after the method

    def to_dict(self) -> dict:
        out = {"method": self.method}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.method_options is not None and dataclasses.fields(self.method_options):
            out[self.method] = dataclasses.asdict(self.method_options)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------------
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
    from finetune.methods import get_method_class, method_names

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
    method_cls.check_config(config)  # combinations that only this method knows are impossible
    return config


def format_help() -> str:
    """Every option of every section and method, with its type, default and help."""
    from finetune.methods import get_method_class, method_names

    def section(name: str, cls: type) -> list[str]:
        hints = typing.get_type_hints(cls)
        lines = [f"\n[{name}]"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name}: {_type_name(hints[f.name])} = {default!r}")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")
        return lines

    lines = [
        "usage: accelerate launch -m finetune RECIPE.yaml [section.key=value ...]",
        "       python -m finetune RECIPE.yaml [section.key=value ...]",
        "",
        f"method: one of {', '.join(method_names())}",
    ]
    for name, cls in SECTIONS.items():
        lines += section(name, cls)
    for name in method_names():
        method_cls = get_method_class(name)
        lines += [f"\n== method '{name}': {method_cls.summary}"]
        if dataclasses.fields(method_cls.Options):
            lines += section(name, method_cls.Options)
    return "\n".join(lines)
