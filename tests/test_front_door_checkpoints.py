"""The checkpoint and output front door: kills at the worst moments (SIGKILL during the first checkpoint write,
while the final model is moved into place, while the latent disk cache is written), a full disk and a read-only file
system while writing, leftover temporaries, a resume path that does not exist, planted pickles, the log after a resume
and a failed Hub push. Each ends in one clear line or an exact resume, never a traceback or a half-written file."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from finetune import atomic
from finetune import checkpoint as ckpt
from finetune.errors import InputError, RunError
from finetune.latent_cache import shard_metadata
from tests.helpers import assert_same_tensors, run_training, safetensors_in, tiny_ddpm_recipe
from tests.tiny_models import make_test_images

RESUME = "checkpoint.resume_from_checkpoint=latest"


def recipe(output_dir: Path, **sections) -> dict:
    # EMA and a cosine schedule make every piece of state matter for the final weights; 40 examples / batch 8 = 5
    # batches per epoch, so the 6 steps cross an epoch boundary; a checkpoint every 3 steps
    sections = {
        "data": {"max_samples": 40, "random_flip": True},
        "optim": {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
        "ema": {"use_ema": True, "decay": 0.9},
        "checkpoint": {"checkpointing_steps": 3},
        **sections,
    }
    return tiny_ddpm_recipe(output_dir, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The weights of an uninterrupted run, and its log."""
    out = run_training(recipe(tmp_path_factory.mktemp("reference") / "run"))
    return {"weights": safetensors_in(out), "log": (out / "train_log.jsonl").read_text()}


def logged_steps(output_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def kill_point(point: str):
    """(module, function name, condition on its arguments, whether to die before the call) for each kill point."""
    import finetune.latent_cache as lc

    moves = []

    def second_move(source, target):  # the pipeline's model_index.json has moved, scheduler/ and unet/ not yet
        if ".final-model.staging.tmp" in str(source):
            moves.append(source)
        return len(moves) == 2

    return {
        "first checkpoint": (ckpt, "save_file", lambda state, path, *a: ".checkpoint-3.tmp" in str(path), False),
        "final move": (os, "replace", second_move, True),
        # the second of three shards is written (under its temporary name), the third not begun
        "disk cache": (lc, "save_file", lambda tensors, path, *a: ".shard-00001.safetensors." in str(path), False),
        # the text cache's second shard (of four) is written; the latents are all on disk
        "text cache": (
            lc,
            "save_file",
            lambda tensors, path, *a: "text-" in str(path) and ".shard-00001.safetensors." in str(path),
            False,
        ),
    }[point]


def killed_training(point: str, recipe: dict) -> None:
    """Run in a child process: train `recipe` and SIGKILL the process at `point` (after a write there, so that the
    file is complete and the step after it never happens; before a rename)."""
    owner, name, when, before = kill_point(point)
    original = getattr(owner, name)

    def dies(*args, **kwargs):
        if not when(*args):
            return original(*args, **kwargs)
        if not before:
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, dies)
    run_training(recipe)


def run_until_killed(point: str, recipe: dict) -> None:
    """A real SIGKILL at a chosen point. The child is forked from a fork server that has imported torch and diffusers
    once (so each kill costs no start-up) and, unlike a fork of pytest, holds no threads whose locks a child could
    inherit held."""
    import multiprocessing
    import pkgutil

    import finetune.methods

    methods = [f"finetune.methods.{m.name}" for m in pkgutil.iter_modules(finetune.methods.__path__)]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["finetune.train", *methods, __name__])
    process = context.Process(target=killed_training, args=(point, recipe))
    process.start()
    process.join(timeout=300)
    if process.exitcode is None:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL, f"the run ended with exit code {process.exitcode}, not by SIGKILL"


# -- kills ------------------------------------------------------------------------------------------------------------
def test_sigkill_during_the_first_checkpoint_write_then_latest_starts_over_exactly(tmp_path, reference, caplog):
    out = tmp_path / "run"
    run_until_killed("first checkpoint", recipe(out))
    assert (out / ".checkpoint-3.tmp").is_dir() and ckpt.list_checkpoints(out) == []
    assert logged_steps(out) == [1, 2, 3]

    caplog.set_level(logging.INFO)
    resumed = run_training(recipe(out), RESUME)
    assert not (out / ".checkpoint-3.tmp").exists()
    assert f"removed {out / '.checkpoint-3.tmp'}" in caplog.text
    assert f"no checkpoint in {out}: starting from step 0" in caplog.text
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # the killed run's lines are not repeated
    assert_same_tensors(safetensors_in(resumed), reference["weights"])


