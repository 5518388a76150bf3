"""Checks that run before any expensive work, in the order a user would want to hear about problems: the
configuration (finetune.config) -> the output folder (writable, with room) -> every model path -> the data (the
method's setup). Each failure is a ConfigError (an InputError, exit code 2): one line naming the key or file, what is
wrong and the fix.

The command lines share `exit_code_for`: a DifftuneError prints its line and returns its exit code (2 bad input,
1 failure while running); anything else is a bug and prints one "internal error" line, or its traceback with
`--debug` / DIFFTUNE_DEBUG=1.

Nothing here loads a model or reads the data: a model folder is checked by its layout and by the headers of its
safetensors files, a Hub id only against the local cache (and only when offline mode is on; online, the loader's
own error is translated by `describe_load_error`).
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config import ConfigError
from finetune.errors import DifftuneError

if TYPE_CHECKING:
    from finetune.config import Config

DEBUG_ENV = "DIFFTUNE_DEBUG"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# below this, nothing but the smallest run fits (logs, sample grids, config); refused whatever the estimate
MIN_FREE_BYTES = 32 * 2**20
# how a model path is checked: the files a Hub repo must have in the local cache (any of them) when offline
HUB_FILES = {
    "pipeline": ("model_index.json",),
    "vae": ("config.json", "vae/config.json"),
    "model": ("config.json", "text_encoder/config.json"),
    "tokenizer": ("tokenizer_config.json", "tokenizer/tokenizer_config.json", "vocab.json", "tokenizer/vocab.json"),
    "transformers": ("config.json",),
    "any": ("config.json", "model_index.json"),
}


# ---------------------------------------------------------------------------------------------------------------------
# command lines
# ---------------------------------------------------------------------------------------------------------------------
def debug_requested(argv: Iterable[str]) -> tuple[list[str], bool]:
    """(argv without `--debug`, whether tracebacks are wanted: `--debug` or DIFFTUNE_DEBUG=1)."""
    argv = list(argv)
    env = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return [a for a in argv if a != "--debug"], env or "--debug" in argv


def one_line(err: BaseException | str) -> str:
    """A message on one line (a DifftuneError is one line by contract; this keeps a stray newline from breaking it)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def exit_code_for(err: BaseException, debug: bool = False, prog: str = "difftune") -> int:
    """Print what the user sees for `err` on stderr and return the exit code. A bug re-raises when debugging."""
    if isinstance(err, DifftuneError):
        if debug:
            traceback.print_exception(err)
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if debug:
        raise err
    lines = str(err).strip().splitlines()
    print(
        f"{prog}: internal error: {type(err).__name__}: {lines[0] if lines else ''} "
        f"(run with {DEBUG_ENV}=1 for the traceback)",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------------------------------------------------------------
# output folder
# ---------------------------------------------------------------------------------------------------------------------
def _reason(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno == errno.ELOOP:
        return "a symlink loop"
    return err.strerror or type(err).__name__


def format_duration(seconds: float) -> str:
    """'45 s', '2 min 35 s', '1 h 04 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_main_rank() -> bool:
    """The process that writes (rank 0 of a launch, or the only process): read before accelerate starts."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def write_probe(folder: Path) -> None:
    """Create and remove one empty file in `folder`; raises the OSError a real write would meet."""
    target = folder / f".difftune-write-probe-{os.getpid()}"
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    target.unlink()


def nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: str | Path, key: str, probe: bool = True) -> Path:
    """Resolve `folder` and make sure it can be written, or created when missing, without creating it: a run that
    stops at a later check leaves nothing behind. Returns the resolved path.

    `probe` creates and removes one empty file in the folder (or in its closest existing ancestor): the only check
    that sees a read-only mount or an ACL as root does. Other ranks of a launch only ask os.access, so that no probe
    file is ever seen by the main rank's emptiness check.
    """
    shown = str(folder)
    try:
        path = Path(folder).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop before Python 3.13
        why = _reason(err) if isinstance(err, OSError) else "a symlink loop"
        raise ConfigError(f"{key}: cannot resolve the folder {shown!r} ({why}); choose another folder") from None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {shown!r} is a file, not a folder; choose a folder name")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(
            f"{key}: cannot create the folder {shown!r}: {str(existing)!r} is a file; choose another folder"
        )
    verb = "write in" if existing == path else "create"
    if probe:
        try:
            write_probe(existing)
        except OSError as err:
            raise ConfigError(
                f"{key}: cannot {verb} the folder {shown!r} ({_reason(err)}); choose another folder or fix the "
                "permissions"
            ) from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}: cannot {verb} the folder {shown!r} (permission denied or a read-only file system); choose "
            "another folder or fix the permissions"
        )
    return path


