"""The captioning command's one error of its own: bad input that stops a run before any caption is written."""

from __future__ import annotations


class CaptioningError(RuntimeError):
    """A problem with the user's input that stops the run before any caption is written (bad folder, bad model)."""
