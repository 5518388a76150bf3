"""Textual Inversion on a tiny Stable Diffusion: only the new embedding rows train, the output loads into a plain
pipeline and changes its images, and bad inputs fail before training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune.config import ConfigError
from finetune.recipe import load_config
from tests.helpers import reset_accelerate, run_training, sd_image
from tests.tiny_models import make_test_images

TOKEN = "<toy-cat>"
PROMPT = f"a photo of a {TOKEN}"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    make_test_images(folder, 4, size=64)
    return folder


def ti_recipe(base, data, output_dir, **options):
    return {
        "method": "textual_inversion",
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"dataset": str(data), "resolution": 64, "random_flip": True},
        # a large lr and weight decay: without the restore, every row the prompts touch would move
        "optim": {"lr": 5e-2, "lr_scheduler": "constant", "weight_decay": 0.1},
        "diffusion": {"num_inference_steps": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_train_steps": 3,
            "train_batch_size": 2,
            "log_every": 1,
            "num_samples": 1,
            "report_to": "jsonl",
            "progress_bar": False,
        },
        "checkpoint": {"checkpointing_steps": 0},
        "textual_inversion": {"placeholder_token": TOKEN, "initializer_token": "toy", **options},
    }


@pytest.mark.parametrize("user", [None, "true"])
def test_the_step_tokenizes_without_the_tokenizer_thread_pool(tiny_sd_dir, image_folder, tmp_path, monkeypatch, user):
    """Every step tokenizes its prompts as a batch: with the tokenizers library's thread pool on, its threads spun
    beside the step's torch threads (TI was 7% slower per step than diffusers' script). Off from the first tokenizer
    call on (TOKENIZERS_PARALLELISM=false), unless the user set it."""
    from finetune.methods.textual_inversion import TextualInversion

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "before-the-test")  # (undone last: the environment as it was)
    if user is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", user)
    seen = []
    encode_text = TextualInversion.encode_text

    def encode_and_look(self, texts):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return encode_text(self, texts)

    monkeypatch.setattr(TextualInversion, "encode_text", encode_and_look)
    recipe = ti_recipe(tiny_sd_dir, image_folder, tmp_path / "out")
    recipe["train"].update(max_train_steps=1, num_samples=0)
    run_training(recipe)
    assert seen and set(seen) == {user or "false"}


def generate(pipe, prompt=PROMPT):
    return sd_image(pipe, prompt)


def test_only_new_rows_train_and_the_embedding_loads_into_a_plain_pipeline(
    tiny_sd_dir, image_folder, tmp_path, monkeypatch
):
    from finetune.methods.textual_inversion import TextualInversion

    seen = {"moved_before_restore": 0.0}
    original_restore, original_save = TextualInversion.after_optimizer_step, TextualInversion.save

    def restore_and_look(self, step):
        weight = self.embedding_weights()["text_encoder"].detach()
        others = torch.ones(len(weight), dtype=torch.bool)
        others[self.placeholder_ids["text_encoder"]] = False
        moved = (weight[others] - self.original_embeddings["text_encoder"][others]).abs().max().item()
        seen["moved_before_restore"] = max(seen["moved_before_restore"], moved)
        return original_restore(self, step)

    def save_and_look(self, output_dir):
        seen["text_encoder"] = {k: v.detach().clone() for k, v in self.unwrap(self.text_encoder).state_dict().items()}
        seen["unet"] = {k: v.detach().clone() for k, v in self.unwrap(self.unet).state_dict().items()}
        seen["ids"] = list(self.placeholder_ids["text_encoder"])
        return original_save(self, output_dir)

    monkeypatch.setattr(TextualInversion, "after_optimizer_step", restore_and_look)
    monkeypatch.setattr(TextualInversion, "save", save_and_look)
    out = run_training(ti_recipe(tiny_sd_dir, image_folder, tmp_path / "run", num_vectors=2, cache="memory"))

    # the full embedding matrix after a real run: the old rows are bit-identical, only the new rows moved
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    old = base.text_encoder.get_input_embeddings().weight
    embedding_name = next(n for n, p in base.text_encoder.named_parameters() if p is old)
    trained = seen["text_encoder"][embedding_name]
    assert trained.shape == (len(old) + 2, old.shape[1]) and seen["ids"] == [len(old), len(old) + 1]
    assert seen["moved_before_restore"] > 1e-4, "the optimizer moved other rows (the restore is what undoes it)"
    torch.testing.assert_close(trained[: len(old)], old.detach(), rtol=0, atol=0)
    initializer = old[base.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert all((trained[i] - initializer).abs().max() > 1e-4 for i in seen["ids"]), "the new rows must learn"
    for name, value in base.text_encoder.state_dict().items():
        if name != embedding_name:
            torch.testing.assert_close(seen["text_encoder"][name], value, rtol=0, atol=0)
    for name, value in base.unet.state_dict().items():
        torch.testing.assert_close(seen["unet"][name], value, rtol=0, atol=0)

    # learned_embeds.safetensors = {token: [num_vectors, dim]}, and a plain pipeline loads it
    embeds = load_file(str(out / "learned_embeds.safetensors"))
    assert list(embeds) == [TOKEN] and embeds[TOKEN].shape == (2, old.shape[1])
    torch.testing.assert_close(embeds[TOKEN], trained[seen["ids"]], rtol=0, atol=0)
    before = generate(base)
    base.load_textual_inversion(out)
    assert f"{TOKEN}_1" in base.tokenizer.get_vocab()
    after = generate(base)
    assert np.abs(after - before).max() > 1e-3, "the embedding must change the image"

    card = (out / "README.md").read_text()
    for expected in (
        TOKEN,
        "load_textual_inversion",
        "| method | textual_inversion |",
        "num_vectors: 2",
        str(tiny_sd_dir),
    ):
        assert expected in card, expected
    assert (out / "samples" / "final.png").is_file()


def make_method(recipe):
    from accelerate import Accelerator

    from finetune.methods import get_method_class

    reset_accelerate()
    config = load_config(recipe)
    return get_method_class(config.method)(config, Accelerator(cpu=True))


def test_captions_with_the_placeholder_are_expanded_and_latents_cached(tiny_sd_dir, tmp_path):
    folder = tmp_path / "captioned"
    paths = make_test_images(folder, 2, size=64)
    with open(folder / "metadata.jsonl", "w") as handle:
        for path in paths:
            handle.write(json.dumps({"file_name": path.name, "text": f"{TOKEN} on a table"}) + "\n")
    method = make_method(
        ti_recipe(tiny_sd_dir, folder, tmp_path / "run", num_vectors=3, use_captions=True, cache="memory")
    )
    method.setup()
    method.before_training(None)
    assert method.train_dataset[0]["text"] == f"{TOKEN} {TOKEN}_1 {TOKEN}_2 on a table"
    assert len(method.cache.moments) == 4 and not method.cache.text, "latents cached, text embeddings not"
    assert set(method.trainable_modules()) == {"text_encoder"}
    assert [p.shape for p in method.trainable_parameters()] == [method.embedding_weights()["text_encoder"].shape]

    templated = make_method(ti_recipe(tiny_sd_dir, folder, tmp_path / "t", learnable_property="style"))
    templated.setup()
    texts = {templated.train_dataset[i]["text"] for i in range(len(templated.train_dataset))}
    assert all(text.endswith(f"in the style of {TOKEN}") for text in texts)


def test_bad_inputs_fail_before_training(tiny_sd_dir, image_folder, tmp_path, monkeypatch):
    folder = tmp_path / "captioned"
    paths = make_test_images(folder, 2, size=64)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, path in enumerate(paths):
            handle.write(json.dumps({"file_name": path.name, "text": f"a toy {i}" if i else f"a {TOKEN}"}) + "\n")

    def no_models(*args, **kwargs):
        raise AssertionError("the models must not load before the data is checked")

    with monkeypatch.context() as patch:
        patch.setattr("finetune.families.base.Family.load", no_models)
        with pytest.raises(
            ConfigError, match=r"1 caption\(s\) do not contain the placeholder '<toy-cat>', e.g. 'a toy 1'"
        ):
            run_training(ti_recipe(tiny_sd_dir, folder, tmp_path / "a", use_captions=True))
    assert not (tmp_path / "a").exists()

    with pytest.raises(
        ConfigError,
        match=r"'square' must be a single token of the base model's tokenizer, but it becomes 4: "
        r"\['s', 'qu', 'ar', 'e</w>'\]",
    ):
        run_training(
            ti_recipe(tiny_sd_dir, image_folder, tmp_path / "b"), "textual_inversion.initializer_token=square"
        )
    with pytest.raises(ConfigError, match="'toy' is an existing word"):
        run_training(ti_recipe(tiny_sd_dir, image_folder, tmp_path / "c"), "textual_inversion.placeholder_token=toy")
    with pytest.raises(ConfigError, match="placeholder_token is required"):
        load_config(ti_recipe(tiny_sd_dir, image_folder, tmp_path / "d", placeholder_token=None))
    with pytest.raises(ConfigError, match="has no '\\{\\}' where the placeholder goes"):
        load_config(ti_recipe(tiny_sd_dir, image_folder, tmp_path / "e", templates=["a photo of it"]))
    assert not any((tmp_path / name).exists() for name in "bcde")
