"""Textual Inversion (Gal et al. 2022): learn new token embeddings for a concept; the models stay frozen.

Trains: the input-embedding rows of the placeholder token(s) `<token>`, `<token>_1`, ... (`num_vectors` of them),
initialised from `initializer_token`. The whole embedding matrix is the trainable parameter (so the text encoder
is the trained module), and every other row is put back to its original value after each optimizer step. Loss: the
diffusion objective on VAE latents conditioned on prompts built from templates ("a photo of a <token>") or on
captions that contain the placeholder. Saves: `learned_embeds.safetensors` = {placeholder: [num_vectors, dim]},
loaded with `pipe.load_textual_inversion(output_dir)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file

from finetune.config import Config, ConfigError, option
from finetune.data import build_image_source
from finetune.families import family_names, get_family
from finetune.text_to_image import TextToImageMethod, TextToImageOptions

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "learned_embeds.safetensors"

# "{}" is replaced by the placeholder. Short, varied descriptions of a photo of a thing / a picture in a style.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a picture of the {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a clean photo of a {}",
    "a blurry photo of the {}",
    "a photo of my {}",
    "a good photo of a {}",
    "a large {} in a photo",
    "a small {} in a photo",
    "a rendition of the {}",
    "an image showing a {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a picture in the style of {}",
    "an illustration in the style of {}",
    "a rendering in the style of {}",
    "a drawing in the style of {}",
    "artwork in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark picture in the style of {}",
    "a small painting in the style of {}",
    "a large drawing in the style of {}",
    "a sketch in the style of {}",
]


@dataclass
class TextualInversionOptions(TextToImageOptions):
    placeholder_token: str | None = option(
        None, "The new token naming the concept, e.g. '<cat-toy>'; write it in prompts. Required."
    )
    initializer_token: str | None = option(
        None, "An existing word that is a single token (e.g. 'toy', 'cat'); the new embeddings start from it."
    )
    num_vectors: int = option(
        1, "Embedding vectors learned for the placeholder (tokens <t>, <t>_1, ...); more capture more detail."
    )
    learnable_property: Literal["object", "style"] = option(
        "object", "What the images share: 'object' ('a photo of a <t>') or 'style' ('a painting in the style of <t>')."
    )
    use_captions: bool = option(
        False,
        "Train on the captions of data.caption_column (each must contain the placeholder) instead of templates.",
    )
    templates: list[str] = option(
        default_factory=list,
        help="Own prompt templates, '{}' marking where the placeholder goes. Empty: the learnable_property ones.",
    )

    def __post_init__(self):
        TextToImageOptions.__post_init__(self)
        if not self.placeholder_token or not self.placeholder_token.strip():
            raise ConfigError("textual_inversion.placeholder_token is required, e.g. placeholder_token='<my-cat>'")
        if any(c.isspace() for c in self.placeholder_token):
            raise ConfigError(
                f"textual_inversion.placeholder_token {self.placeholder_token!r} must not contain spaces, "
                "e.g. '<my-cat>'"
            )
        if not self.initializer_token or not self.initializer_token.strip():
            raise ConfigError(
                "textual_inversion.initializer_token is required: a word close to the concept that the tokenizer "
                "knows as one token, e.g. initializer_token=toy"
            )
        if self.num_vectors < 1:
            raise ConfigError(f"textual_inversion.num_vectors must be >= 1, got {self.num_vectors}")
        for template in self.templates:
            if "{}" not in template:
                raise ConfigError(
                    f"textual_inversion.templates: {template!r} has no '{{}}' where the placeholder goes, "
                    "e.g. 'a photo of a {}'"
                )

    @property
    def placeholder_tokens(self) -> list[str]:
        """The tokens added to the tokenizer, named as diffusers' `load_textual_inversion` names them."""
        token = self.placeholder_token
        return [token] + [f"{token}_{i}" for i in range(1, self.num_vectors)]

    @property
    def prompt_templates(self) -> list[str]:
        if self.templates:
            return list(self.templates)
        return OBJECT_TEMPLATES if self.learnable_property == "object" else STYLE_TEMPLATES


class TextualInversion(TextToImageMethod):
    name = "textual_inversion"
    summary = "Textual Inversion: learn new token embeddings for a concept or style from a few images"
    Options = TextualInversionOptions

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        options = config.method_options
        prompts = options.validation_prompts
        if prompts and not any(options.placeholder_token in p for p in prompts):
            logger.warning(
                "no textual_inversion.validation_prompts mention %s: the samples will not show the learned concept",
                options.placeholder_token,
            )

    def check_family(self) -> None:
        super().check_family()
        if not self.family.textual_inversion:
            supported = ", ".join(n for n in family_names() if get_family(n).textual_inversion)
            raise ConfigError(
                f"textual_inversion: {self.family.text_to_image_pipeline} does not load textual-inversion embeddings "
                f"(the {self.family.name} family); train a LoRA instead (method lora), or use a base model of a "
                f"family that does: {supported}"
            )

    # -- data --------------------------------------------------------------------------------------------------------
    def build_source(self):
        column = self.config.data.caption_column
        source = build_image_source(self.config.data, columns=[column] if self.options.use_captions else [])
        if self.options.use_captions:
            self.check_captions(source)
        return source

    def check_captions(self, source) -> None:
        """Every caption must name the placeholder, or the embedding would not be trained on that image."""
        column, token = self.config.data.caption_column, self.options.placeholder_token
        values = getattr(source, "column_values", {}).get(column)
        if values is None:
            raise ConfigError(
                f"textual_inversion.use_captions: {self.config.data.dataset!r} has no caption column {column!r}; "
                "set use_captions=false to train on prompt templates"
            )
        bad = []
        rows = getattr(source, "indices", range(len(values)))
        for row in rows:
            captions = values[row] if isinstance(values[row], (list, tuple)) else [values[row]]
            for caption in captions:
                if not isinstance(caption, str) or token not in caption:
                    bad.append((row, caption))
        if bad:
            row, caption = bad[0]
            name = source.image_sources[row] if hasattr(source, "image_sources") else f"row {row}"
            if isinstance(name, dict):
                name = name.get("path") or f"row {row}"
            raise ConfigError(
                f"textual_inversion.use_captions: {len(bad)} caption(s) do not contain the placeholder {token!r}, "
                f"e.g. {caption!r} ({name}). Write {token} where the concept appears in every caption, or set "
                f"use_captions=false to train on '{self.options.learnable_property}' templates."
            )

    def caption_for(self, example: dict, rng: np.random.Generator) -> str:
        if self.options.use_captions:
            text = super().caption_for(example, rng)
        else:
            templates = self.options.prompt_templates
            text = templates[int(rng.integers(len(templates)))].replace("{}", self.options.placeholder_token)
        return self.expand_placeholder(text)

    def expand_placeholder(self, text: str) -> str:
        """'<t>' -> '<t> <t>_1 ...' as the pipeline's `maybe_convert_prompt` does at inference."""
        if self.options.num_vectors == 1:
            return text
        return text.replace(self.options.placeholder_token, " ".join(self.options.placeholder_tokens))

    def default_prompt(self) -> str:
        token = self.options.placeholder_token
        return (
            f"a photo of a {token}"
            if self.options.learnable_property == "object"
            else f"a painting in the style of {token}"
        )

    # -- what trains -------------------------------------------------------------------------------------------------
    def configure_trainable(self) -> None:
        """New rows in every text encoder's input embeddings (SDXL: both), each initialised from initializer_token."""
        self.placeholder_ids: dict[str, list[int]] = {}
        for tokenizer_name, encoder_name in zip(self.family.tokenizers, self.family.text_encoders):
            tokenizer, text_encoder = getattr(self, tokenizer_name), getattr(self, encoder_name)
            self.placeholder_ids[encoder_name] = self.add_placeholder(tokenizer, text_encoder, tokenizer_name)

    def add_placeholder(self, tokenizer, text_encoder, tokenizer_name: str) -> list[int]:
        options = self.options
        initializer_ids = tokenizer.encode(options.initializer_token, add_special_tokens=False)
        if len(initializer_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(initializer_ids)
            raise ConfigError(
                f"textual_inversion.initializer_token {options.initializer_token!r} must be a single token of the "
                f"base model's {tokenizer_name}, but it becomes {len(pieces)}: {pieces}. Choose a simpler word close "
                "to the concept (e.g. 'toy', 'cat', 'painting')."
            )
        vocab = tokenizer.get_vocab()
        taken = [t for t in options.placeholder_tokens if t in vocab]
        if taken:
            raise ConfigError(
                f"textual_inversion.placeholder_token {options.placeholder_token!r}: {taken} already exist in the "
                "tokenizer; choose a new string such as '<my-concept>'"
            )
        existing = tokenizer.tokenize(options.placeholder_token)
        if len(existing) == 1 and existing[0] in vocab:
            raise ConfigError(
                f"textual_inversion.placeholder_token {options.placeholder_token!r} is an existing word (token "
                f"{existing[0]!r}): the new token would replace it in every prompt. Use e.g. "
                f"'<{options.placeholder_token}>'"
            )
        tokenizer.add_tokens(options.placeholder_tokens)
        ids = tokenizer.convert_tokens_to_ids(options.placeholder_tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set right below
        embeddings = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[ids] = embeddings[initializer_ids[0]].clone()
        embeddings.requires_grad_(True)
        logger.info(
            "textual inversion: %s (ids %s of the %s) initialised from %r",
            options.placeholder_tokens,
            ids,
            tokenizer_name,
            options.initializer_token,
        )
        return ids

    def before_training(self, ema) -> None:
        super().before_training(ema)
        # the rows that must not change, as they are now (after the trainable matrices were cast to fp32)
        self.original_embeddings = {name: w.detach().clone() for name, w in self.embedding_weights().items()}

    def embedding_weights(self) -> dict[str, torch.nn.Parameter]:
        return {name: self.unwrap(m).get_input_embeddings().weight for name, m in self.text_encoders.items()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Only the placeholder rows learn: put every other row (moved by weight decay, Adam) back."""
        for name, weight in self.embedding_weights().items():
            ids = self.placeholder_ids[name]
            learned = weight[ids].clone()
            weight.copy_(self.original_embeddings[name])
            weight[ids] = learned

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        """Each text encoder's learned rows, [num_vectors, its width]."""
        weights = self.embedding_weights()
        return {
            name: weights[name][ids].detach().float().cpu().contiguous() for name, ids in self.placeholder_ids.items()
        }

    # -- outputs -----------------------------------------------------------------------------------------------------
    def save(self, output_dir: Path) -> None:
        """One encoder: `{token: tensor}`, as diffusers' textual_inversion.py writes it. Several (SDXL): one tensor per
        encoder under the family's keys (`clip_l`, `clip_g`), the token in the metadata."""
        output_dir.mkdir(parents=True, exist_ok=True)
        learned, token = self.learned_embeddings(), self.options.placeholder_token
        keys = self.family.embedding_keys
        tensors = (
            {keys[name]: tensor for name, tensor in learned.items()} if keys else {token: learned["text_encoder"]}
        )
        save_file(
            tensors,
            str(output_dir / EMBEDDINGS_FILE),
            metadata={
                "token": token,
                "base_model": str(self.config.model.pretrained_model_name_or_path),
                "initializer_token": self.options.initializer_token,
                "num_vectors": str(self.options.num_vectors),
            },
        )

    def card(self) -> dict[str, Any]:
        base = self.config.model.pretrained_model_name_or_path
        token = self.options.placeholder_token
        prompt = next((p for p in self.validation_prompts() if token in p), self.default_prompt())
        keys = self.family.embedding_keys
        if keys:
            lines = ["from safetensors.torch import load_file", "", 'state = load_file("learned_embeds.safetensors")']
            for encoder, key in keys.items():
                tokenizer = encoder.replace("text_encoder", "tokenizer")
                lines.append(
                    f'pipe.load_textual_inversion(state["{key}"], token="{token}", text_encoder=pipe.{encoder}, '
                    f"tokenizer=pipe.{tokenizer})"
                )
            load = "\n".join(lines)
        else:
            load = f'pipe.load_textual_inversion("OUTPUT_DIR_OR_REPO_ID")  # {EMBEDDINGS_FILE}: adds {token}'
        return {
            **self.license_facts(),
            "base_model": base,
            "tags": ["textual-inversion", *self.card_tags()],
            "pipeline_tag": self.pipeline_tag(),
            "trigger": token,
            "prompt": prompt,
            "description": (
                f"Textual Inversion embedding for `{token}` ({self.options.num_vectors} vector(s), initialised from "
                f"`{self.options.initializer_token}`, learnable property: {self.options.learnable_property}), "
                "trained with difftune method `textual_inversion`. Write the placeholder in your prompts."
            ),
            "usage": f"""
{self.usage_loading(base)}
{load}
{self.usage_call(prompt)}
""",
        }
