"""The `difftune` command: one entry point for training, generating, captioning, evaluating and the web app.

    difftune train RECIPE.yaml [section.key=value ...]   # checks everything here, then launches with accelerate
    difftune train RECIPE.yaml --print-config            # the resolved configuration, as YAML
    difftune train RECIPE.yaml --dry-run                 # every check and the plan; nothing trains
    difftune train --help [SECTION | METHOD]             # options of one section (train, data, ...) or method
    difftune generate | caption | evaluate | app ...     # python -m pipelines.generate, captioning, ...
    difftune --version

`python -m finetune`, `accelerate launch -m finetune`, `python -m pipelines.generate` etc. keep working: each
subcommand calls the same `main`. `difftune train` validates the recipe, the tracker, the output folder, its free
space and every model path in this process, so that a bad input is one line and exit code 2 before any launcher
starts, and it starts accelerate's launcher in this process, so that a failed run ends with the run's own line and
exit code (not a `CalledProcessError` traceback from the launcher).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "train": "train a recipe (validated here, then launched with accelerate)",
    "generate": "generate images from a pipeline with LoRAs / embeddings (python -m pipelines.generate)",
    "caption": "caption a folder of images with BLIP (python -m captioning)",
    "evaluate": "Frechet distance and KID of a pipeline's samples (python -m finetune.evaluate)",
    "app": "try a model in the browser (python -m pipelines.app)",
}

TRAIN_USAGE = """usage: difftune train RECIPE.yaml [section.key=value ...] [options]