def test_sigkill_while_the_final_model_is_moved_into_place_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    run_until_killed("final move", recipe(out))
    assert (out / "model_index.json").is_file() and not (out / "unet").exists()
    assert not (out / "README.md").exists(), "the model card marks a finished folder: it comes last"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]

    resumed = run_training(recipe(out), RESUME)
    assert not (out / ".final-model.staging.tmp").exists() and (out / "README.md").is_file()
    assert_same_tensors(safetensors_in(resumed), reference["weights"])


def lora_recipe(base: Path, data: Path, output_dir: Path) -> dict:
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
            "num_samples": 1,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 1},
        "lora": {"rank": 2, "cache": "disk", "validation_prompts": []},
    }


def test_sigkill_during_a_disk_cache_write_resumes_caching_and_training_exactly(tiny_sd_dir, tmp_path, caplog):
    """Killed while writing the second of three cache shards: the first shard is kept (not encoded again), the
    half-written one is removed, and the cache and the trained weights end equal to an uninterrupted run's."""
    data = tmp_path / "data"
    for i, path in enumerate(make_test_images(data, 3, size=64)):
        path.with_suffix(".txt").write_text(f"a toy {i}")
    shards = "lora.cache_shard_mb=0.04"  # one image per shard (8 x 32 x 32 fp32 moments: 32 KB)
    reference = run_training(lora_recipe(tiny_sd_dir, data, tmp_path / "reference"), shards)
    out = tmp_path / "run"
    recipe = lora_recipe(tiny_sd_dir, data, out)
    recipe["lora"]["cache_shard_mb"] = 0.04
    run_until_killed("disk cache", recipe)
    (folder,) = (out / ".cache").glob("latents-*")  # (the text cache comes after the latents)
    left = sorted(p.name for p in folder.iterdir())
    assert left[1:] == ["shard-00000.safetensors"] and atomic.is_temporary(left[0]), left
    kept = (folder / "shard-00000.safetensors").stat()

    caplog.set_level(logging.INFO)
    resumed = run_training(lora_recipe(tiny_sd_dir, data, out), RESUME, shards)
    assert "3 shard(s), 1 already on disk; encoding 2 images" in caplog.text
    again = (folder / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns), "the finished shard was rewritten"
    (expected,) = (reference / ".cache").glob("latents-*")
    assert folder.name == expected.name
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names and len(names) == 3
    for name in names:  # (the header's metadata is a hash map: its order differs from file to file)
        assert shard_metadata(folder / name) == shard_metadata(expected / name)
        assert_same_tensors(load_file(folder / name), load_file(expected / name), atol=0)
    assert_same_tensors(safetensors_in(resumed), safetensors_in(reference))


def test_sigkill_during_a_text_cache_write_resumes_it_without_re_encoding_finished_shards(
    tiny_sd_dir, tmp_path, caplog
):
    """The text cache is sharded as the latents are: killed while writing its second of four shards (one caption
    each), the next run keeps the first shard and the latents, encodes the other three captions, and ends with the
    files and the weights of an uninterrupted run."""
    data = tmp_path / "data"
    for i, path in enumerate(make_test_images(data, 3, size=64)):
        path.with_suffix(".txt").write_text(f"a toy {i}")
    shards = "lora.cache_shard_mb=0.01"  # one image (32 KB) and one caption (77 x 32 fp32: 9.9 KB) per shard
    reference = run_training(lora_recipe(tiny_sd_dir, data, tmp_path / "reference"), shards)
    out = tmp_path / "run"
    recipe = lora_recipe(tiny_sd_dir, data, out)
    recipe["lora"]["cache_shard_mb"] = 0.01
    run_until_killed("text cache", recipe)
    (folder,) = (out / ".cache").glob("text-*")
    left = sorted(p.name for p in folder.iterdir())
    assert left[1:] == ["shard-00000.safetensors"] and atomic.is_temporary(left[0]), left
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / ".cache").rglob("shard-*.safetensors")}
    assert len(before) == 3 + 1, "the latents' three shards and the text's first"

    caplog.set_level(logging.INFO)
    resumed = run_training(lora_recipe(tiny_sd_dir, data, out), RESUME, shards)
    assert (
        "text conditioning of 4 captions" in caplog.text
        and "4 shard(s), 1 already on disk; encoding 3 captions" in (caplog.text)
    )
    assert "3 shard(s), 3 already on disk; encoding 0 images" in caplog.text
    for path, stat in before.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stat, f"{path.name} was rewritten"
    (expected,) = (reference / ".cache").glob("text-*")
    assert folder.name == expected.name
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names and len(names) == 4
    for name in names:
        assert shard_metadata(folder / name) == shard_metadata(expected / name)
        assert_same_tensors(load_file(folder / name), load_file(expected / name), atol=0)
    assert_same_tensors(safetensors_in(resumed), safetensors_in(reference))


