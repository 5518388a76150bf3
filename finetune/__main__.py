"""Command line: `accelerate launch -m finetune RECIPE.yaml [section.key=value ...]` (or `python -m finetune ...`).

Exit codes: 0 when everything asked for happened; 2 for bad input (a recipe key, a path, the data: one line naming
it and the fix); 1 for a failure while running (disk full, a Hub push that did not go through; local outputs are
kept) and for bugs; 3 when another process of the job failed; 130 when interrupted. A bug prints one line, or its
traceback with `--debug` or DIFFTUNE_DEBUG=1.
"""

from __future__ import annotations

import sys

from finetune.preflight import debug_requested, exit_code_for, one_line
from finetune.recipe import format_help, help_topics, load_config


def main(argv: list[str] | None = None) -> int:
    argv, debug = debug_requested(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        flag = "-h" if "-h" in argv else "--help"
        after = argv[argv.index(flag) + 1 : argv.index(flag) + 2] if flag in argv else []
        topic = after[0] if after and after[0] in help_topics() else None  # `--help lora`: one method or section
        print(format_help(topic))
        return 0
    recipe, overrides = (argv[0], argv[1:]) if not argv[0].count("=") else (None, argv)
    try:
        config = load_config(recipe, overrides)
        from finetune.train import train

        train(config)
    except BaseException as err:  # noqa: BLE001 - every way out gets its exit code and one line
        if isinstance(err, SystemExit):
            raise
        if isinstance(err, Exception) and is_peer_failure(err):
            print(
                f"difftune: another process of this job failed or stopped answering ({type(err).__name__}: "
                f"{one_line(str(err).splitlines()[0]) if str(err) else ''}). Resume with "
                "checkpoint.resume_from_checkpoint=latest once every process can run.",
                file=sys.stderr,
            )
            return 3
        return exit_code_for(err, debug)
    return 0


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because a peer process died or timed out (gloo / NCCL), not a bug of this process."""
    from finetune.errors import DifftuneError

    if isinstance(err, DifftuneError):
        return False
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "gloo", "nccl", "timed out"))


if __name__ == "__main__":
    sys.exit(main())
