"""Hub push without the network: what would be uploaded (exactly), to which repo, private or not; a failed push keeps
the local output and the job succeeds; the token is never logged or written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from finetune.outputs import HUB_IGNORE_PATTERNS
from tests.helpers import run_training, tiny_ddpm_recipe
from tests.test_outputs import assert_valid_card
from tests.tiny_models import make_test_images

SECRET = "hf_difftuneTestToken0123456789abcdef"


class FakeHub:
    """Stands in for huggingface_hub.create_repo / upload_folder and records what they were asked to do."""

    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        if self.fail == "create_repo":
            raise RuntimeError(f"401 Client Error: Unauthorized (Authorization: Bearer {SECRET})")
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        # what huggingface_hub does before uploading: its default patterns appended (in place), then the filter
        ignore_patterns = [] if ignore_patterns is None else ignore_patterns
        ignore_patterns += DEFAULT_IGNORE_PATTERNS
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.uploads.append({"repo_id": repo_id, "files": uploaded, "all_files": files, **kwargs})
        if self.fail == "upload_folder":
            raise ConnectionError(f"connection reset while uploading to {repo_id}")


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake.upload_folder)
    return fake


def assert_no_token_anywhere(output_dir: Path, caplog, capfd) -> None:
    captured = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the token was written to {path}"


def lora_recipe(base, data, output_dir):
    return {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": 64},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
        "diffusion": {"num_inference_steps": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": 2,
            "train_batch_size": 2,
            "log_every": 1,
            "num_samples": 1,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 1},
        "lora": {"rank": 2, "cache": "disk", "validation_prompts": ["a toy"]},
        "hub": {"push_to_hub": True, "hub_model_id": "someone/tiny-lora", "private": True},
    }


def test_an_adapter_push_uploads_the_output_without_checkpoints(hub, tiny_sd_dir, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    for i, path in enumerate(make_test_images(data, 2, size=64)):
        path.with_suffix(".txt").write_text(f"a toy {i}")
    out = run_training(lora_recipe(tiny_sd_dir, data, tmp_path / "run"))

    assert hub.repos == [{"repo_id": "someone/tiny-lora", "private": True, "exist_ok": True}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "someone/tiny-lora"
    assert upload["files"] == [
        "README.md",
        "config.yaml",
        "loss_curve.png",
        "pytorch_lora_weights.safetensors",
        "samples/final.png",
        "train_log.jsonl",
    ]
    left_out = set(upload["all_files"]) - set(upload["files"])
    assert any(f.startswith("checkpoint-2/") for f in left_out) and any(f.startswith(".cache/") for f in left_out)
    assert HUB_IGNORE_PATTERNS == ["checkpoint-*", ".checkpoint-*", "logs/*", "class_images/*", ".cache/*"]
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "| method | lora |" in card
    # the card validates, loads from the Hub id the run pushed to, and shows a prompt of the data it trained on
    meta = assert_valid_card(out / "README.md")
    assert meta["pipeline_tag"] == "text-to-image" and meta["license"] == "creativeml-openrail-m"
    assert meta["instance_prompt"] == "a toy 0"  # a caption of its data; the samples show its validation prompt
    assert meta["widget"] == [{"text": "a toy", "output": {"url": "samples/final.png"}}]
    assert 'pipe.load_lora_weights("someone/tiny-lora")' in card and 'image = pipe("a toy 0", ' in card
    assert "pushed" in caplog.text and "someone/tiny-lora" in caplog.text
    assert_no_token_anywhere(out, caplog, capfd)


def test_a_full_model_push_goes_to_the_folder_name_and_is_public_by_default(hub, tmp_path, caplog, capfd):
    recipe = tiny_ddpm_recipe(
        tmp_path / "digits-run", hub={"push_to_hub": True}, checkpoint={"checkpointing_steps": 3}
    )
    out = run_training(recipe)
    assert hub.repos == [{"repo_id": "digits-run", "private": False, "exist_ok": True}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/digits-run"
    assert upload["files"] == [
        "README.md",
        "config.yaml",
        "loss_curve.png",
        "model_index.json",
        "samples/final.png",
        "scheduler/scheduler_config.json",
        "train_log.jsonl",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert {"checkpoint-3", "checkpoint-6"} <= {f.split("/")[0] for f in upload["all_files"]}
    assert_no_token_anywhere(out, caplog, capfd)


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_a_failed_push_keeps_the_output_and_the_job_fails(hub, tmp_path, caplog, capfd, failing):
    from finetune.errors import RunError

    caplog.set_level(logging.DEBUG)
    hub.fail = failing
    recipe = tiny_ddpm_recipe(tmp_path / "run", hub={"push_to_hub": True, "hub_model_id": "someone/digits"})
    # everything asked for did not happen: a RunError (exit 1), after the local output is complete
    with pytest.raises(RunError, match=r"push to the Hub \(someone/digits\) failed.*hf upload someone/digits"):
        run_training(recipe)
    out = tmp_path / "run"
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    failure = [r for r in caplog.records if "push to the Hub" in r.getMessage()]
    assert failure and failure[0].levelname == "ERROR"
    message = failure[0].getMessage()
    assert f"The output stays in {out}" in message and "hf upload someone/digits" in message
    assert ("401 Client Error" if failing == "create_repo" else "connection reset") in message
    assert "config.yaml" in {p.name for p in out.iterdir()} and SECRET not in (out / "config.yaml").read_text()
    assert_no_token_anywhere(out, caplog, capfd)
