"""Errors a user can act on: each carries one line that names the file, line, key or setting and the fix, and the
exit code the command line returns for it. Anything else that escapes is a bug and keeps its traceback.

This module is a leaf: it imports nothing of ours, so every layer (config, data, checkpoints, CLIs) can raise these.
"""

from __future__ import annotations


class DifftuneError(Exception):
    """A failure the user can fix; `str(err)` is the whole message, `exit_code` what the command returns."""

    exit_code = 1


class InputError(DifftuneError, ValueError):
    """Bad input found before expensive work: a recipe key, a file, a folder, a model path. Exit code 2."""

    exit_code = 2


class RunError(DifftuneError, RuntimeError):
    """Something failed while running (disk full, permission denied, a push that did not go through). Exit code 1."""

    exit_code = 1
