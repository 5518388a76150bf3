from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_blip, make_tiny_sd_pipeline


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BLIP captioning checkpoint folder (model + processor), built once per test session. Read-only."""
    return make_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline folder, built once per test session. Read-only: copy it to modify it."""
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))
