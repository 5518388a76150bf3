"""Tiny models built in code, for tests and examples that cannot download weights.

Every builder saves a complete folder with ``save_pretrained`` (safetensors) that the plain diffusers/transformers
class loads with ``from_pretrained``, so code under test goes through exactly the loading path a real checkpoint
takes. Builders seed inside a forked RNG: the same seed gives the same weights, and the caller's RNG is untouched.

Heavy libraries are imported inside the builders so that a test needing only images or the tokenizer does not pay
for importing diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR: Path = ASSETS_DIR / "clip_tokenizer"
BLIP_VOCAB_FILE: Path = ASSETS_DIR / "blip_vocab" / "vocab.txt"

CLIP_MAX_LENGTH = 77
TINY_SD_RESOLUTION = 64  # the VAE halves it: 32 px latents, the UNet's sample_size
TINY_TEXT_HIDDEN_SIZE = 32
TINY_BLIP_IMAGE_SIZE = 32
# With BLIP's default init (std 0.02) the tiny decoder's cross-attention barely moves the logits and every image gets
# the same caption; std 0.1 makes captions depend on the image, so tests can tell captions of different files apart.
CROSS_ATTENTION_VISIBLE_INIT_STD = 0.1

# The scheduler betas of Stable Diffusion 1.x. steps_offset=1 avoids diffusers' deprecation rewrite of the config;
# these keys are also what DDPMScheduler.from_pretrained(folder, subfolder="scheduler") needs for training.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def load_tiny_clip_tokenizer() -> CLIPTokenizer:
    """The vendored byte-level BPE CLIP tokenizer (813 tokens; "toy" is one token, "square" is several)."""
    from transformers import CLIPTokenizer

    # model_max_length must be explicit: transformers otherwise defaults it to ~1e30 and pipelines overflow.
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=CLIP_MAX_LENGTH)


def make_tiny_sd_pipeline(out_dir: str | Path, *, inpainting: bool = False, seed: int = 0) -> Path:
    """Save a ~2M-parameter Stable Diffusion 1.x-shaped pipeline (64 px images, 32 px latents) to ``out_dir``.

    With ``inpainting=True`` the UNet takes 9 input channels (latents, mask, masked-image latents) and the folder is
    a ``StableDiffusionInpaintPipeline``.
    """
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    tokenizer = load_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_RESOLUTION // 2,
            in_channels=9 if inpainting else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_TEXT_HIDDEN_SIZE,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _tiny_vae(latent_channels: int = 4, **config):
    """The tiny AutoencoderKL: 2 levels (a 64 px image is a 32 px latent), 4 latent channels for SD/SDXL; `config`
    adds the SD3/Flux settings (16 channels, scaling and shift factors, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=TINY_SD_RESOLUTION,
        **config,
    )


