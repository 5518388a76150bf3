"""DreamBooth on a tiny Stable Diffusion beyond the method contract (tests/contract.py: full and LoRA outputs load
into plain pipelines and change the image, resume): prior preservation generates exactly the missing class images
and weights them; bad inputs fail early."""

from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import ConfigError
from finetune.data import collate_examples
from finetune.methods.dreambooth import DreamBooth
from finetune.prior_preservation import missing_class_indices
from finetune.recipe import load_config
from tests.helpers import reset_accelerate, run_training, sd_image
from tests.tiny_models import make_test_images

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    make_test_images(folder, 4, size=64)
    return folder


def recipe(base, instance, output_dir, method="dreambooth", lr=1e-3, steps=2, **options):
    return {
        "method": method,
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"resolution": 64},
        "optim": {"lr": lr, "lr_scheduler": "constant"},
        "diffusion": {"num_inference_steps": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": steps,
            "train_batch_size": 2,
            "log_every": 1,
            "num_samples": 1,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
        method: {"instance_data_dir": str(instance), "instance_prompt": PROMPT, **options},
    }


def prior(class_dir, num_class_images=3, **options):
    return dict(
        with_prior_preservation=True,
        class_prompt="a photo of toy",
        class_data_dir=str(class_dir),
        num_class_images=num_class_images,
        sample_batch_size=2,
        **options,
    )


def generate(pipe, prompt=PROMPT):
    return sd_image(pipe, prompt)


def set_up(config) -> DreamBooth:
    from accelerate import Accelerator

    reset_accelerate()
    method = DreamBooth(config, Accelerator(cpu=True))
    method.setup()
    return method


@pytest.fixture(scope="module")
def prior_run(tiny_sd_dir, instance_dir, tmp_path_factory):
    """Set up (no training) with a class folder that already holds a user's image and class_1.png: 4 are wanted."""
    root = tmp_path_factory.mktemp("prior")
    class_dir = root / "class"
    make_test_images(root / "seed", 2, size=48, seed=7)
    class_dir.mkdir()
    shutil.copy(root / "seed" / "image_000.png", class_dir / "my_photo.png")
    shutil.copy(root / "seed" / "image_001.png", class_dir / "class_1.png")
    before = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    config = load_config(recipe(tiny_sd_dir, instance_dir, root / "run", **prior(class_dir, 4, prior_loss_weight=0.5)))
    method = set_up(config)
    return method, config, class_dir, before


def test_prior_preservation_generates_exactly_the_missing_class_images(prior_run, monkeypatch):
    method, config, class_dir, before = prior_run
    after = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    assert sorted(after) == ["class_0.png", "class_1.png", "class_2.png", "my_photo.png"]
    assert all(after[name] == data for name, data in before.items()), "existing class images are kept byte for byte"
    assert len(method.train_dataset.source.classes) == 4

    # a second run finds them all: no pipeline is even built
    monkeypatch.setattr(DreamBooth, "pipeline", lambda self: pytest.fail("nothing should be generated"))
    set_up(config)
    assert {p.name: p.read_bytes() for p in class_dir.iterdir()} == after
    monkeypatch.undo()

    # an interrupted generation resumes with exactly what is missing, and each image depends only on its own seed:
    # class_2 regenerated alone (a batch of one) is the image it was in a batch of two. Not byte for byte: batched and
    # single matmuls round differently, which moves a few 8-bit levels at most; another seed moves the whole image.
    (class_dir / "class_2.png").unlink()
    set_up(config)
    assert sorted(p.name for p in class_dir.iterdir()) == sorted(after)
    assert all((class_dir / name).read_bytes() == data for name, data in after.items() if name != "class_2.png")
    pixels = {name: np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for name, data in after.items()}
    regenerated = np.asarray(Image.open(class_dir / "class_2.png"), dtype=np.int16)
    assert np.abs(regenerated - pixels["class_2.png"]).max() <= 4
    assert np.abs(regenerated - pixels["class_2.png"]).mean() < 0.5
    assert np.abs(regenerated - pixels["class_0.png"]).mean() > 5, "another seed gives another image"


def test_missing_class_indices_fill_the_gaps():
    assert missing_class_indices({"class_1.png", "dog.png"}, 3) == [0, 2, 3]
    assert missing_class_indices(set(), 0) == []
    # two processes striding over the indices write disjoint files that together are the whole set
    indices = missing_class_indices({"class_0.png"}, 5)
    assert sorted(indices[0::2] + indices[1::2]) == indices == [1, 2, 3, 4, 5]