Checks the recipe, the tracker, the output folder (writable, free space, not someone else's files) and every model
path here, then launches the run with accelerate (one process with every CPU core, or your accelerate config).

options:
  --print-config          print the resolved configuration (recipe + overrides + defaults) as YAML and exit
  --dry-run               run every check (config, tracker, output folder, disk space, model folders, data) and
                          print the plan (steps, global batch, examples, buckets, latent cache); nothing trains
  --help [TOPIC]          this text; with a section (model, data, optim, diffusion, ema, train, checkpoint, hub)
                          or a method (lora, dreambooth, ...), every option of it with its type, default and help
  --num-processes N       processes to launch (N > 1: one per GPU, accelerate's --multi_gpu)
  --mixed-precision P     no | fp16 | bf16 for the launcher (train.mixed_precision in a recipe wins)
  --config-file FILE      an accelerate config (accelerate_configs/*.yaml); replaces the options above
  --in-process            train in this process, without a launcher (as python -m finetune does)
  --debug                 tracebacks of unexpected errors (also DIFFTUNE_DEBUG=1)

topics: {topics}"""


def version(package: str = "difftune") -> str:
    """The installed version of a package, read from its metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version(package)
    except PackageNotFoundError:  # a checkout used without installing it
        return "unknown (not installed)"


def top_usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: difftune {train,generate,caption,evaluate,app} ...  |  difftune --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "difftune COMMAND --help shows a command's options; difftune train --help lora those of one method."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"difftune {version()} ({', '.join(f'{name} {version(name)}' for name in ('diffusers', 'torch'))})")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "generate":
        from pipelines.generate import main as generate_main

        return generate_main(rest)
    if command == "caption":
        from captioning.__main__ import main as caption_main

        return caption_main(rest)
    if command == "evaluate":
        from finetune.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "app":
        from pipelines.app import main as app_main

        return app_main(rest)
    print(f"difftune: unknown command {command!r}; one of {', '.join(SUBCOMMANDS)} (difftune --help)", file=sys.stderr)
    return 2


def _take_value(argv: list[str], i: int, flag: str) -> str:
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        from finetune.config import ConfigError

        raise ConfigError(f"{flag} needs a value (difftune train --help)")
    return argv[i + 1]


def parse_train_args(argv: list[str]) -> dict:
    """Our options out of `argv`; what is left is the recipe and its overrides (as `python -m finetune` takes)."""
    from finetune.config import ConfigError
    from finetune.recipe import help_topics

    options = {"print_config": False, "dry_run": False, "help": False, "topic": None, "in_process": False}
    launch: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--print-config", "--dry-run", "--in-process"):
            options[arg[2:].replace("-", "_")] = True
        elif arg in ("-h", "--help"):
            options["help"] = True
            if i + 1 < len(argv) and argv[i + 1] in help_topics():
                options["topic"] = argv[i + 1]
                i += 1
        elif arg in ("--num-processes", "--mixed-precision", "--config-file"):
            launch[arg[2:].replace("-", "_")] = _take_value(argv, i, arg)
            i += 1
        elif arg.split("=", 1)[0] in ("--num-processes", "--mixed-precision", "--config-file"):
            flag, value = arg.split("=", 1)
            launch[flag[2:].replace("-", "_")] = value
        elif arg.startswith("-") and not re.match(r"^[\w.]+=", arg):  # (an override is section.key=value)
            raise ConfigError(f"unknown option {arg!r} of difftune train (difftune train --help)")
        else:
            rest.append(arg)
        i += 1
    options["launch"] = launch
    options["rest"] = rest
    return options


def train_main(argv: list[str]) -> int:
    """Exit codes as `python -m finetune`: 0 done, 2 bad input (one line), 1 a failure while running, 3 another
    process failed, 130 interrupted; a launched run's own exit code is returned as it is."""
    from finetune.preflight import debug_requested, exit_code_for

    argv, debug = debug_requested(argv)
    try:
        options = parse_train_args(argv)
        if options["help"]:
            from finetune.recipe import format_help, help_topics

            if options["topic"] is None:
                print(TRAIN_USAGE.format(topics=", ".join(help_topics())))
            else:
                print(format_help(options["topic"]))
            return 0
        rest = options["rest"]
        if not rest:
            from finetune.config import ConfigError

            raise ConfigError(
                "give a recipe: difftune train RECIPE.yaml [section.key=value ...] (difftune train --help)"
            )
        recipe, overrides = (None, rest) if "=" in rest[0] else (rest[0], rest[1:])
        from finetune.recipe import load_config

        config = load_config(recipe, overrides)
        if options["print_config"]:
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        launch = options["launch"]
        processes = int(launch.get("num_processes", "1") or 1)
        if options["dry_run"]:
            import logging

            from finetune.plan import dry_run

            # the data's summary line and skipped files, as a run logs them
            logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
            for line in dry_run(config, processes):
                print(line)
            return 0
        if options["in_process"]:
            from finetune.__main__ import main as finetune_main

            return finetune_main(([] if recipe is None else [recipe]) + overrides + (["--debug"] if debug else []))
        from finetune.plan import check_before_launch

        check_before_launch(config)  # one line and exit 2 here, before any launcher starts
        return launch_training(recipe, overrides, launch, debug)
    except BaseException as err:  # noqa: BLE001 - every way out gets its exit code and one line
        if isinstance(err, SystemExit):
            raise
        return exit_code_for(err, debug)


def launcher_arguments(launch: dict[str, str]) -> list[str]:
    """accelerate launch's arguments: a config file as given; otherwise one process with every CPU core (or N
    processes, one per GPU), every value accelerate would otherwise warn it guessed given explicitly. A default
    accelerate config (`accelerate config`) is used when there is one and nothing was asked."""
    if "config_file" in launch:
        args = ["--config_file", launch["config_file"]]
        for key in ("num_processes", "mixed_precision"):
            if key in launch:
                args += [f"--{key}", launch[key]]
        return args
    from accelerate.commands.config.config_args import default_config_file

    if os.path.isfile(default_config_file) and not launch:
        return []
    processes = int(launch.get("num_processes", "1"))
    args = ["--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no"]
    args += ["--mixed_precision", launch.get("mixed_precision", "no")]
    if processes > 1:
        args.append("--multi_gpu")
    import torch

    if not torch.cuda.is_available():
        # accelerate gives a CPU process one thread unless told otherwise
        args += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes))]
        if processes > 1:  # several gloo processes that join one group (accelerate_configs/cpu_2proc.yaml)
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    return args


def launch_training(recipe: str | None, overrides: list[str], launch: dict[str, str], debug: bool) -> int:
    """Start accelerate's launcher here (it starts the training processes); their exit code is ours."""
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    script = ["-m", "finetune", *([] if recipe is None else [recipe]), *overrides, *(["--debug"] if debug else [])]
    args = launch_command_parser().parse_args([*launcher_arguments(launch), *script])
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # the run printed its own line; the launcher's traceback adds none
        return err.returncode
    except Exception as err:  # torch.distributed's ChildFailedError (several processes): the runs printed theirs
        if type(err).__name__ != "ChildFailedError":
            raise
        codes = sorted({failure.exitcode for failure in getattr(err, "failures", {}).values()})
        return next((code for code in codes if code > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
