"""The installed set: the lock tooling, the start-up guard for package combinations known not to work, and the
bitsandbytes notice that must not reach users."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from finetune.compat import text_encoder_lora_problem
from finetune.errors import InputError
from finetune.recipe import load_config

ROOT = Path(__file__).resolve().parent.parent


def lockfile_module():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "requirements" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_every_direct_dependency_and_not_torch():
    lockfile = lockfile_module()
    pins = lockfile.read_lock(ROOT / "requirements" / "lock.txt")
    for name in lockfile.unbounded(ROOT / "pyproject.toml"):
        assert lockfile.canonical(name) in pins, f"{name} is a dependency but not locked"
    assert "torch" not in pins and "difftune" not in pins
    assert "transformers" in lockfile.unbounded(ROOT / "pyproject.toml")
    assert "torch" not in lockfile.unbounded(ROOT / "pyproject.toml")


def test_lock_differences_name_the_package_and_both_versions():
    lockfile = lockfile_module()
    pins = {"transformers": ("transformers", "5.23.0"), "pyyaml": ("PyYAML", "6.0.4"), "peft": ("peft", "0.21.2")}
    present = {"transformers": ("transformers", "5.24.0"), "pyyaml": ("PyYAML", "6.0.4")}
    assert lockfile.differences(pins, present) == [
        "peft: locked 0.21.2, not installed",
        "transformers: locked 5.23.0, installed 5.24.0",
    ]
    assert lockfile.differences({"torch": ("torch", "2.13.0")}, {"torch": ("torch", "2.13.0+cpu")}) == []
    assert lockfile.canonical("typing_extensions") == lockfile.canonical("Typing-Extensions")


def test_the_tested_set_trains_text_encoder_lora():
    assert text_encoder_lora_problem() is None


def lora_recipe(**lora):
    return {"method": "lora", "model": {"pretrained_model_name_or_path": "some/model"}, "lora": lora}


def test_a_transformers_that_needs_a_newer_peft_is_refused_at_start(monkeypatch, capsys):
    import transformers.integrations.peft

    from finetune.__main__ import main

    monkeypatch.setattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "99.0.0")
    load_config(lora_recipe())  # a UNet-only LoRA does not touch transformers' peft integration
    with pytest.raises(InputError) as caught:
        load_config(lora_recipe(train_text_encoder=True))
    message = str(caught.value)
    assert "train_text_encoder" in message and "peft >= 99.0.0" in message and "make install" in message
    assert "transformers " in message and "is installed" in message

    recipe = ROOT / "finetune" / "recipes" / "sd_lora.yaml"
    assert main([str(recipe), "lora.train_text_encoder=true"]) == 2
    err = capsys.readouterr().err
    assert "peft >= 99.0.0" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_bitsandbytes_kernel_notice_is_dropped_and_nothing_else(caplog):
    from bitsandbytes.backends.cpu import ops

    import finetune  # noqa: F401 - installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert ops.logger is logger, "bitsandbytes moved the notice to another logger: the filter must follow it"
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'")
        logger.warning("something else bitsandbytes wants to say")
    assert [r.getMessage() for r in caplog.records] == ["something else bitsandbytes wants to say"]