def test_class_examples_carry_the_prior_loss_weight(prior_run):
    method = prior_run[0]
    examples = method.train_dataset
    batch = collate_examples([examples[i] for i in range(len(examples))])
    is_class = torch.tensor([text == "a photo of toy" for text in batch["text"]])
    assert is_class.sum() == (~is_class).sum() == 4, "an epoch holds as many class as instance examples"
    assert set(batch["text"]) == {"a photo of toy", PROMPT}
    # 2 and 2 x prior_loss_weight: the expected loss is diffusers' mse(instance) + prior_loss_weight * mse(class)
    assert torch.all(batch["loss_weight"][is_class] == 1.0) and torch.all(batch["loss_weight"][~is_class] == 2.0)
    weights = method.loss_weights(torch.zeros(len(is_class), dtype=torch.long), batch)
    assert torch.equal(weights, batch["loss_weight"])
    assert len(set(batch["row"].tolist())) == 8, "class rows never collide with instance rows (latent cache keys)"
    loss, _ = method.loss(collate_examples([examples[i] for i in range(2)]))
    assert torch.isfinite(loss)


def test_class_prompts_draw_class_images_in_turn_and_train_each_with_its_own_prompt(
    tiny_sd_dir, instance_dir, tmp_path
):
    class_dir = tmp_path / "class"
    make_test_images(tmp_path / "user", 2, size=48, seed=7)
    class_dir.mkdir()
    # a captioned regularisation image of the user's (kohya's scheme): its .txt is its caption
    shutil.copy(tmp_path / "user" / "image_000.png", class_dir / "my_cat.png")
    (class_dir / "my_cat.txt").write_text("a photo of cat\n")
    prompts = ["a photo of toy", "a photo of car"]
    options = {**prior(class_dir, 4), "class_prompt": None, "class_prompts": prompts}
    config = load_config(recipe(tiny_sd_dir, instance_dir, tmp_path / "run", **options))
    method = set_up(config)
    written = {p.name: p.read_text() for p in class_dir.glob("class_*.txt")}
    assert written == {
        "class_0.txt": "a photo of toy",
        "class_1.txt": "a photo of car",
        "class_2.txt": "a photo of toy",
    }
    assert sorted(p.name for p in class_dir.glob("*.png")) == [
        "class_0.png",
        "class_1.png",
        "class_2.png",
        "my_cat.png",
    ]
    examples = method.train_dataset
    texts = collate_examples([examples[i] for i in range(len(examples))])["text"]
    assert sorted(t for t in texts if t != PROMPT) == sorted(["a photo of cat", *prompts, "a photo of toy"])
    assert set(method.all_captions()) >= {"a photo of cat", *prompts}, "the text cache encodes every class caption"

    # an uncaptioned class image with no class_prompt to fall back on: one line naming it, before any drawing
    shutil.copy(tmp_path / "user" / "image_001.png", class_dir / "z_dog.png")
    with pytest.raises(ConfigError, match=r"1 class image\(s\) have no caption \(z_dog.png\)"):
        set_up(config)
    # with a class_prompt it is that image's caption, and the captioned ones keep theirs
    with_fallback = {**options, "class_prompt": "a photo of dog", "num_class_images": 5}
    method = set_up(load_config(recipe(tiny_sd_dir, instance_dir, tmp_path / "run", **with_fallback)))
    captions = method.train_dataset.source.classes.column_values["text"]
    assert captions == [*prompts, "a photo of toy", "a photo of cat", "a photo of dog"]

    base = recipe(tmp_path / "no-such-model", instance_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"class_prompts\[1\] 'a sks car' contains the trigger"):
        load_config(base, ["dreambooth.with_prior_preservation=true", "dreambooth.class_prompts=[a toy, a sks car]"])
    with pytest.raises(ConfigError, match="class_prompts is empty"):
        load_config(base, ["dreambooth.with_prior_preservation=true", "dreambooth.class_prompts=[]"])