# -- a full disk, a read-only file system -----------------------------------------------------------------------------
def failing(monkeypatch, owner, name: str, error: BaseException, when) -> None:
    original = getattr(owner, name)

    def fails(*args, **kwargs):
        if when(*args):
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, fails)


def safetensors_disk_full():
    from safetensors import SafetensorError

    return SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


@pytest.mark.parametrize("error", ["ENOSPC", "SafetensorError"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_resume_is_exact(tmp_path, monkeypatch, reference, error):
    out = tmp_path / "run"
    if error == "ENOSPC":  # the rename that completes checkpoint-6
        fault = OSError(errno.ENOSPC, "No space left on device")
        failing(monkeypatch, os, "replace", fault, lambda source, target: ".checkpoint-6.tmp" in str(source))
    else:  # safetensors writing the trained weights of checkpoint-6
        fault = safetensors_disk_full()
        failing(monkeypatch, ckpt, "save_file", fault, lambda state, path, *a: ".checkpoint-6.tmp" in str(path))
    with pytest.raises(RunError) as raised:
        run_training(recipe(out))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"no space left on the device while writing {out / '.checkpoint-6.tmp'}: free some")
    assert message.endswith("resume with checkpoint.resume_from_checkpoint=latest (checkpoint-3 is intact)")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"], "nothing partial"
    monkeypatch.undo()

    resumed = run_training(recipe(out), RESUME)
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(safetensors_in(resumed), reference["weights"])


def test_a_read_only_file_system_at_the_final_save_leaves_no_model_and_resumes(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    fault = OSError(errno.EROFS, "Read-only file system")
    failing(monkeypatch, os, "replace", fault, lambda source, target: ".final-model.staging.tmp" in str(source))
    with pytest.raises(RunError, match=r"^cannot write .*: the file system is read-only; choose a folder on a"):
        run_training(recipe(out))
    assert not (out / "model_index.json").exists() and not (out / ".final-model.staging.tmp").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    monkeypatch.undo()

    resumed = run_training(recipe(out), RESUME)
    assert_same_tensors(safetensors_in(resumed), reference["weights"])


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "no space left on the device while writing {path}: free some space"),
        (errno.EROFS, "cannot write {path}: the file system is read-only"),
        (errno.EACCES, "cannot write {path}: permission denied; make {folder} writable"),
    ],
)
def test_every_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, code, expected):
    """Captions, metadata, class images, grids, the config, the card: all go through atomic_path."""
    from captioning.caption import write_text_atomically

    path = tmp_path / "metadata.jsonl"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    failing(monkeypatch, os, "replace", OSError(code, os.strerror(code)), lambda source, target: True)
    with pytest.raises(RunError) as raised:
        write_text_atomically(path, "new\n")
    assert str(raised.value).startswith(expected.format(path=path, folder=tmp_path))
    monkeypatch.undo()
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metadata.jsonl"]
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o640


