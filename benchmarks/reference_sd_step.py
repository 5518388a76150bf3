"""The per-step work of the diffusers example scripts, standalone, for a side-by-side speed and memory reference.

The example scripts themselves (examples/text_to_image/train_text_to_image_lora.py, examples/dreambooth/
train_dreambooth_lora.py, examples/textual_inversion/textual_inversion.py) are not installed with diffusers and
cannot be downloaded here, and they import torchvision, which has no CPU build on these machines. This script does
what their training steps do, with the same libraries and no difftune code, so that `bench_sd.py` can time both in
one run on the same machine:

- data: a `datasets` image folder (LoRA) or PIL-opened instance images (DreamBooth, Textual Inversion), decoded,
  resized, cropped, flipped and tokenized every step in the DataLoader (PIL + numpy for torchvision's transforms);
- every step: VAE encode and posterior sample, noise and timesteps, `add_noise`, the text encoder on the token ids,
  the UNet, MSE to the noise, `accelerator.backward`, gradient clipping (LoRA scripts), AdamW step, LR scheduler
  step, `zero_grad`, the loss gathered for logging; Textual Inversion also restores every embedding row but the new
  token's after the step, as its script does.

    python benchmarks/reference_sd_step.py --method lora --base PIPELINE_DIR --data IMAGE_DIR --steps 18

Prints one JSON line: the median seconds per step after the warm-up steps and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OBJECT_TEMPLATES = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a photo of the {}"]


def pil_transform(image: Image.Image, resolution: int, random_flip: bool) -> torch.Tensor:
    """Resize (shorter side), center crop, random flip, to [-1, 1] CHW: torchvision's Compose in the scripts."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class FolderDataset(torch.utils.data.Dataset):
    """Images of a folder, opened and transformed on every access, with one prompt each."""

    def __init__(self, folder: Path, tokenizer, resolution: int, prompts, random_flip: bool = True):
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        self.tokenizer, self.resolution, self.prompts, self.random_flip = tokenizer, resolution, prompts, random_flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        prompt = self.prompts(path)
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        with Image.open(path) as image:
            pixels = pil_transform(image, self.resolution, self.random_flip)
        return {"pixel_values": pixels, "input_ids": ids}


def imagefolder_dataset(folder: Path, tokenizer, resolution: int):
    """train_text_to_image_lora.py: `load_dataset("imagefolder")`, captions, `with_transform` at access time."""
    from datasets import Dataset

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    dataset = Dataset.from_dict(
        {"image": [str(p) for p in paths], "text": [p.with_suffix(".txt").read_text().strip() for p in paths]}
    )

    def preprocess(examples):
        images = []
        for path in examples["image"]:
            with Image.open(path) as image:
                images.append(pil_transform(image, resolution, True))
        ids = tokenizer(
            examples["text"],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": images, "input_ids": list(ids)}

    return dataset.with_transform(preprocess)


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
        "input_ids": torch.stack([torch.as_tensor(e["input_ids"]) for e in examples]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=["lora", "dreambooth_lora", "textual_inversion"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    random.seed(0)
    accelerator = Accelerator()
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)

    data = Path(args.data)
    if args.method == "textual_inversion":
        placeholder = "<sks>"
        tokenizer.add_tokens([placeholder])
        placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
        initializer_id = tokenizer.encode("toy", add_special_tokens=False)[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeddings = text_encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[placeholder_id] = embeddings.weight[initializer_id].clone()
        embeddings.requires_grad_(True)
        text_encoder.train()
        trained, params = text_encoder, list(embeddings.parameters())
        original = embeddings.weight.data.clone()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[placeholder_id] = False
        dataset = FolderDataset(
            data, tokenizer, args.resolution, lambda _: random.choice(OBJECT_TEMPLATES).format(placeholder)
        )
    else:
        unet.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        trained, params = unet, [p for p in unet.parameters() if p.requires_grad]
        if args.method == "lora":
            dataset = imagefolder_dataset(data, tokenizer, args.resolution)
        else:
            dataset = FolderDataset(data, tokenizer, args.resolution, lambda _: "a photo of sks toy")

    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=0, drop_last=True
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    trained, optimizer, loader, lr_scheduler = accelerator.prepare(trained, optimizer, loader, lr_scheduler)
    if args.method == "textual_inversion":
        text_encoder = trained
    else:
        unet = trained

    # a step's time runs from the end of the previous step, so it includes loading the batch (as the loop's does)
    durations, step, last = [], 0, time.perf_counter()
    while step < args.warmup + args.steps:
        for batch in loader:
            with accelerator.accumulate(trained):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
                accelerator.gather(loss.repeat(args.batch_size)).mean().item()  # the scripts' train_loss log
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.method != "textual_inversion":
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if args.method == "textual_inversion":
                    with torch.no_grad():
                        weight = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
                        weight[keep] = original[keep]
            now = time.perf_counter()
            durations.append(now - last)
            last, step = now, step + 1
            if step >= args.warmup + args.steps:
                break
    print(
        json.dumps(
            {
                "method": args.method,
                "s_per_step": statistics.median(durations[args.warmup :]),
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
