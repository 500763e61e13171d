"""FLUX.1 [dev] with the XLabs IP-Adapter: ``FluxPipeline(ip_adapter_image_embeds=[...])`` beside the caption's prompt.

XLabs' adapter (``XLabs-AI/flux-ip-adapter``) reads the image embeddings of CLIP ViT-L/14
(``openai/clip-vit-large-patch14``, 768-d): the paper's own space, the one of stable-diffusion-2-1-unclip-small, so
the two decoders share the embedding cache. The text tower of the same CLIP model embeds the captions.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from .base import LOADING_KEYS, load_text_tower
from .ip_adapter import IPAdapterDecoder

DEFAULT_IP_ADAPTER = "XLabs-AI/flux-ip-adapter"
IP_ADAPTER_WEIGHT_NAME = "ip_adapter.safetensors"
# The adapter's image encoder, and so the space of the prototypes.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# The true classifier-free guidance of diffusers' example for this adapter (the negative branch reads a zero image
# embedding); FLUX.1 [dev]'s own ``guidance_scale`` is its distilled guidance, a setting of the call.
TRUE_CFG_SCALE = 4.0


class FluxIPAdapterDecoder(IPAdapterDecoder):
    """FLUX.1 [dev] with XLabs' IP-Adapter, built and checked as the other IP-Adapters are. The prototype is the
    adapter's image embedding; the unconditional embedding of true guidance is zeros, beside an empty negative
    prompt. The caption is the prompt; ``ip_adapter_scale`` weighs the image against it."""

    name = "flux_ip_adapter"
    model_index_classes = ("FluxPipeline",)
    components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "scheduler")
    denoiser = "transformer"
    # FluxPipeline's own steps and guidance, and diffusers' example for the adapter: its authors', not validated for
    # PDS by hf-pds.
    defaults: ClassVar[dict[str, Any]] = {
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "negative_prompt": "",
        "ip_adapter_scale": 1.0,
    }

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
        """The base checkpoint with the adapter loaded (``load_ip_adapter``), its image encoder (the CLIP model
        ``clip_model_name_or_path``, default ``openai/clip-vit-large-patch14``), and the text tower of that model."""
        from transformers import CLIPImageProcessor

        base = cls._pipeline_class().from_pretrained(name_or_path, **kwargs)
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        clip = str(clip_model_name_or_path or DEFAULT_CLIP_MODEL)
        adapter = str(ip_adapter or DEFAULT_IP_ADAPTER)
        weight_name = ip_adapter_weight_name or IP_ADAPTER_WEIGHT_NAME
        subfolder = {"subfolder": ip_adapter_subfolder} if ip_adapter_subfolder else {}
        base.load_ip_adapter(
            adapter,
            weight_name=weight_name,
            image_encoder_pretrained_model_name_or_path=clip,
            image_encoder_dtype=dtype or torch.float32,  # diffusers' default is float16
            **subfolder,
            **loading,
        )
        return {
            **{name: getattr(base, name) for name in (*cls.components, "image_encoder")},
            # The CLIP model's own pre-processing, not diffusers' default one: the same input as unCLIP-small's.
            "feature_extractor": CLIPImageProcessor.from_pretrained(clip, **loading),
            **load_text_tower(clip, dtype, loading),
            "_ip_adapter": f"{adapter} {weight_name}",
        }

    @classmethod
    def _pipeline_class(cls):
        from diffusers import FluxPipeline

        return FluxPipeline

    @classmethod
    def _extra(cls) -> dict[str, Any]:
        return {}

    def call_kwargs(self, image_embeds: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        tokens = image_embeds[:, None, :]  # one image per prompt
        negative = self.settings["negative_prompt"]
        guided = negative is not None
        return {
            "prompt": prompts,
            "negative_prompt": [negative] * len(prompts) if guided else None,
            "true_cfg_scale": TRUE_CFG_SCALE if guided else 1.0,
            "ip_adapter_image_embeds": [tokens],
            "negative_ip_adapter_image_embeds": [torch.zeros_like(tokens)] if guided else None,
            "num_inference_steps": self.settings["num_inference_steps"],
            "guidance_scale": self.settings["guidance_scale"],
        }