def test_generated_images_never_overwrite_and_never_appear_half_written(tmp_path, monkeypatch):
    from PIL import Image

    from pipelines.generate import save_images

    image = Image.new("RGB", (8, 8), (200, 10, 10))
    (tmp_path / "0001.png").write_bytes(b"someone's picture")
    paths, grid = save_images([(image, {"seed": 1})], tmp_path)
    assert [p.name for p in paths] == ["0002.png"] and grid.name == "grid.png"
    assert (tmp_path / "0001.png").read_bytes() == b"someone's picture"

    fault = OSError(errno.ENOSPC, "No space left on device")
    failing(monkeypatch, os, "link", fault, lambda source, target: True)
    with pytest.raises(RunError, match="no space left on the device while writing .*0003.png"):
        save_images([(image, {"seed": 2})], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0001.png", "0002.png", "grid.png"]


# -- leftovers and resume paths --------------------------------------------------------------------------------------
def test_leftover_temporaries_never_block_a_fresh_start_and_foreign_files_stay(tmp_path, caplog):
    out = tmp_path / "run"
    (out / ".checkpoint-5.tmp").mkdir(parents=True)
    (out / ".checkpoint-5.tmp" / "optimizer.bin").write_bytes(b"half")
    (out / "samples").mkdir()
    (out / "samples" / ".step-000005.png.k2j4h5g6.tmp").write_bytes(b"half a png")
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # cut by the kill
    caplog.set_level(logging.INFO)
    run_training(recipe(out, train={"max_train_steps": 2}))
    assert not (out / ".checkpoint-5.tmp").exists() and not list((out / "samples").glob(".*"))
    assert caplog.text.count("left by a run that was interrupted while writing it") == 2
    assert logged_steps(out) == [1, 2]

    other = tmp_path / "someone"
    other.mkdir()
    (other / "notes.tmp").write_text("mine")
    (other / ".checkpoint-5.tmp").mkdir()
    with pytest.raises(InputError, match="already holds notes.tmp"):
        run_training(recipe(other))
    assert (other / "notes.tmp").read_text() == "mine"


def test_resume_paths_that_do_not_exist_list_the_checkpoints_that_do(tmp_path, caplog):
    out = tmp_path / "run"
    for step in (3, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / ckpt.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    (out / "checkpoint-9").mkdir()  # incomplete: no trainer_state.json
    with pytest.raises(InputError) as raised:
        ckpt.resolve_resume(str(tmp_path / "nope"), out)
    assert str(raised.value) == (
        f"checkpoint.resume_from_checkpoint={str(tmp_path / 'nope')!r} does not exist; {out} holds checkpoint-3, "
        "checkpoint-6: pass one of them, or 'latest'"
    )
    with pytest.raises(InputError, match="'checkpoint-9' is not a complete checkpoint .it has no trainer_state.json."):
        ckpt.resolve_resume("checkpoint-9", out)
    assert ckpt.resolve_resume("checkpoint-3", out) == out / "checkpoint-3"  # relative to the output folder
    assert ckpt.resolve_resume("latest", out) == out / "checkpoint-6"
    empty = tmp_path / "empty"
    with pytest.raises(InputError, match="holds no checkpoint: leave it unset .or 'latest'. to start from step 0"):
        ckpt.resolve_resume(str(out / "checkpoint-12"), empty)
    caplog.set_level(logging.INFO)
    assert ckpt.resolve_resume("latest", empty) is None
    assert f"no checkpoint in {empty}: starting from step 0" in caplog.text


# -- no unpickling ----------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a file: it stands for any code a planted pickle could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_in_a_checkpoint_is_never_loaded(tmp_path, planted):
    out = run_training(recipe(tmp_path / "run", train={"max_train_steps": 3}))
    marker = tmp_path / "code-ran"
    (out / "checkpoint-3" / planted).write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(InputError, match=f"checkpoint .*{planted}.*not .*load"):
        run_training(recipe(out, train={"max_train_steps": 6}), RESUME)
    assert not marker.exists(), "the planted pickle was unpickled"


def test_a_damaged_checkpoint_file_is_named_not_a_traceback(tmp_path):
    out = run_training(recipe(tmp_path / "run", train={"max_train_steps": 3}))
    weights = out / "checkpoint-3" / "trainable_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a disk error
    with pytest.raises(InputError, match=r"checkpoint .*checkpoint-3 is damaged \(SafetensorError: .*\); resume from"):
        run_training(recipe(out, train={"max_train_steps": 6}), RESUME)


def test_distillation_keeps_its_stage_as_json_not_a_pickle(tmp_path):
    from finetune.methods.distillation import StageProgress
    from tests.tiny_models import make_tiny_ddpm_pipeline

    teacher = make_tiny_ddpm_pipeline(tmp_path / "teacher", resolution=8)
    out = run_training(
        tiny_ddpm_recipe(
            tmp_path / "run",
            method="distillation",
            model={"pretrained_model_name_or_path": str(teacher)},
            data={"max_samples": 16},
            train={"max_train_steps": 4, "num_samples": 2},
            checkpoint={"checkpointing_steps": 2},
            distillation={"initial_steps": 4, "final_steps": 1},
        )
    )
    # the first stage ends with step 2: from then on the second stage's teacher (the 2-step student) is in use
    assert (out / "student-2-steps" / "model_index.json").is_file()
    for step, stage in ((2, 1), (4, 1)):
        state = json.loads((out / f"checkpoint-{step}" / ckpt.TRAINER_STATE).read_text())
        assert state == {"global_step": step, "method_state": {"teacher_stage": stage}}
        # the stage follows from the step: what a resume derives and checks against the record
        assert StageProgress.at_step(step, iterations=2, halvings=2).state_dict() == state["method_state"]
    assert not list(out.rglob("custom_checkpoint_*"))


# -- the Hub push ----------------------------------------------------------------------------------------------------
def test_a_failed_push_is_a_nonzero_exit_with_the_local_output_kept(tmp_path, monkeypatch, capfd):
    import huggingface_hub

    from finetune.__main__ import main

    secret = "hf_frontDoorToken0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)

    def create_repo(repo_id, **kwargs):
        raise ConnectionError(f"connection reset (Authorization: Bearer {secret})")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(recipe(out, train={"max_train_steps": 2}, hub={"push_to_hub": True, "hub_model_id": "me/x"}))
    )
    code = main([str(recipe_path)])
    err = capfd.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"difftune: the model is saved in {out}, but the push to the Hub (me/x) failed")
    assert f"hf upload me/x {out} . --exclude 'checkpoint-*'" in last and "Traceback" not in err
    assert secret not in err
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "config.yaml"):
        assert (out / name).is_file(), name
