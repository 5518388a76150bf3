"""The speed levers (finetune/speed.py) train a tiny SD LoRA to the loss it has without them; fp16 on a CPU is refused
before anything loads; train.num_samples=0 / sample_every=-1 write no sample grid at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.config import ConfigError
from finetune.recipe import load_config
from finetune.train import train
from tests.helpers import REPO, reset_accelerate, run_training, tiny_ddpm_recipe
from tests.test_lora import captioned_folder, lora_recipe  # noqa: F401 - the fixture

# 6 images, batch 2: 3 batches per epoch, so 4 steps cross an epoch (persistent workers must see the new epoch)
STEPS = 4


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def run_lora(tiny_sd_dir, folder, output_dir, **sections) -> list[float]:
    recipe = lora_recipe(tiny_sd_dir, folder, output_dir)
    recipe["train"].update({"max_train_steps": STEPS, "num_samples": 0})
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return losses(run_training(recipe))


@pytest.fixture(scope="module")
def baseline(tiny_sd_dir, captioned_folder, tmp_path_factory):  # noqa: F811
    return run_lora(tiny_sd_dir, captioned_folder, tmp_path_factory.mktemp("baseline") / "run")


# option -> (sections, relative tolerance on every step's loss)
LEVERS = {
    "channels_last": ({"train": {"channels_last": True}}, 1e-4),
    "workers_persistent": ({"data": {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 1}}, 1e-6),
    "adamw_fused": ({"optim": {"adamw_implementation": "fused"}}, 1e-4),
    # 'auto' is foreach on a CPU: the loop over parameters gives the same weights to the bit (0: exact)
    "adamw_for_loop": ({"optim": {"adamw_implementation": "for_loop"}}, 0),
    # bf16 autocast on the CPU, frozen weights in bf16, LoRA weights fp32: the same loss to bf16's precision
    "bf16_on_cpu": ({"train": {"mixed_precision": "bf16"}}, 5e-2),
    # regional compilation with the cheap backend: the wiring (compile_repeated_blocks on the UNet's transformer
    # blocks, LoRA inside them, backward through them); the inductor backend is test_compile_inductor below
    "compile_aot_eager": ({"train": {"compile": True, "compile_backend": "aot_eager"}}, 1e-4),
    # the two SDPA kernels a CPU has (auto picks flash where it can): the same attention to float rounding
    "attention_math": ({"train": {"attention_backend": "math"}}, 1e-4),
    "attention_flash": ({"train": {"attention_backend": "flash"}}, 1e-4),
}


@pytest.mark.parametrize("name", list(LEVERS))
def test_lever_trains_to_the_same_loss(tiny_sd_dir, captioned_folder, tmp_path, baseline, name):  # noqa: F811
    sections, rel = LEVERS[name]
    got = run_lora(tiny_sd_dir, captioned_folder, tmp_path / "run", **sections)
    assert len(got) == len(baseline) == STEPS
    assert got == (baseline if rel == 0 else pytest.approx(baseline, rel=rel, abs=1e-6))


@pytest.mark.skipif(
    not os.environ.get("DIFFTUNE_SLOW_TESTS"),
    reason="inductor compiles C++ for the blocks on a CPU (418 s on the shared 2 cores, load ~13): set "
    "DIFFTUNE_SLOW_TESTS=1",
)
def test_compile_inductor(tiny_sd_dir, captioned_folder, tmp_path, baseline):  # noqa: F811
    got = run_lora(tiny_sd_dir, captioned_folder, tmp_path / "run", train={"compile": True})
    assert got == pytest.approx(baseline, rel=1e-3, abs=1e-6)


def test_regional_compile_compiles_the_repeated_blocks_only(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from finetune.speed import regional_compile

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    assert "repeated blocks (BasicTransformerBlock)" in regional_compile(unet, "aot_eager", None)
    compiled = [type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and set(compiled) == {"BasicTransformerBlock"}


def test_fp16_on_a_cpu_is_refused_before_loading(tiny_sd_dir, captioned_folder, tmp_path, monkeypatch):  # noqa: F811
    from finetune.methods.dreambooth import DreamBooth

    def must_not_load(self):
        raise AssertionError("the models loaded before the fp16 check")

    monkeypatch.setattr(DreamBooth, "setup", must_not_load)
    # the recipe of the bug report, as it is (mixed_precision: fp16), on a tiny model
    config = load_config(
        REPO / "finetune/recipes/sd_dreambooth_lora.yaml",
        [
            f"model.pretrained_model_name_or_path={tiny_sd_dir}",
            f"dreambooth.instance_data_dir={captioned_folder}",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    assert config.train.mixed_precision == "fp16"
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"train.mixed_precision=fp16 needs a GPU.*train.mixed_precision=bf16"):
        train(config)


@pytest.mark.parametrize("off", [{"num_samples": 0, "sample_every": 2}, {"sample_every": -1}])
def test_sampling_off_writes_no_grid(tmp_path, monkeypatch, off):
    from finetune.methods.unconditional import UnconditionalDDPM

    def must_not_sample(self, *args, **kwargs):
        raise AssertionError("sampled with sampling off")

    monkeypatch.setattr(UnconditionalDDPM, "sample", must_not_sample)
    out = run_training(tiny_ddpm_recipe(tmp_path / "run", train={"max_train_steps": 4, **off}))
    assert not (out / "samples").exists()
    assert (out / "model_index.json").is_file() and len(losses(out)) == 4


def test_bench_gpu_dry_run(tmp_path, capsys):
    """`make bench-gpu BENCH_GPU_ARGS=--dry-run`: the plan, every recipe checked, FLOPs counted on meta tensors,
    the diffusers scripts' command lines; nothing built, JSON written."""
    from benchmarks.bench_gpu import ARCHITECTURES, main

    checkout = tmp_path / "diffusers"
    for arch in ("sd15", "flux"):
        script = checkout / ARCHITECTURES[arch]["script"]
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("raise SystemExit('not run in a dry run')\n")
    out = tmp_path / "bench.json"
    argv = ["--dry-run", "--families", "sd15", "flux", "--sizes", "512", "--batches", "1", "4"]
    argv += ["--levers", "baseline", "compile", "--diffusers", str(checkout), "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    runs = report["runs"]
    # per architecture: 2 baselines, the script on each, 1 lever
    assert len(runs) == 10 and report["dry_run"] and not (tmp_path / "sd15").exists()
    assert {r["resolution"] for r in runs} == {512}  # Flux's lever too: its native 1024 px was not asked for
    assert {r["runner"] for r in runs} == {"difftune", "diffusers"}
    sd15 = {(r["batch"], r["runner"]): r["figures"] for r in runs if r["arch"] == "sd15" and r["lever"] == "baseline"}
    # SD 1.5's UNet (0.86B parameters) at 512 px: ~0.8 TFLOP forward, about twice that with the input gradients
    assert sd15[(1, "difftune")]["denoiser_params_b"] == pytest.approx(0.86, abs=0.01)
    assert 1.2 < sd15[(1, "difftune")]["step_tflop"] < 2.5
    assert sd15[(4, "difftune")]["step_tflop"] == pytest.approx(4 * sd15[(1, "difftune")]["step_tflop"])
    # the VAE's encode of a 512 px image, ~1.1 TFLOP: what a latent cache saves, at most 1.65x of SD 1.5's step
    assert sd15[(1, "difftune")]["vae_encode_tflop"] == pytest.approx(1.12, abs=0.05)
    assert sd15[(1, "difftune")]["latent_cache_ceiling"] == pytest.approx(1.65, abs=0.05)
    assert "a latent cache can make a step at most 1.65x faster" in printed
    assert "train_text_to_image_lora.py" in printed and "train_dreambooth_lora_flux.py" in printed
    assert "--train_batch_size=4" in printed and "-m finetune" in printed
    assert main(["--dry-run", "--diffusers", str(tmp_path / "nowhere"), "--json", str(out)]) == 2


def test_bench_gpu_runs_its_whole_path_on_a_cpu(tmp_path, monkeypatch, capsys):
    """`bench_gpu --cpu`: build and save the pipeline, make the data, train with difftune and with the example script
    under the same clock, print each run's figures and the ratio, write the JSON: every stage a GPU run takes (a tiny
    SD stands in for SD 1.5's full size; a stand-in script checks the arguments the real one would get)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks import bench_gpu
    from tests.tiny_models import make_tiny_sd_pipeline

    tiny = make_tiny_sd_pipeline(tmp_path / "tiny-sd")
    full_size = bench_gpu.make_pipeline  # still counts FLOPs on the meta device: nothing built

    def make_pipeline(arch, flux_blocks, t5_layers, device):
        if device == "meta":
            return full_size(arch, flux_blocks, t5_layers, device)
        return StableDiffusionPipeline.from_pretrained(tiny)

    monkeypatch.setattr(bench_gpu, "make_pipeline", make_pipeline)
    script = tmp_path / "diffusers" / bench_gpu.ARCHITECTURES["sd15"]["script"]
    script.parent.mkdir(parents=True)
    script.write_text(
        "import pathlib, sys, torch\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
        "assert (pathlib.Path(args['pretrained_model_name_or_path']) / 'unet').is_dir(), args\n"
        "assert (pathlib.Path(args['train_data_dir']) / 'metadata.jsonl').is_file(), args\n"
        "p = torch.nn.Parameter(torch.ones(2))\noptimizer = torch.optim.AdamW([p])\n"
        "for _ in range(int(args['max_train_steps'])):\n    p.sum().backward()\n    optimizer.step()\n"
    )
    out = tmp_path / "bench.json"
    argv = ["--cpu", "--families", "sd15", "--sizes", "64", "--batches", "1", "--levers", "baseline"]
    argv += ["--warmup", "1", "--steps", "2", "--diffusers", str(tmp_path / "diffusers"), "--json", str(out)]
    argv += ["--workdir", str(tmp_path)]
    assert bench_gpu.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # (on a machine with a GPU, --cpu changes nothing: the runs go to the GPU)
    assert report["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert not report["dry_run"]
    for run in report["runs"]:
        assert run["figures"]["steps"] == 3 and run["figures"]["s_per_step"] > 0, run
    assert len(report["speedups"]) == 1 and report["speedups"][0]["speedup"] > 0
    assert "diffusers s/step / difftune's" in printed and "FAILED" not in printed
    if not torch.cuda.is_available():  # without --cpu (or --dry-run) a machine without a GPU refuses, exit 2
        assert bench_gpu.main(["--families", "sd15", "--json", str(out)]) == 2


def test_channels_last_model_saves_and_checkpoints(tmp_path):
    """A whole denoiser in channels-last order (not contiguous) still saves: safetensors takes contiguous tensors."""
    from diffusers import DDPMPipeline

    recipe = tiny_ddpm_recipe(
        tmp_path / "run", train={"max_train_steps": 2, "channels_last": True}, checkpoint={"checkpointing_steps": 1}
    )
    out = run_training(recipe)
    assert (out / "checkpoint-2").is_dir()
    DDPMPipeline.from_pretrained(out)


def test_lever_options_resolve_and_check():
    import torch

    from finetune.config import DataConfig, TrainConfig
    from finetune.speed import adamw_options, dataloader_options

    assert adamw_options("auto", torch.device("cuda")) == {"fused": True}
    assert adamw_options("auto", torch.device("cpu")) == {"foreach": True}
    assert adamw_options("for_loop", torch.device("cuda")) == {"foreach": False}
    assert dataloader_options(DataConfig()) == {"num_workers": 0, "pin_memory": False}
    options = dataloader_options(DataConfig(num_workers=2, prefetch_factor=4))
    assert options["persistent_workers"] and options["prefetch_factor"] == 4
    assert options["pin_memory"] == torch.cuda.is_available()
    with pytest.raises(ConfigError, match="data.prefetch_factor .* needs data.num_workers > 0"):
        DataConfig(prefetch_factor=2)
    with pytest.raises(ConfigError, match="train.sample_every must be >= 0, or -1"):
        TrainConfig(sample_every=-2)
    assert not TrainConfig(num_samples=0).samples_on and not TrainConfig(sample_every=-1).samples_on


def test_bench_gpu_wrapper_times_every_optimizer_step(tmp_path):
    """The clock both sides of `make bench-gpu` run under: an unmodified script, one time per optimizer step."""
    from benchmarks.bench_gpu import execute

    script = tmp_path / "script.py"
    script.write_text(
        "import sys, torch\nassert sys.argv[1:] == ['--steps=5']\np = torch.nn.Parameter(torch.ones(2))\n"
        "optimizer = torch.optim.AdamW([p])\nfor _ in range(5):\n    p.sum().backward()\n    optimizer.step()\n"
    )
    figures = execute([str(script), "--steps=5"], 1, {})
    assert figures["steps"] == 5 and figures["s_per_step"] > 0, figures


def test_attention_backend_is_the_only_kernel_in_the_step(tiny_sd_dir, captioned_folder, tmp_path, monkeypatch):  # noqa: F811
    """train.attention_backend=math reaches every attention call of the step: the UNet's processors call
    F.scaled_dot_product_attention with only the math kernel allowed."""
    import torch

    original = torch.nn.functional.scaled_dot_product_attention
    allowed = []

    def recording(*args, **kwargs):
        backends = torch.backends.cuda
        allowed.append(
            (backends.math_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled())
        )
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    run_lora(tiny_sd_dir, captioned_folder, tmp_path / "run", train={"attention_backend": "math"})
    assert allowed and set(allowed) == {(True, False, False)}
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step


def test_attention_backend_the_device_cannot_run_is_refused(tiny_sd_dir, captioned_folder, tmp_path, monkeypatch):  # noqa: F811
    from finetune.methods.lora import LoraTextToImage

    def must_not_load(self):
        raise AssertionError("the models loaded before the attention backend check")

    monkeypatch.setattr(LoraTextToImage, "setup", must_not_load)
    recipe = lora_recipe(tiny_sd_dir, captioned_folder, tmp_path / "run")
    recipe["train"]["attention_backend"] = "efficient"  # CUDA only
    with pytest.raises(
        ConfigError,
        match=r"^train.attention_backend=efficient: torch has no such attention kernel "
        r"for this device \(cpu, fp32\).*one this device runs: math, flash$",
    ):
        run_training(recipe)
    with pytest.raises(ConfigError, match="train.attention_backend"):  # not one of torch's kernels
        load_config(recipe, ["train.attention_backend=xformers"])


def test_batch_bookkeeping_stays_on_the_host():
    """The loop's batch move leaves the per-example cache keys and seeds on the CPU (a method reads them with
    .tolist(): from a GPU, that waits for every queued kernel) and moves everything else."""
    import torch

    from finetune.data import HOST_KEYS, collate_examples
    from finetune.speed import batch_to_device, host_to_device

    examples = [
        {"pixel_values": torch.zeros(3, 4, 4), "row": i, "flipped": bool(i), "seed": 7 + i, "label": i, "text": "a"}
        for i in range(2)
    ]
    batch = batch_to_device(collate_examples(examples), torch.device("meta"), non_blocking=False)
    assert set(HOST_KEYS) == {"row", "flipped", "seed"}
    assert {key for key, value in batch.items() if getattr(value, "device", None) == torch.device("cpu")} == set(
        HOST_KEYS
    )
    assert batch["pixel_values"].is_meta and batch["label"].is_meta and batch["text"] == ["a", "a"]
    assert batch["seed"].tolist() == [7, 8]
    noise = torch.randn(2, 3)
    moved = host_to_device(noise, torch.device("cpu"), torch.float64)
    assert moved.dtype == torch.float64 and torch.equal(moved, noise.double())
    assert host_to_device(noise, torch.device("meta")).is_meta


def test_flux_position_ids_are_built_once_per_shape():
    import torch

    from finetune.families.flux import latent_image_ids

    first = latent_image_ids(8, 6, torch.device("cpu"), torch.float32)
    assert latent_image_ids(8, 6, torch.device("cpu"), torch.float32) is first
    assert latent_image_ids(8, 8, torch.device("cpu"), torch.float32).shape == (16, 3)