def check_free_space(folder: Path, needed: int, key: str, why: str = "") -> None:
    """Refuse when the free space is clearly too small: less than `needed` (a lower bound) or MIN_FREE_BYTES."""
    try:
        free = shutil.disk_usage(nearest_existing(Path(folder))).free
    except OSError:
        return  # a file system that cannot say: the writes will tell
    needed = max(int(needed), MIN_FREE_BYTES)
    if free < needed:
        because = f" ({why})" if why else ""
        raise ConfigError(
            f"{key}: only {format_bytes(free)} free on the file system of {str(folder)!r}, and this run needs at "
            f"least {format_bytes(needed)}{because}; free some space or choose an output folder on another disk"
        )


def _weight_files(folder: Path, variant: str | None = None, allow_pickle: bool = False) -> list[Path]:
    """The weights a loader would read in one component folder (roughly: the variant's, else the plain ones)."""
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"))
    if not files and allow_pickle:
        files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if variant:
        chosen = [p for p in files if f".{variant}." in p.name]
    else:
        chosen = [p for p in files if p.name.count(".") == 1]
    return chosen or files


def estimate_output_bytes(config: Config) -> tuple[int, str]:
    """A lower bound of what the run writes, known before any model loads: one checkpoint (trained weights + the two
    AdamW moments, + EMA) and the final model, from the size on disk of the base model's trained components. Zero
    where it cannot be known cheaply (a Hub id, a model built from scratch) or is small (adapters, embeddings)."""
    path = config.model.pretrained_model_name_or_path
    options = config.method_options
    adapter = config.method in ("lora", "textual_inversion") or bool(getattr(options, "use_lora", False))
    if not path or adapter or not Path(path).expanduser().is_dir():
        return 0, ""
    root = Path(path).expanduser()
    if config.method == "autoencoder":
        parts = [root / "vae" if (root / "vae").is_dir() else root]
    else:
        parts = [root / "unet"]
        if getattr(options, "train_text_encoder", False):
            parts.append(root / "text_encoder")
    model = config.model
    trained = sum(p.stat().st_size for part in parts for p in _weight_files(part, model.variant, model.allow_pickle))
    if not trained:
        return 0, ""
    copies, what = 1, "the final model"
    steps = config.checkpoint.checkpointing_steps
    if steps and steps < config.train.max_train_steps:
        factor = 3 + int(config.ema.use_ema)
        copies += factor
        ema = ", EMA" if config.ema.use_ema else ""
        what = f"a checkpoint of {factor} x the weights (weights, AdamW moments{ema}) and the final model"
    return copies * trained, f"{what}; {format_bytes(trained)} of trained weights in {path}"