def _tiny_clip_config(tokenizer, hidden_size: int = TINY_TEXT_HIDDEN_SIZE):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden_size,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_sdxl_pipeline(out_dir: str | Path, *, inpainting: bool = False, seed: int = 0) -> Path:
    """Save an SDXL-shaped pipeline (~2M parameters, 64 px images) to ``out_dir``: two CLIP text encoders (the second
    with a projection, whose pooled output joins the time ids in the UNet's `text_time` added embedding), the
    penultimate hidden states of both concatenated as the cross-attention input, as in StableDiffusionXLPipeline.
    With ``inpainting=True`` the UNet takes 9 input channels and the folder is a StableDiffusionXLInpaintPipeline."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tokenizer = load_tiny_clip_tokenizer()
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer))
        unet = UNet2DConditionModel(
            sample_size=TINY_SD_RESOLUTION // 2,
            in_channels=9 if inpainting else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * TINY_TEXT_HIDDEN_SIZE,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 time ids (original size, crop top-left, target size) + the pooled text embedding of encoder 2
            projection_class_embeddings_input_dim=6 * time_embed_dim + TINY_TEXT_HIDDEN_SIZE,
        )
        vae = _tiny_vae()
    scheduler = EulerDiscreteScheduler(
        **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")},
        timestep_spacing="leading",
    )
    pipeline_class, extra = StableDiffusionXLPipeline, {}
    if inpainting:
        pipeline_class, extra = StableDiffusionXLInpaintPipeline, {"requires_aesthetics_score": False}
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=load_tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        **extra,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# T5 words: the prompts the tests use. Any other ASCII word is spelt from single characters; other characters (emoji,
# accents) become <unk>, as in the real T5 vocabulary, whose SentencePiece model has no byte fallback.
T5_WORDS = """
a an the of in on with and by at to for from is photo picture image drawing painting rendering sketch style art
sks toy cat dog digit handwritten red green blue yellow black white small large circle triangle shape background
""".split()
METASPACE = "\u2581"  # "▁", SentencePiece's word-start mark
T5_MAX_LENGTH = 512  # what SD3/Flux pipelines allow as max_sequence_length
TINY_T5_HIDDEN_SIZE = 96  # >= the two SD3 CLIP widths together (32 + 48): SD3 zero-pads the CLIP states to it
TINY_FLOW_RESOLUTION = 32  # the VAE halves it: 16 px latents; Flux packs them into 8x8 = 64 tokens
# The FLUX.1-dev scheduler config: shift is set but unused, use_dynamic_shifting shifts by the image's token count.
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def make_tiny_t5_tokenizer():
    """A T5TokenizerFast built in code: a `tokenizers` Unigram model over T5_WORDS (as "▁word") and the printable
    ASCII characters, a Metaspace pre-tokenizer, </s> appended; ids pad 0, eos 1, unk 2 as in T5."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Unigram scores are log-probabilities: a whole word (-1) beats spelling it from characters (-5 each).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (METASPACE, -2.0)]
    vocab += [(character, -5.0) for character in string.ascii_letters + string.digits + string.punctuation]
    vocab += [(METASPACE + word, -1.0) for word in T5_WORDS]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    # extra_ids=0: no <extra_id_N> sentinels, which only T5's span-corruption pretraining uses
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )


def _tiny_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_T5_HIDDEN_SIZE,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def make_tiny_sd3_pipeline(out_dir: str | Path, *, seed: int = 0, with_t5: bool = True) -> Path:
    """Save a Stable Diffusion 3-shaped pipeline to ``out_dir``: 32 px images, 16 latent channels, ~0.9M parameters
    (most in the VAE; the transformer has 84k).

    SD3Transformer2DModel (patch 2, 2 layers); CLIP-L- and CLIP-G-like CLIPTextModelWithProjection of different widths
    (32 and 48: their penultimate states are concatenated and zero-padded to T5's width, their pooled outputs
    concatenated into pooled_projection_dim 80) and a T5EncoderModel; FlowMatchEulerDiscreteScheduler with shift 3.0;
    a VAE with SD3's scaling and shift factors. ``with_t5=False`` saves the folder without text_encoder_3/tokenizer_3
    (SD3 runs without T5, with zeros in its place); diffusers still requires
    ``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`` to load it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tokenizer = load_tiny_clip_tokenizer()
    t5_tokenizer = make_tiny_t5_tokenizer()
    clip_widths = (TINY_TEXT_HIDDEN_SIZE, 48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, clip_widths[0]))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, clip_widths[1]))
        # built even when left out, so that the other components get the same weights with or without T5
        text_encoder_3 = _tiny_t5_encoder(t5_tokenizer)
        transformer = SD3Transformer2DModel(
            sample_size=TINY_FLOW_RESOLUTION // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=TINY_T5_HIDDEN_SIZE,
            caption_projection_dim=4 * 8,  # the transformer's width, heads x head dim
            pooled_projection_dim=sum(clip_widths),
            pos_embed_max_size=32,  # in patches: images up to 128 px
        )
        # the SD3 VAE's factors (stabilityai/stable-diffusion-3-medium-diffusers); the pipeline's decode needs a shift
        vae = _tiny_vae(
            16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3 if with_t5 else None,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_flux_pipeline(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a Flux.1-dev-shaped pipeline to ``out_dir``: 32 px images, 16 latent channels, ~0.9M parameters (most in
    the VAE; the transformer has 0.1M).

    FluxTransformer2DModel with guidance_embeds (1 double-stream and 2 single-stream blocks, head dim 16 =
    axes_dims_rope 4 + 6 + 6, 64 input channels = 16 latent channels packed 2x2); CLIPTextModel (its pooled output
    only) and T5EncoderModel (the sequence); Flux's dynamically shifting scheduler; a VAE with Flux's scaling and shift
    factors."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    tokenizer = load_tiny_clip_tokenizer()
    t5_tokenizer = make_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
        text_encoder_2 = _tiny_t5_encoder(t5_tokenizer)
        transformer = FluxTransformer2DModel(
            patch_size=1,  # the pipeline packs 2x2 latent patches itself
            in_channels=4 * 16,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_T5_HIDDEN_SIZE,
            pooled_projection_dim=TINY_TEXT_HIDDEN_SIZE,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        # the FLUX.1 VAE's factors (black-forest-labs/FLUX.1-dev)
        vae = _tiny_vae(
            16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        )
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_unet2d(resolution: int = 8, channels: int = 1, num_class_embeds: int | None = None, seed: int = 0):
    """A tiny pixel-space UNet2DModel ((16, 32) channels, no attention), optionally with class embeddings; built from
    its own seed without touching the global RNG."""
    import torch
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=num_class_embeds,
        )


def make_tiny_ddpm_pipeline(out_dir: str | Path, *, resolution: int = 16, channels: int = 1, seed: int = 0) -> Path:
    """Save a tiny pixel-space ``DDPMPipeline`` (UNet2DModel (16, 32) channels, no attention) to ``out_dir``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    out_dir = Path(out_dir)
    unet = make_tiny_unet2d(resolution, channels, seed=seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        out_dir, safe_serialization=True
    )
    return out_dir


