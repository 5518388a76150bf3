"""The contract every text-to-image method keeps on every model family, as one table (peft's style): a new family or
method adds rows to ROWS, not a test file of copies.

For each row: train a few steps through the real entry point; save; load the result into the family's plain diffusers
pipeline, where it changes the image (and a LoRA's unload restores it, and its kohya file reads back to the same
image through diffusers' own conversion); only the intended parameters changed; the loss with cached latents and text
embeddings equals the uncached one; and a run SIGKILLed right after its first checkpoint, resumed with `latest`,
ends with the weights of the uninterrupted run; and a bf16 run on the CPU takes the fp32 run's first step (to bf16's
precision) and draws its grid.

The checks live here; tests/test_contract_<family>.py run the rows of one family each, so that pytest-xdist's
`--dist loadfile` spreads the families over its workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.families import get_family
from tests.helpers import assert_same_tensors, reset_accelerate, run_training, safetensors_in, sd_image
from tests.test_outputs import assert_valid_card
from tests.tiny_models import (
    make_test_images,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
    make_tiny_sdxl_pipeline,
)

TRIGGER_PROMPT = "a photo of sks toy"
TOKEN = "<toy-cat>"
BUILDERS = {
    "sd": make_tiny_sd_pipeline,
    "sdxl": make_tiny_sdxl_pipeline,
    "sd-inpainting": lambda folder: make_tiny_sd_pipeline(folder, inpainting=True),
    "sdxl-inpainting": lambda folder: make_tiny_sdxl_pipeline(folder, inpainting=True),
    "sd3": make_tiny_sd3_pipeline,
    "flux": make_tiny_flux_pipeline,
}
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd-inpainting": "StableDiffusionInpaintPipeline",
    "sdxl-inpainting": "StableDiffusionXLInpaintPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@dataclass(frozen=True)
class Row:
    """One method on one family: the recipe section and what the output is."""

    name: str
    family: str
    method: str
    options: dict = field(default_factory=dict)
    output: str = "lora"  # lora | pipeline | embeddings | controlnet

    @property
    def id(self) -> str:
        return f"{self.name}-{self.family}"

    @property
    def inpainting(self) -> bool:
        """An inpainting checkpoint (any method trains one; its images come from an image and a mask)."""
        return self.family.endswith("-inpainting")

    @property
    def model_family(self):
        return get_family(self.family.removesuffix("-inpainting"))


def rows_of(family: str) -> list[Row]:
    """Every method the family supports (the family says which: textual inversion, kohya export, inpainting)."""
    capabilities = get_family(family)
    # alpha 8 != rank 4: the kohya export must carry the trained strength
    # (Flux's kohya layout fuses projections at FLUX.1's widths, which diffusers' kohya loader hard-codes: its round
    # trip is tested at those widths in tests/test_kohya_flux.py)
    kohya = capabilities.kohya_prefixes is not None and family != "flux"
    lora = {"rank": 4, "alpha": 8, "train_text_encoder": True, "export_kohya": kohya}
    dreambooth = {"instance_prompt": TRIGGER_PROMPT}
    prior = {"with_prior_preservation": True, "class_prompt": "a photo of toy", "num_class_images": 2}
    prior.update(class_inference_steps=2, sample_batch_size=2)
    # the text encoder's LoRA too, as digits_teach_dreambooth_lora.yaml trains
    dreambooth_lora = {"use_lora": True, "rank": 4, "train_text_encoder": True}
    ti = {"placeholder_token": TOKEN, "initializer_token": "toy", "num_vectors": 2}
    rows = [
        Row("lora", family, "lora", lora),
        Row("dreambooth", family, "dreambooth", {**dreambooth, "train_text_encoder": True}, output="pipeline"),
        Row("dreambooth-lora-prior", family, "dreambooth", {**dreambooth, **prior, **dreambooth_lora}),
    ]
    if capabilities.textual_inversion:
        rows.append(Row("textual-inversion", family, "textual_inversion", ti, output="embeddings"))
    if capabilities.controlnet_class:  # a ControlNet beside the frozen UNet, on captioned images with edge maps
        rows.append(Row("controlnet", family, "controlnet", output="controlnet"))
    if capabilities.inpainting_pipeline:
        # inpainting is a variant of every method: DreamBooth-LoRA on the family's inpainting checkpoint
        rows.append(Row("inpainting-lora", f"{family}-inpainting", "dreambooth", {**dreambooth, "use_lora": True}))
    return rows


# -- set-up -----------------------------------------------------------------------------------------------------------
def make_bases(root: Path, family: str) -> dict[str, Path]:
    """The tiny base models, captioned images and instance images the rows train on."""
    paths = {name: build(root / name) for name, build in BUILDERS.items() if name.split("-")[0] == family}
    captioned = root / "captioned"
    images = make_test_images(captioned, 6, size=64)
    captions = ["a red square", "a blue circle", "a green toy", "a photo of a cat", "two dots", "a toy on a table"]
    lines = [json.dumps({"file_name": p.name, "text": c}) for p, c in zip(images, captions)]
    (captioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    make_test_images(root / "instance", 4, size=64, seed=3)
    controlled = root / "controlled"  # the captioned images with Canny-like edge maps (method controlnet)
    if get_family(family).controlnet_class:
        from captioning.conditioning import build_conditioning_dataset

        shutil.copytree(captioned, controlled)
        build_conditioning_dataset(controlled)
    return {**paths, "captioned": captioned, "instance": root / "instance", "controlled": controlled, "root": root}


def recipe(row: Row, bases: dict[str, Path], output_dir: Path, steps: int = 3, **sections) -> dict:
    """A run of `steps` optimizer steps with a checkpoint after step 2; flips, caption dropout (where there are
    captions) and a cosine schedule make every piece of state matter for the final weights."""
    options = dict(row.options)
    if row.method == "dreambooth":
        options["instance_data_dir"] = str(bases["instance"])
        if options.get("with_prior_preservation"):
            options["class_data_dir"] = str(output_dir.parent / f"{output_dir.name}-class")
    dataset = bases["controlled"] if row.output == "controlnet" else bases["captioned"]
    return {
        "method": row.method,
        "model": {"pretrained_model_name_or_path": str(bases[row.family]), "family": row.family.split("-")[0]},
        "data": {"dataset": str(dataset), "resolution": 64, "random_flip": True},
        "optim": {"lr": 5e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
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
        "checkpoint": {"checkpointing_steps": 2},
        row.method: {"caption_dropout": 0.3, **options} if row.method == "lora" else options,
        **sections,
    }


# -- the checks -------------------------------------------------------------------------------------------------------
def pipeline_of(row: Row, folder: Path):
    import diffusers

    return getattr(diffusers, PIPELINES[row.family]).from_pretrained(folder)


def image(row: Row, pipe, prompt: str) -> np.ndarray:
    if row.inpainting:
        from PIL import Image

        pipe.set_progress_bar_config(disable=True)
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        return pipe(
            prompt,
            image=Image.new("RGB", (64, 64), (90, 120, 150)),
            mask_image=mask,
            num_inference_steps=2,
            generator=torch.manual_seed(0),
            output_type="np",
        ).images
    return sd_image(pipe, prompt)


def control_images(bases: dict[str, Path]) -> list[Path]:
    return sorted((bases["controlled"] / "conditioning").glob("*.png"))


def check_controlnet_loads_and_follows_its_control(row: Row, bases: dict[str, Path], out: Path) -> None:
    """The controlnet/ folder loads into the family's plain ControlNet pipeline beside the base model; it changes
    the base model's image, and two control images give two images; the command line takes it too."""
    import diffusers
    from PIL import Image

    family = row.model_family
    controlnet = diffusers.ControlNetModel.from_pretrained(out, subfolder="controlnet")
    pipe = getattr(diffusers, family.controlnet_pipeline).from_pretrained(bases[row.family], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)

    def draw(control: Image.Image) -> np.ndarray:
        kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np")
        return pipe(TRIGGER_PROMPT, image=control, generator=torch.manual_seed(0), **kwargs).images

    edges = draw(Image.open(control_images(bases)[0]).convert("RGB"))
    plain = sd_image(pipeline_of(row, bases[row.family]), TRIGGER_PROMPT)
    assert np.abs(edges - plain).max() > 1e-3, "the trained ControlNet must change the image"
    # after 3 steps the control reaches the UNet through two products of near-zero convolutions: a small effect,
    # but the same seed gives the same image bit for bit unless the control matters
    white = draw(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert np.abs(edges - white).max() > 1e-6, "another control image must give another image"
    # load_pipeline and the command line take it the same way
    from pipelines.generate import main
    from pipelines.load import load_pipeline

    loaded = load_pipeline(bases[row.family], controlnet=str(out), dtype="float32")
    assert type(loaded).__name__ == family.controlnet_pipeline
    argv = [str(bases[row.family]), "--prompt", TRIGGER_PROMPT, "--steps", "2", "--controlnet", str(out)]
    control = ["--control-image", str(control_images(bases)[0])]
    assert main([*argv, *control, "--out", str(out.parent / "generated")]) == 0
    assert (out.parent / "generated" / "0001.png").is_file()
    assert main([*argv, "--out", str(out.parent / "no-control")]) == 2, "--controlnet without --control-image"


def check_trains_saves_loads_and_changes_the_image(row: Row, bases: dict[str, Path], out: Path) -> None:
    from diffusers.training_utils import free_memory

    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert losses and all(np.isfinite(losses)), losses
    card = (out / "README.md").read_text()
    if row.output == "controlnet":
        facts = ["ControlNetModel.from_pretrained", 'subfolder="controlnet"', row.model_family.controlnet_pipeline]
        facts += ["**Licence:** Inherits the licence of the base model", row.model_family.license_note]
        assert all(fact in card for fact in facts), [fact for fact in facts if fact not in card]
        assert (out / "samples" / "final.png").is_file()
        check_controlnet_loads_and_follows_its_control(row, bases, out)
        free_memory()
        return
    assert PIPELINES[row.family] in card, "the card shows how to load it with the family's pipeline"
    facts = {"lora": ["load_lora_weights"], "pipeline": [".from_pretrained"], "embeddings": [TOKEN]}[row.output]
    facts += ["**Licence:** Inherits the licence of the base model", row.model_family.license_note]
    if row.method == "dreambooth":
        facts += ["`sks`", "learning rate"]
        facts += ["prior preservation"] if "with_prior_preservation" in row.options else []
    assert all(fact in card for fact in facts), [fact for fact in facts if fact not in card]
    meta = assert_valid_card(out / "README.md")  # every family's licence, the task, no placeholder
    assert meta["license"] == row.model_family.license and meta["pipeline_tag"] in ("text-to-image", "image-to-image")
    if row.method == "dreambooth":  # the prompt the subject was trained under, in the metadata and the usage line
        assert meta["instance_prompt"] == TRIGGER_PROMPT and f'pipe("{TRIGGER_PROMPT}"' in card
    assert (out / "samples" / "final.png").is_file()
    prompt = TRIGGER_PROMPT if row.method != "textual_inversion" else f"a photo of a {TOKEN}"
    pipe = pipeline_of(row, bases[row.family])
    before = image(row, pipe, prompt)
    if row.output == "pipeline":
        after = image(row, pipeline_of(row, out), prompt)
    elif row.output == "embeddings":
        from pipelines.load import load_embeddings

        load_embeddings(pipe, str(out))
        after = image(row, pipe, prompt)
    else:
        pipe.load_lora_weights(out)
        after = image(row, pipe, prompt)
        if row.options.get("export_kohya"):
            # the kohya / WebUI file, read back by diffusers' own kohya conversion: the same image
            pipe.unload_lora_weights()
            pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
            np.testing.assert_allclose(image(row, pipe, prompt), after, atol=2e-3)
            kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
            alphas = {k: v.item() for k, v in kohya.items() if k.endswith(".alpha")}
            assert alphas and set(alphas.values()) == {float(row.options["alpha"])}
            prefixes = {k.split("_", 2)[1] for k in kohya}  # unet, te / te1, te2
            assert prefixes == ({"unet", "te1", "te2"} if row.family == "sdxl" else {"unet", "te"}), prefixes
        pipe.unload_lora_weights()
        np.testing.assert_allclose(image(row, pipe, prompt), before, atol=1e-5)
    assert np.abs(after - before).max() > 1e-3, "the trained output must change the image"
    if not row.inpainting:  # the command line takes the output the same way on every family
        from pipelines.generate import main

        adapter = {"lora": ["--lora", f"{out}:0.8"], "embeddings": ["--embeddings", str(out)], "pipeline": []}
        model = out if row.output == "pipeline" else bases[row.family]
        argv = [str(model), "--prompt", prompt, "--steps", "2", "--height", "64", "--width", "64"]
        assert main([*argv, *adapter[row.output], "--out", str(out.parent / "generated")]) == 0
        assert (out.parent / "generated" / "0001.png").is_file()
    free_memory()


def check_only_intended_parameters_changed(row: Row, bases: dict[str, Path], out: Path) -> None:
    # what the checkpoint holds: the trained parameters of each trained module, one file per module
    files = [load_file(str(p)) for p in sorted((out / "checkpoint-2").glob("trainable_*.safetensors"))]
    trained = {key: value for state in files for key, value in state.items()}
    base = bases[row.family]
    if row.output == "controlnet":
        # only the ControlNet trains (the UNet, VAE and text encoders stay the base's: nothing of theirs is saved),
        # and its zero convolutions left zero
        import diffusers

        unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet")
        vae = diffusers.AutoencoderKL.from_pretrained(base / "vae")
        initial = row.model_family.make_controlnet(unet, vae).state_dict()
        assert len(files) == 1 and set(trained) == set(initial), sorted(set(trained) ^ set(initial))[:5]
        assert [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(("checkpoint", "samples"))] == [
            "controlnet"
        ]
        zero = [k for k in initial if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
        assert zero and all(not initial[k].any() for k in zero), "from_unet starts with zero convolutions"
        assert all(trained[k].any() for k in zero if k.endswith("weight")), "the zero convolutions trained"
        return
    if row.output == "lora":
        assert trained and all("lora_" in key for key in trained), "only LoRA layers train"
        text_keys = [k for k in load_file(str(out / "pytorch_lora_weights.safetensors")) if k.startswith("text_enc")]
        assert bool(text_keys) == bool(row.options.get("train_text_encoder")), text_keys[:3]
        if row.options.get("train_text_encoder"):  # each CLIP encoder the family's pipeline loads a LoRA into
            trained_encoders = {k.split(".")[0] for k in text_keys}
            assert trained_encoders == set(row.model_family.trainable_text_encoder_names()), trained_encoders
    elif row.output == "pipeline":
        # the trained denoiser (and text encoders) differ from the base; the VAE is the base's, bit for bit
        denoiser = row.model_family.denoiser
        for component, should_change in ((denoiser, True), ("vae", False), ("text_encoder", True)):
            ours = safetensors_in(out / component)
            theirs = safetensors_in(base / component)
            assert ours.keys() == theirs.keys() and all(v.dtype == torch.float32 for v in ours.values())
            changed = any(not torch.equal(ours[k], theirs[k]) for k in ours)
            assert changed == should_change, component
    else:  # textual inversion: every embedding row but the new ones is the base's, in every text encoder
        saved = load_file(str(out / "learned_embeds.safetensors"))
        assert len(files) == (2 if row.family == "sdxl" else 1), "one trained embedding matrix per text encoder"
        assert all(len(state) == 1 for state in files), [list(state) for state in files]
        assert all(value.shape[0] == 2 for value in saved.values()), "num_vectors rows per encoder"
        from transformers import CLIPTextModel

        original = CLIPTextModel.from_pretrained(base / "text_encoder").get_input_embeddings().weight
        (matrix,) = files[0].values()  # the first text encoder's
        assert torch.equal(matrix[: len(original)], original), "the existing rows never move"
        assert not torch.equal(matrix[len(original) :], original[[0, 0]]), "the new rows learned"


def check_cached_equals_uncached(row: Row, bases: dict[str, Path], root: Path) -> None:
    """The same examples give the same loss whether latents and text embeddings come from the cache or not."""
    from accelerate import Accelerator

    from finetune.data import collate_examples
    from finetune.methods import get_method_class
    from finetune.recipe import load_config

    losses = {}
    for mode in ("none", "memory"):
        reset_accelerate()
        config = load_config(recipe(row, bases, root / f"cache-{mode}"), [f"{row.method}.cache={mode}"])
        method = get_method_class(row.method)(config, Accelerator(cpu=True))
        method.setup()
        method.before_training(None)
        batch = collate_examples([method.train_dataset[i] for i in range(4)])
        torch.manual_seed(0)
        loss = method.loss(batch)[0]
        losses[mode] = loss.item()
        if row.output == "controlnet" and mode == "none":  # gradients reach the ControlNet, never the UNet
            loss.backward()
            assert all(p.grad is None and not p.requires_grad for p in method.unet.parameters())
            assert all(p.grad is not None for p in method.controlnet.parameters())
    assert abs(losses["none"] - losses["memory"]) < 1e-5, losses


def killed_after_the_first_checkpoint(recipe: dict) -> None:
    """Run in a child process: train, and SIGKILL the process as soon as the first checkpoint is complete."""
    from finetune import checkpoint

    original = checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_checkpoint = save_then_die
    import finetune.train

    finetune.train.ckpt.save_checkpoint = save_then_die
    run_training(recipe)


def check_sigkill_and_resume_equal_an_uninterrupted_run(row: Row, bases: dict[str, Path], straight: Path) -> None:
    """A real SIGKILL right after checkpoint-2, from a fork server that imported torch and diffusers once (a fork of
    pytest could inherit a lock held by one of its threads)."""
    import multiprocessing

    killed = straight.parent / f"{straight.name}-killed"
    if row.options.get("with_prior_preservation"):  # the class images the straight run generated are reused
        shutil.copytree(straight.parent / f"{straight.name}-class", killed.parent / f"{killed.name}-class")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["finetune.train", "finetune.methods.dreambooth", __name__])
    process = context.Process(target=killed_after_the_first_checkpoint, args=(recipe(row, bases, killed),))
    process.start()
    process.join(timeout=300)
    if process.exitcode is None:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL, f"the run ended with exit code {process.exitcode}, not by SIGKILL"
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = run_training(recipe(row, bases, killed), "checkpoint.resume_from_checkpoint=latest")
    theirs = {k: v for k, v in safetensors_in(straight).items() if "class_images" not in k}
    ours = {k: v for k, v in safetensors_in(resumed).items() if "class_images" not in k}
    assert_same_tensors(ours, theirs, atol=0)


def check_bf16_on_a_cpu_takes_the_same_first_step(row: Row, bases: dict[str, Path], straight: Path) -> None:
    """train.mixed_precision=bf16 on a CPU (bf16 autocast, frozen weights in bf16): the first step's loss is the fp32
    run's to bf16's precision, whichever module trains, and the final grid is drawn (a frozen bf16 UNet beside a
    trained text encoder or ControlNet once met fp32 inputs there)."""
    bf16 = recipe(row, bases, bases["root"] / row.id / "bf16", steps=1)
    bf16["train"]["mixed_precision"] = "bf16"
    bf16["checkpoint"] = {"checkpointing_steps": 0}
    out = run_training(bf16)
    (first, *_), (ours,) = (
        [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]
        for folder in (straight, out)
    )
    assert np.isfinite(ours) and abs(ours - first) <= 5e-2 * abs(first), (ours, first)
    assert (out / "samples" / "final.png").is_file()


def check_row(row: Row, bases: dict[str, Path]) -> None:
    root = bases["root"] / row.id
    straight = run_training(recipe(row, bases, root / "run"))
    check_trains_saves_loads_and_changes_the_image(row, bases, straight)
    check_only_intended_parameters_changed(row, bases, straight)
    if not row.inpainting:  # the inpainting loss uses the pixels every step (the masked image)
        check_cached_equals_uncached(row, bases, root)
    check_sigkill_and_resume_equal_an_uninterrupted_run(row, bases, straight)
    check_bf16_on_a_cpu_takes_the_same_first_step(row, bases, straight)
