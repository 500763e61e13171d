"""Stable unCLIP 2.1: the paper's decoder (``StableUnCLIPImg2ImgPipeline`` with ``image_embeds=``).

Its image encoder is part of the checkpoint (CLIP ViT-L/14, 768-d, for ``-small``; OpenCLIP ViT-H/14, 1024-d, for
the other); the checkpoint has no CLIP text tower, so the one of the same CLIP model is loaded beside it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from ..defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_NUM_INFERENCE_STEPS,
)
from .base import Decoder, load_text_tower, matching_clip_model


class UnCLIPDecoder(Decoder):
    """``StableUnCLIPImg2ImgPipeline(prompt=caption, image_embeds=prototype, noise_level=...)``: the prototype,
    after the image normaliser's scaling, is noised to ``noise_level`` and conditions the UNet; the caption is the
    prompt. Its unconditional embedding (guidance) is zeros, which the pipeline makes itself."""

    name = "unclip"
    model_index_classes = ("StableUnCLIPImg2ImgPipeline",)
    components = (
        "image_normalizer",
        "image_noising_scheduler",
        "tokenizer",
        "text_encoder",
        "unet",
        "scheduler",
        "vae",
    )
    defaults: ClassVar[dict[str, Any]] = {
        "num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS,
        "guidance_scale": DEFAULT_GUIDANCE_SCALE,
        "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
        "noise_level": DEFAULT_NOISE_LEVEL,
    }

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, clip_model_name_or_path=None, **kwargs) -> dict[str, Any]:
        from diffusers import StableUnCLIPImg2ImgPipeline

        from .base import LOADING_KEYS

        unclip = StableUnCLIPImg2ImgPipeline.from_pretrained(name_or_path, **kwargs)
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        name = clip_model_name_or_path or matching_clip_model(unclip.image_encoder.config)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return {**unclip.components, **load_text_tower(name, dtype, loading)}

    @classmethod
    def check(cls, components: dict[str, Any]) -> None:
        super().check(components)
        width = components["image_encoder"].config.projection_dim
        normalizer_width = components["image_normalizer"].mean.shape[-1]
        if normalizer_width != width:
            raise ValueError(
                f"image_normalizer expects {normalizer_width}-d image embeddings but image_encoder makes {width}-d."
            )

    @classmethod
    def embedding_norm(cls, components: dict[str, Any]) -> float:
        """The root mean square norm of the image embeddings unCLIP was trained on, from its image normaliser's
        per-dimension statistics of them: ``sqrt(sum(mean**2 + std**2))``."""
        normalizer = components["image_normalizer"]
        moments = normalizer.mean.detach().double() ** 2 + normalizer.std.detach().double() ** 2
        return float(moments.sum().sqrt())

    def build_pipeline(self, components: dict[str, Any], scheduler: str | None):
        from diffusers import StableUnCLIPImg2ImgPipeline

        names = (*self.components, "feature_extractor", "image_encoder")
        return StableUnCLIPImg2ImgPipeline(**self.pipeline_parts(components, names, scheduler))

    def call_kwargs(self, image_embeds: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        negative = self.settings["negative_prompt"]
        # The batch size comes from the list of prompts.
        return {
            "prompt": prompts,
            "negative_prompt": None if negative is None else [negative] * len(prompts),
            "image_embeds": image_embeds,
            "num_inference_steps": self.settings["num_inference_steps"],
            "guidance_scale": self.settings["guidance_scale"],
            "noise_level": self.settings["noise_level"],
        }
