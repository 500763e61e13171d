"""IP-Adapter on Stable Diffusion 1.5 and SDXL: ``ip_adapter_image_embeds=[tensor]`` beside the caption's prompt.

``h94/IP-Adapter`` holds the adapters and the CLIP image encoders they read: ``models/`` (SD 1.5, OpenCLIP
ViT-H/14, 1024-d) and ``sdxl_models/`` (SDXL, OpenCLIP ViT-bigG/14, 1280-d). The text tower of the same CLIP model
is loaded beside it, so that prototypes live in the space the adapter reads.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from .base import LOADING_KEYS, Decoder, load_text_tower, matching_clip_model

DEFAULT_IP_ADAPTER = "h94/IP-Adapter"
# The IP-Adapter authors' generation defaults (their ``IPAdapter.generate``), not validated for PDS by hf-pds.
_AUTHORS_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


class IPAdapterDecoder(Decoder):
    """Stable Diffusion 1.5 with an IP-Adapter. The prototype is the adapter's image embedding (one image token
    group per prompt); with guidance, its unconditional embedding, zeros (as diffusers makes it from an image), comes
    first in the tensor. The caption is the prompt; ``ip_adapter_scale`` weighs the image against it."""

    name = "ip_adapter"
    model_index_classes = ("StableDiffusionPipeline",)
    components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    defaults: ClassVar[dict[str, Any]] = {
        "num_inference_steps": 30,
        "guidance_scale": 7.5,
        "negative_prompt": _AUTHORS_NEGATIVE_PROMPT,
        "ip_adapter_scale": 1.0,
    }
    # The component that the adapter is loaded into.
    denoiser: ClassVar[str] = "unet"
    # Where the adapter's weights lie in its repository (the image encoder is the image_encoder folder beside them).
    adapter_files: ClassVar[dict[str, str]] = {"subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors"}

    @classmethod
    def _pipeline_class(cls):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def _extra(cls) -> dict[str, Any]:
        """The base pipeline's settings that are not components."""
        return {"safety_checker": None, "requires_safety_checker": False}

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike,
        clip_model_name_or_path=None,
        ip_adapter: str | os.PathLike | None = None,
        ip_adapter_weight_name: str | None = None,
        ip_adapter_subfolder: str | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """The base checkpoint with the adapter loaded (``load_ip_adapter``), its image encoder, and the text tower
        of the same CLIP model (``clip_model_name_or_path``, default: the one of the adapter's image encoder)."""
        base = cls._pipeline_class().from_pretrained(name_or_path, **cls._extra(), **kwargs)
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        subfolder = ip_adapter_subfolder or cls.adapter_files["subfolder"]
        weight_name = ip_adapter_weight_name or cls.adapter_files["weight_name"]
        adapter = str(ip_adapter or DEFAULT_IP_ADAPTER)
        base.load_ip_adapter(adapter, subfolder=subfolder, weight_name=weight_name, **loading)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        clip = clip_model_name_or_path or matching_clip_model(base.image_encoder.config)
        names = (*cls.components, "image_encoder", "feature_extractor")
        return {
            **{name: getattr(base, name) for name in names},
            **load_text_tower(clip, dtype, loading),
            "_ip_adapter": f"{adapter} {subfolder}/{weight_name}",
        }

    @classmethod
    def check(cls, components: dict[str, Any]) -> None:
        super().check(components)
        if getattr(components[cls.denoiser], "encoder_hid_proj", None) is None:
            raise ValueError(
                f"The {cls.name} decoder needs a {cls.denoiser} with an IP-Adapter loaded (load_ip_adapter)."
            )

    def build_pipeline(self, components: dict[str, Any], scheduler: str | None):
        names = (*self.components, "image_encoder", "feature_extractor")
        pipeline = self._pipeline_class()(**self.pipeline_parts(components, names, scheduler), **self._extra())
        pipeline.set_ip_adapter_scale(self.settings["ip_adapter_scale"])
        return pipeline

    def call_kwargs(self, image_embeds: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        tokens = image_embeds[:, None, :]  # one image per prompt
        guidance = self.settings["guidance_scale"] > 1 and self.pipeline.unet.config.time_cond_proj_dim is None
        if guidance:  # the unconditional half first, as diffusers reads it
            tokens = torch.cat([torch.zeros_like(tokens), tokens])
        negative = self.settings["negative_prompt"]
        return {
            "prompt": prompts,
            "negative_prompt": None if negative is None else [negative] * len(prompts),
            "ip_adapter_image_embeds": [tokens],
            "num_inference_steps": self.settings["num_inference_steps"],
            "guidance_scale": self.settings["guidance_scale"],
        }


class IPAdapterXLDecoder(IPAdapterDecoder):
    """SDXL with an IP-Adapter (``sdxl_models/``): as :class:`IPAdapterDecoder`, with SDXL's two text encoders."""

    name = "ip_adapter_xl"
    model_index_classes = ("StableDiffusionXLPipeline",)
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    # SDXL's own guidance default (the authors' SDXL generate leaves it to the pipeline).
    defaults: ClassVar[dict[str, Any]] = {**IPAdapterDecoder.defaults, "guidance_scale": 5.0}
    adapter_files: ClassVar[dict[str, str]] = {
        "subfolder": "sdxl_models",
        "weight_name": "ip-adapter_sdxl.safetensors",
    }

    @classmethod
    def _pipeline_class(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def _extra(cls) -> dict[str, Any]:
        return {"add_watermarker": False}
