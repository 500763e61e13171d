"""Kandinsky 2.2: ``KandinskyV22Pipeline(image_embeds=, negative_image_embeds=)``, no prompt.

The decoder reads the image embeddings of its prior's CLIP image encoder (ViT-bigG/14, 1280-d); the prior also
holds the text tower of the same CLIP model (``CLIPTextModelWithProjection`` and its tokenizer), so the prior
(``kandinsky-community/kandinsky-2-2-prior``) gives both towers.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from .base import LOADING_KEYS, Decoder, load_text_tower

DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"


class KandinskyDecoder(Decoder):
    """The prototype is ``image_embeds``; the unconditional embedding is the prior's: its image encoder's embedding
    of an all-zero pixel input (``KandinskyV22PriorPipeline.get_zero_embed``). The caption is not read."""

    name = "kandinsky"
    model_index_classes = ("KandinskyV22Pipeline",)
    components = ("unet", "scheduler", "movq")
    # KandinskyV22Pipeline's own defaults (its authors'), not validated for PDS by hf-pds.
    defaults: ClassVar[dict[str, Any]] = {"num_inference_steps": 100, "guidance_scale": 4.0}
    takes_prompt = False

    def __init__(self, components: dict[str, Any], settings: dict[str, Any]):
        super().__init__(components, settings)
        encoder = self.towers.image_encoder
        size = encoder.config.image_size
        parameter = next(encoder.parameters())
        with torch.no_grad():
            zeros = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
            self.zero_embed = encoder(zeros).image_embeds

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, clip_model_name_or_path=None, **kwargs) -> dict[str, Any]:
        """The decoder from ``name_or_path``; the CLIP towers from the prior ``clip_model_name_or_path`` (default
        ``kandinsky-community/kandinsky-2-2-prior``): its ``image_encoder``, ``image_processor``, ``text_encoder``
        and ``tokenizer`` folders."""
        from diffusers import KandinskyV22Pipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        decoder = KandinskyV22Pipeline.from_pretrained(name_or_path, **kwargs)
        prior = clip_model_name_or_path or DEFAULT_PRIOR
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return {
            **decoder.components,
            "image_encoder": CLIPVisionModelWithProjection.from_pretrained(
                prior, subfolder="image_encoder", dtype=dtype, **loading
            ),
            "feature_extractor": CLIPImageProcessor.from_pretrained(prior, subfolder="image_processor", **loading),
            **load_text_tower(prior, dtype, loading, subfolder=("text_encoder", "tokenizer")),
        }

    @classmethod
    def check(cls, components: dict[str, Any]) -> None:
        super().check(components)
        width = components["image_encoder"].config.projection_dim
        reads = components["unet"].config.encoder_hid_dim
        if reads != width:
            raise ValueError(f"The Kandinsky UNet reads {reads}-d image embeddings but image_encoder makes {width}-d.")

    def build_pipeline(self, components: dict[str, Any], scheduler: str | None):
        from diffusers import KandinskyV22Pipeline

        return KandinskyV22Pipeline(**self.pipeline_parts(components, self.components, scheduler))

    def call_kwargs(self, image_embeds: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        negative = self.zero_embed.to(device=image_embeds.device, dtype=image_embeds.dtype)
        return {
            "image_embeds": image_embeds,
            "negative_image_embeds": negative.repeat(len(image_embeds), 1),
            "num_inference_steps": self.settings["num_inference_steps"],
            "guidance_scale": self.settings["guidance_scale"],
        }