def test_missing_trigger_and_bad_options_fail_before_models_load(tiny_sd_dir, instance_dir, tmp_path):
    base = recipe(tmp_path / "no-such-model", instance_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="does not contain the trigger 'sks'"):
        load_config(base, ["dreambooth.instance_prompt=a photo of my toy"])
    with pytest.raises(ConfigError, match="trigger 'zwx'"):
        load_config(base, ["dreambooth.trigger=zwx"])
    with pytest.raises(ConfigError, match="does not contain the trigger"):
        load_config(base, ["dreambooth.instance_prompt=he asks for a toy"])
    load_config(base, ["dreambooth.trigger=zwx", "dreambooth.instance_prompt=a photo of zwx toy"])
    with pytest.raises(ConfigError, match="must be a multiple of 8"):
        load_config(base, ["data.resolution=60"])
    with pytest.raises(ConfigError, match="needs dreambooth.class_prompt"):
        load_config(base, ["dreambooth.with_prior_preservation=true"])
    with pytest.raises(ConfigError, match="class_prompt 'a photo of sks' contains the trigger"):
        load_config(base, ["dreambooth.with_prior_preservation=true", "dreambooth.class_prompt=a photo of sks"])
    with pytest.raises(ConfigError, match="instance_data_dir is required"):
        load_config({**base, "dreambooth": {"instance_prompt": PROMPT}})
    # the model path is checked first (it is cheap); with a real model, a missing instance folder is reported next
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path: the folder .* does not exist"):
        run_training(base, f"dreambooth.instance_data_dir={tmp_path / 'nothing'}")
    existing_model = recipe(tiny_sd_dir, instance_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="instance_data_dir: the folder .* does not exist"):
        run_training(existing_model, f"dreambooth.instance_data_dir={tmp_path / 'nothing'}")


def test_non_images_in_the_instance_folder_are_skipped_and_counted(tiny_sd_dir, tmp_path, caplog):
    from accelerate import Accelerator

    folder = tmp_path / "instance"
    make_test_images(folder, 3, size=64)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "image_000.txt").write_text("a photo of sks toy, red")  # a caption, not a stray file
    reset_accelerate()
    method = DreamBooth(load_config(recipe(tiny_sd_dir, folder, tmp_path / "run")), Accelerator(cpu=True))
    with caplog.at_level(logging.WARNING):
        source = method.build_source()
    assert len(source) == 3
    assert method.skipped_instance_files == {"not images": [".DS_Store", "notes.txt"], "unreadable": ["broken.jpg"]}
    assert "training on 3 images; skipped 3 file(s)" in caplog.text

    # per-image captions (.txt next to the image) must name the trigger too; images without one use instance_prompt
    captioned = DreamBooth(
        load_config(recipe(tiny_sd_dir, folder, tmp_path / "b", use_captions=True)), method.accelerator
    )
    source = captioned.build_source()
    rng = np.random.default_rng(0)
    assert [captioned.caption_for(source.get(i, rng), rng) for i in range(3)] == [
        "a photo of sks toy, red",
        PROMPT,
        PROMPT,
    ]
    (folder / "image_001.txt").write_text("a photo of a toy")
    with pytest.raises(ConfigError, match="1 caption.* do not contain the trigger 'sks' \\(image_001.png\\)"):
        captioned.build_source()


def test_a_new_instance_prompt_re_encodes_the_text_and_keeps_the_latent_shards(tiny_sd_dir, instance_dir, tmp_path):
    """The prompts are in the text cache's fingerprint, not the latents': the shards are not even rewritten."""
    cache = tmp_path / "cache"

    def cached(prompt: str) -> DreamBooth:
        options = {"instance_prompt": prompt, "trigger": "sks", "cache": "disk", "cache_dir": str(cache)}
        method = set_up(load_config(recipe(tiny_sd_dir, instance_dir, tmp_path / "run", **options)))
        method.before_training(None)
        return method

    def files(prefix: str) -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in cache.glob(f"{prefix}-*/*.safetensors")
        }

    first = cached(PROMPT)
    latents, texts = files("latents"), files("text")
    assert latents and texts
    second = cached("a sks toy on a table")
    assert files("latents") == latents, "the latent shards are kept as they are (same inode, same mtime)"
    new_texts = {name: stat for name, stat in files("text").items() if name not in texts}
    assert new_texts and all(files("text")[name] == stat for name, stat in texts.items())
    assert first.cache_fingerprint() == second.cache_fingerprint()
    assert "a sks toy on a table" in second.cache.text and PROMPT not in second.cache.text