# ---------------------------------------------------------------------------------------------------------------------
# model paths
# ---------------------------------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_local(text: str) -> bool:
    """Whether a path that does not exist was meant as a local folder rather than a Hub id."""
    if not _REPO_ID.match(text) or "--" in text or ".." in text or text.endswith(".git"):
        return True  # not a valid repo id: absolute, ./, ~, two slashes, spaces, backslashes
    head = text.split("/")[0]
    return "/" in text and Path(head).is_dir()  # outputs/my-run, where outputs/ is here


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def in_hub_cache(repo_id: str, filenames: Iterable[str], revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        except ValueError:  # not a valid repo id
            return False
        if isinstance(found, str):
            return True
    return False


def offline_message(key: str, repo_id: str) -> str:
    return (
        f"{key}: {repo_id!r} is not a local folder, and offline mode is on (HF_HUB_OFFLINE=1) but this Hub model is "
        f"not in the local cache; unset HF_HUB_OFFLINE to download it, or download it first with `hf download "
        f"{repo_id}`, or give a local folder"
    )


def _missing_folder(key: str, text: str) -> ConfigError:
    """'the folder X does not exist', with the closest names in its parent folder when there are any."""
    path = Path(text).expanduser()
    hint = ""
    try:
        parent = path.parent
        if parent.is_dir():
            names = [p.name for p in parent.iterdir() if p.is_dir()]
            close = difflib.get_close_matches(path.name, names, n=2, cutoff=0.7)
            if close:
                hint = " (did you mean " + " or ".join(repr(str(parent / name)) for name in close) + "?)"
    except OSError:
        pass
    return ConfigError(f"{key}: the folder {text!r} does not exist{hint}; give an existing folder or a Hub id")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be loaded (header length, JSON header, data length), or None. Reads the header
    only."""
    try:
        size = path.stat().st_size
        if size < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > size - 8 or length > 100 * 2**20:
                return f"the header claims {length} bytes in a file of {size}"
            header = json.loads(handle.read(length))
    except OSError as err:
        return f"cannot read it: {_reason(err)}"
    except (ValueError, UnicodeDecodeError):
        return "the header is not valid JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "the header has no valid data_offsets"
    expected = 8 + length + end
    if size != expected:
        return f"the file has {size} bytes, its header describes {expected}"
    return None


def check_weights(folder: Path, key: str, pickle_hint: str) -> None:
    """A model folder (one with config.json) has loadable weights: safetensors files that are whole, or pickle
    files only when `pickle_hint` is empty (pickle allowed)."""
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError as err:
        raise ConfigError(f"{key}: cannot read the folder {str(folder)!r} ({_reason(err)})") from None
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not safetensors:
        if pickles and pickle_hint:
            raise ConfigError(
                f"{key}: {str(folder)!r} holds only pickle weights ({', '.join(pickles[:3])}), which can run code "
                f"when loaded; convert them to safetensors, or {pickle_hint}"
            )
        if not pickles:
            raise ConfigError(
                f"{key}: {str(folder)!r} has a config.json but no weights (no .safetensors file); save or download "
                "the model again"
            )
        return
    for name in safetensors:
        problem = safetensors_problem(folder / name)
        if problem:
            raise ConfigError(
                f"{key}: {str(folder / name)!r} is corrupt or truncated (safetensors header/length: {problem}); "
                "download or save the model again"
            )
    for name in names:
        if name.endswith(".safetensors.index.json"):
            try:
                shards = set(json.loads((folder / name).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                raise ConfigError(f"{key}: {str(folder / name)!r} is not a valid shard index (JSON)") from None
            missing = sorted(s for s in shards if s not in names)
            if missing:
                raise ConfigError(
                    f"{key}: {str(folder)!r} lacks the weight shard(s) {', '.join(missing[:3])} named by {name}; "
                    "download or save the model again"
                )


def _check_local_model(
    path: Path, text: str, key: str, expect: str, pickle_hint: str, components: tuple[str, ...] = ()
) -> None:
    if not path.is_dir():
        raise ConfigError(f"{key}: {text!r} is a file, not a model folder; give the folder the model was saved to")
    folders: list[Path] = []
    if expect == "pipeline":
        index_path = path / "model_index.json"
        missing = [name for name in components if not (path / name).is_dir()]
        if components and not missing and not index_path.is_file():
            # the components load one by one from their subfolders: model_index.json is not needed
            folders.extend(path / name for name in components)
        elif not index_path.is_file():
            lacks = f", missing {', '.join(missing)} (expected subfolders: {', '.join(components)})" if missing else ""
            raise ConfigError(
                f"{key}: the folder {text!r} has no model_index.json{lacks}, so it is not a diffusers pipeline "
                "folder; give the folder a pipeline was saved to (save_pretrained) or a Hub id"
            )
        elif missing:
            raise ConfigError(
                f"{key}: {text!r} is not a complete pipeline folder: missing {', '.join(missing)} (expected "
                f"subfolders: {', '.join(components)})"
            )
    if expect == "pipeline" and (path / "model_index.json").is_file():
        index_path = path / "model_index.json"
        try:
            index = json.loads(index_path.read_text())
            if not isinstance(index, dict):
                raise ValueError
        except (OSError, ValueError):
            raise ConfigError(
                f"{key}: {str(index_path)!r} is not valid JSON; save or download the model again"
            ) from None
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
                continue
            if not (path / name).is_dir():
                raise ConfigError(
                    f"{key}: {text!r} lacks the {name}/ subfolder that its model_index.json lists; save or download "
                    "the pipeline again"
                )
            folders.append(path / name)
    if expect == "vae":
        if (path / "vae").is_dir():
            folders.append(path / "vae")
        elif (path / "config.json").is_file():
            folders.append(path)
        else:
            raise ConfigError(
                f"{key}: {text!r} has neither a config.json (an AutoencoderKL folder) nor a vae/ subfolder (a "
                "pipeline folder)"
            )
    elif expect == "model":
        folders.append(path / "text_encoder" if (path / "text_encoder").is_dir() else path)
        if not (folders[0] / "config.json").is_file():
            raise ConfigError(f"{key}: {text!r} has no config.json (nor a text_encoder/ subfolder with one)")
    elif expect == "transformers":
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}: the folder {text!r} has no config.json, so it is not a saved model folder; give the folder "
                "a model was saved to (save_pretrained) or a Hub id"
            )
        folders.append(path)
    for folder in folders:
        if (folder / "config.json").is_file():  # a model (schedulers and tokenizers have no weights)
            check_weights(folder, key, pickle_hint)


def check_model_path(
    path: str | Path | None,
    key: str,
    expect: str = "pipeline",
    pickle_hint: str = "set model.allow_pickle=true if you trust their source",
    revision: str | None = None,
    components: tuple[str, ...] = (),
) -> None:
    """A model path that can be loaded, checked without loading it: a local folder of the `expect`ed layout
    ('pipeline', 'vae', 'model', 'tokenizer', 'transformers' or 'any') with whole weights, or a Hub id (which,
    offline, must be in the local cache). `pickle_hint` says how to allow pickle weights; empty: they are allowed.
    `components`: subfolders a pipeline must have; with all of them, model_index.json is optional."""
    if path is None or str(path) == "":
        return
    text = str(path)
    local = Path(text).expanduser()
    try:
        exists = local.exists()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {text!r} ({_reason(err)})") from None
    if exists:
        _check_local_model(local, text, key, expect, pickle_hint, components)
        return
    if looks_local(text):
        raise _missing_folder(key, text)
    if hub_offline() and not in_hub_cache(text, HUB_FILES.get(expect, HUB_FILES["any"]), revision):
        raise ConfigError(offline_message(key, text))


def describe_load_error(err: BaseException, path: str, key: str, what: str, pickle_hint: str = "") -> str:
    """One line for a loader's failure on `path`: corrupt weights, offline without the files, a repo that does not
    exist, pickle-only weights, or the loader's own first line."""
    text = one_line(err)
    low = text.lower()
    name = type(err).__name__
    if "safetensor" in name.lower() or "header too" in low or "incomplete metadata" in low or "invalidheader" in low:
        return f"{key}: the {what} weights in {path!r} are corrupt or truncated (safetensors header/length: {text})"
    if name == "HFValidationError" or "repo id must be" in low:
        return str(_missing_folder(key, path))
    if hub_offline() and not Path(path).expanduser().exists():
        return offline_message(key, path)
    if name in ("RepositoryNotFoundError", "GatedRepoError") or "repository not found" in low:
        return (
            f"{key}: {path!r} is neither a local folder nor a Hub repository you can read; check the name, or log "
            "in with `hf auth login` for a private or gated one"
        )
    local = Path(path).expanduser()
    if pickle_hint and local.is_dir() and "safetensors" in low:
        return (
            f"{key}: cannot load the {what} of {path!r} from safetensors; if the folder holds only .bin/.ckpt weights "
            f"and you trust its source, {pickle_hint} ({text})"
        )
    return f"{key}: cannot load the {what} of {path!r}: {text}"


# ---------------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------------
def model_paths(config: Config) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(key, path, expected layout, required subfolders) of every model a run loads."""
    from finetune.methods import get_method_class

    expect = {
        "autoencoder": "vae",
        "unconditional": "any",
        "class_conditional": "any",
        "latent_diffusion": "any",
    }.get(config.method, "pipeline")
    method_cls = get_method_class(config.method)
    components = method_cls.model_subfolders(config) if expect == "pipeline" else ()
    paths = [("model.pretrained_model_name_or_path", config.model.pretrained_model_name_or_path, expect, components)]
    options = config.method_options
    for field, layout in (("vae", "vae"), ("tokenizer", "tokenizer"), ("text_encoder", "model")):
        value = getattr(options, field, None)
        if isinstance(value, str) and value:
            paths.append((f"{config.method}.{field}", value, layout, ()))
    return [path for path in paths if path[1]]


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_tracker(report_to: str) -> str | None:
    """The accelerate tracker for train.report_to, or None (train_log.jsonl only). A tracker asked for by name that
    is not installed is refused here, in one line, rather than dropped by accelerate with a warning."""
    import importlib.util

    if report_to == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    if report_to in ("none", "jsonl"):
        return None
    package = TRACKER_PACKAGES.get(report_to, report_to)
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.report_to={report_to}: the {package} package is not installed; install it (pip install -e "
            f"'.[{report_to}]', or pip install {package}), or set train.report_to=jsonl (train_log.jsonl only)"
        )
    return report_to


def check_training_inputs(config: Config) -> Path:
    """Everything a training run can check before loading anything, in order: the tracker asked for, the output
    folder (writable, room), then every model path. Returns the resolved output folder. The data comes next, in the
    method's setup()."""
    resolve_tracker(config.train.report_to)
    key = "train.output_dir"
    output_dir = check_output_folder(config.train.output_dir, key, probe=is_main_rank())
    needed, why = estimate_output_bytes(config)
    check_free_space(output_dir, needed, key, why)
    hint = "" if config.model.allow_pickle else "set model.allow_pickle=true if you trust their source"
    for model_key, path, layout, components in model_paths(config):
        revision = config.model.revision if model_key.startswith("model.") else None
        check_model_path(path, model_key, layout, hint, revision, components)
    return output_dir