def _blip_image_processor_class():
    import transformers

    # transformers 5 splits image processors into a torchvision and a PIL backend; BlipImageProcessor falls back to
    # the PIL one with a warning when torchvision is missing (as on the CPU test machines), so ask for it directly.
    if getattr(transformers, "BlipImageProcessorPil", None) is not None:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return transformers.BlipImageProcessorPil
    return transformers.BlipImageProcessor


def make_tiny_blip(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``BlipForConditionalGeneration`` and its ``BlipProcessor`` (32 px images) to ``out_dir``.

    The text config's bos is ``[DEC]``, as in the real BLIP captioning checkpoints: ``generate`` starts every caption
    with it and stops at ``[SEP]``.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    out_dir = Path(out_dir)
    # [ENC] (image-text matching) is special in BLIP too, so skip_special_tokens drops it from decoded captions.
    tokenizer = BertTokenizer(str(BLIP_VOCAB_FILE), bos_token="[DEC]", extra_special_tokens=["[ENC]"])
    vision_hidden_size = 32
    config = BlipConfig(
        vision_config={
            "hidden_size": vision_hidden_size,
            "intermediate_size": 37,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_BLIP_IMAGE_SIZE,
            "patch_size": 8,
            "initializer_range": 0.02,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": vision_hidden_size,
            "intermediate_size": 37,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "initializer_range": CROSS_ATTENTION_VISIBLE_INIT_STD,
        },
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=CROSS_ATTENTION_VISIBLE_INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    image_processor = _blip_image_processor_class()(
        size={"height": TINY_BLIP_IMAGE_SIZE, "width": TINY_BLIP_IMAGE_SIZE}
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def make_test_images(folder: str | Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` PNGs named ``image_000.png``... : a random shape in a random colour on a random background."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(n):
        background = tuple(int(value) for value in rng.integers(0, 256, size=3))
        foreground = tuple(int(value) for value in rng.integers(0, 256, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        left, top = (int(value) for value in rng.integers(0, size // 2, size=2))
        extent = int(rng.integers(size // 4, size // 2 + 1))
        box = (left, top, left + extent, top + extent)
        shape = ("ellipse", "rectangle", "triangle")[index % 3]
        if shape == "ellipse":
            draw.ellipse(box, fill=foreground)
        elif shape == "rectangle":
            draw.rectangle(box, fill=foreground)
        else:
            corners = [(left, top + extent), (left + extent, top + extent), (left + extent // 2, top)]
            draw.polygon(corners, fill=foreground)
        path = folder / f"image_{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths
