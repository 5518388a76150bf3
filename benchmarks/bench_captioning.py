"""Captioning throughput (images/s) of ``captioning``'s BLIP code path.

Two models, both built in code because the benchmark machines have no Hub access:

* the tiny BLIP of the tests: the whole command end to end on a folder of generated images (decoding, batching,
  part files, metadata merge), plus the model alone;
* the BLIP-large architecture of ``Salesforce/blip-image-captioning-large`` (ViT-L/16 at 384 px, 24 layers, hidden
  1024; BERT-base text decoder with a 30524-token vocabulary) with random weights, model alone, at batch 8.

Random weights never emit the end-of-caption token, so every caption runs to ``--max-length`` new tokens; a trained
model usually stops after about 10, so the large-model figure is a lower bound on real throughput at equal settings.

    .venv/bin/python benchmarks/bench_captioning.py            # CPU: about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_captioning.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from captioning.caption import (  # noqa: E402 - the repository root must be importable first
    BlipCaptioner,
    CaptionOptions,
    GenerationSettings,
    caption_folder,
    load_image,
    resolve_dtype,
)
from tests.tiny_models import BLIP_VOCAB_FILE, make_test_images, make_tiny_blip  # noqa: E402

# Salesforce/blip-image-captioning-large's config.json: the vision tower is ViT-L/16 at 384 px; the text config
# sets only num_attention_heads and encoder_hidden_size, the rest are BlipTextConfig's BERT-base defaults.
BLIP_LARGE_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 16,
}
BLIP_LARGE_TEXT_CONFIG = {"num_attention_heads": 12, "encoder_hidden_size": 1024, "vocab_size": 30524}


def time_batches(captioner: BlipCaptioner, images: list, batch_size: int, batches: int, device) -> tuple[float, float]:
    """Images per second over ``batches`` batches of the same images, and CPU seconds per image.

    The CPU time (all threads of this process) is the figure to compare on a shared machine, where other processes
    take cores away and the wall-clock rate drops with them.

    On CUDA a one-image batch runs first to take kernel selection and allocator growth out of the timing; on a CPU
    those one-time costs are negligible next to a batch and the warm-up would only lengthen the run.
    """
    import torch

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        captioner.caption(images[:1])
        synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(batches):
        captioner.caption(images[:batch_size])
    synchronize()
    count = batches * batch_size
    return count / (time.perf_counter() - started), (time.process_time() - cpu_started) / count


def bench_tiny(args, device, workdir: Path) -> None:
    model_dir = make_tiny_blip(workdir / "tiny_blip")
    image_dir = workdir / "tiny_images"
    make_test_images(image_dir, args.tiny_images, size=128)
    generation = GenerationSettings(
        num_beams=args.num_beams, min_new_tokens=args.min_length, max_new_tokens=args.max_length
    )
    options = CaptionOptions(
        model=str(model_dir),
        batch_size=args.batch_size,
        generation=generation,
        device=str(device),
        dtype=args.dtype,
        show_progress=False,
    )
    summary = caption_folder(image_dir, options)
    print(
        f"tiny BLIP, whole command, {len(summary.captioned)} images of 128 px, batch {args.batch_size}: "
        f"{summary.images_per_second:.1f} images/s"
    )
    captioner = BlipCaptioner.from_pretrained(str(model_dir), device=device, dtype=args.dtype, generation=generation)
    images = [load_image(path) for path in sorted(image_dir.glob("*.png"))[: args.batch_size]]
    rate, cpu_seconds = time_batches(captioner, images, args.batch_size, batches=args.tiny_batches, device=device)
    print(f"tiny BLIP, model only, batch {args.batch_size}: {rate:.1f} images/s ({cpu_seconds:.3f} CPU s/image)")


def build_blip_large_captioner(device, dtype: str, generation: GenerationSettings, workdir: Path) -> BlipCaptioner:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    # A 30524-token vocabulary like BERT's, so the LM head and the decoding cost what they cost in the real model:
    # the vendored tiny vocabulary, padded with placeholder tokens.
    vocab = BLIP_VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    vocab += [f"[unused{index}]" for index in range(BLIP_LARGE_TEXT_CONFIG["vocab_size"] - len(vocab))]
    vocab_file = workdir / "blip_large_vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]")
    text_config = {
        **BLIP_LARGE_TEXT_CONFIG,
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = BlipConfig(vision_config=BLIP_LARGE_VISION_CONFIG, text_config=text_config)
    torch.manual_seed(0)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    model = model.to(resolve_dtype(dtype, device))
    image_processor = BlipImageProcessor(size={"height": 384, "width": 384})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return BlipCaptioner(model, processor, generation=generation)


def bench_large(args, device, workdir: Path) -> None:
    generation = GenerationSettings(
        num_beams=args.num_beams, min_new_tokens=args.min_length, max_new_tokens=args.max_length
    )
    started = time.perf_counter()
    captioner = build_blip_large_captioner(device, args.dtype, generation, workdir)
    parameters = sum(parameter.numel() for parameter in captioner.model.parameters())
    build_seconds = time.perf_counter() - started
    print(f"BLIP-large architecture: {parameters / 1e6:.0f}M parameters, built in {build_seconds:.0f} s")
    image_paths = make_test_images(workdir / "large_images", args.batch_size, size=512)
    images = [load_image(path) for path in image_paths]
    rate, cpu_seconds = time_batches(captioner, images, args.batch_size, batches=args.large_batches, device=device)
    print(
        f"BLIP-large architecture (random weights), model only, batch {args.batch_size}, {captioner.dtype}, "
        f"{args.num_beams} beams, {args.max_length} new tokens: {rate:.3f} images/s ({cpu_seconds:.1f} CPU s/image)"
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", default="auto", help="auto = float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--num-beams", type=int, default=3, help="beam search width, the command's default (3)")
    parser.add_argument("--min-length", type=int, default=5, help="minimum new tokens (default: 5)")
    parser.add_argument("--max-length", type=int, default=20, help="maximum new tokens (default: 20)")
    parser.add_argument("--tiny-images", type=int, default=32, help="images in the tiny end-to-end run (default: 32)")
    parser.add_argument("--tiny-batches", type=int, default=5, help="timed tiny model-only batches (default: 5)")
    parser.add_argument(
        "--large-batches", type=int, default=1, help="timed BLIP-large batches (default: 1; minutes each on a CPU)"
    )
    parser.add_argument("--skip-large", action="store_true", help="only benchmark the tiny model")
    args = parser.parse_args()

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"device {device} ({name}), torch {torch.__version__}, load average {load} on {os.cpu_count()} CPUs")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        bench_tiny(args, device, Path(workdir))
        if not args.skip_large:
            bench_large(args, device, Path(workdir))
    print(f"benchmark took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
