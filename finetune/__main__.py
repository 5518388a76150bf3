"""Command line: `accelerate launch -m finetune RECIPE.yaml [section.key=value ...]` (or `python -m finetune ...`)."""

from __future__ import annotations

import sys

from finetune.config import ConfigError, format_help, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(format_help())
        return 0
    recipe, overrides = (argv[0], argv[1:]) if not argv[0].count("=") else (None, argv)
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"difftune: configuration error: {err}", file=sys.stderr)
        return 2
    from finetune.train import train

    try:
        train(config)
    except ConfigError as err:  # bad input found while reading the data or models, before training
        print(f"difftune: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_peer_failure(err):
            raise
        print(
            f"difftune: another process of this job failed or stopped answering ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Resume with "
            "checkpoint.resume_from_checkpoint=latest once every process can run.",
            file=sys.stderr,
        )
        return 3
    return 0


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because a peer process died or timed out (gloo / NCCL), not a bug of this process."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "gloo", "nccl", "timed out"))


if __name__ == "__main__":
    sys.exit(main())
