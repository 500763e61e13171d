"""What every decoder family shares: the :class:`Decoder` declaration, and how checkpoints and CLIP towers load."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from ..embedding import ClipTowers

logger = logging.getLogger(__name__)

# Stability AI withdrew the SD 2.x family from the Hub in November 2025; the community mirrors hold the same files.
MIRRORS = {
    "stabilityai/stable-diffusion-2-1-unclip-small": "sd2-community/stable-diffusion-2-1-unclip-small",
    "stabilityai/stable-diffusion-2-1-unclip": "sd2-community/stable-diffusion-2-1-unclip",
}

# The CLIP model whose text tower matches an image encoder, keyed by the vision tower's
# (hidden_size, projection_dim, patch_size).
KNOWN_CLIP_MODELS = {
    # stable-diffusion-2-1-unclip-small; FLUX.1's XLabs IP-Adapter
    (1024, 768, 14): "openai/clip-vit-large-patch14",
    # stable-diffusion-2-1-unclip; h94/IP-Adapter models/ (SD 1.5)
    (1280, 1024, 14): "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    # h94/IP-Adapter sdxl_models/ (SDXL)
    (1664, 1280, 14): "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
}

# The keyword arguments of ``from_pretrained`` that say where and how to find files, for every part that loads (a
# revision names a commit of one repository only).
LOADING_KEYS = ("cache_dir", "local_files_only", "token")


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint is neither a local folder nor on the Hub (or in the Hub cache, offline)."""


def resolve_checkpoint(name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str | os.PathLike:
    """``name``, or the community mirror of a withdrawn ``stabilityai/`` checkpoint that is not in the Hub cache.

    A copy of the withdrawn repository in the user's Hub cache is used as it is; otherwise its mirror is loaded,
    with a one-line warning."""
    if str(name) not in MIRRORS or Path(name).exists():
        return name
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(str(name), "model_index.json", cache_dir=cache_dir), str):
        return name
    mirror = MIRRORS[str(name)]
    logger.warning(
        "%s was withdrawn from the Hub in November 2025 and is not in your Hub cache: loading its community mirror %s.",
        name,
        mirror,
    )
    return mirror


def read_model_index(name: str | os.PathLike, loading: dict) -> dict:
    """The ``model_index.json`` of a pipeline folder or Hub id; :class:`CheckpointNotFoundError` (one line, naming
    the mirrors of the paper's checkpoints) when there is none to read."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(name, **loading)
    except OSError as error:
        mirrors = " and ".join(MIRRORS.values())
        offline = " (the Hub is offline: HF_HUB_OFFLINE is set)" if _hub_offline(loading) else ""
        raise CheckpointNotFoundError(
            f"cannot find the checkpoint {name}: it is not a local folder, and no model_index.json for it is on the "
            f"Hub or in the Hub cache{offline}. The paper's checkpoints are at {mirrors} (Stability AI withdrew its "
            "own in November 2025)."
        ) from error


def _hub_offline(loading: dict) -> bool:
    from huggingface_hub import constants

    return bool(loading.get("local_files_only")) or constants.HF_HUB_OFFLINE


def matching_clip_model(vision_config) -> str:
    """The CLIP model whose text tower matches an image encoder, from its config."""
    key = (vision_config.hidden_size, vision_config.projection_dim, vision_config.patch_size)
    if key not in KNOWN_CLIP_MODELS:
        raise ValueError(
            "This checkpoint has no CLIP text tower and its image encoder "
            f"(hidden_size={key[0]}, projection_dim={key[1]}, patch_size={key[2]}) is not one hf-pds knows: "
            "pass clip_model_name_or_path=<the CLIP model of the image encoder>."
        )
    return KNOWN_CLIP_MODELS[key]


def load_text_tower(name: str | os.PathLike, dtype, loading: dict, subfolder: str | None = None) -> dict:
    """``clip_text_encoder`` (a ``CLIPTextModelWithProjection``) and ``clip_tokenizer`` of a CLIP model (or of the
    ``text_encoder`` / ``tokenizer`` subfolders of a pipeline folder such as a Kandinsky prior)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = {"subfolder": subfolder[0]} if subfolder else {}
    tokenizer = {"subfolder": subfolder[1]} if subfolder else {}
    return {
        "clip_text_encoder": CLIPTextModelWithProjection.from_pretrained(name, dtype=dtype, **encoder, **loading),
        "clip_tokenizer": CLIPTokenizer.from_pretrained(name, **tokenizer, **loading),
    }


def towers_of(components: dict[str, Any]):
    """The towers that embed for a ``PDSPipeline``'s components: its packaged ``encoders`` when it has them (the
    ``select`` decoder's offline encoders), else its CLIP image encoder and the text tower of the same CLIP model."""
    if components.get("encoders") is not None:
        return components["encoders"]
    return ClipTowers(
        components["image_encoder"],
        components["feature_extractor"],
        components["clip_text_encoder"],
        components["clip_tokenizer"],
    )


class Decoder:
    """A decoder family: what turns an image prototype, and its caption, into an image.

    The class declares the family; an instance is bound to the components of one ``PDSPipeline`` and to the
    generation settings of one run, and decodes batches of prototypes (see :func:`hf_pds.synthesis.synthesize`).

    Every family reads the image embeddings of one CLIP image encoder (the pipeline's ``image_encoder`` with its
    ``feature_extractor``); ``clip_text_encoder`` and ``clip_tokenizer`` are the text tower of the same CLIP model.
    Pruning, clustering and matching happen in that space, and the same image encoder scores the images it makes
    (``fidelity``).

    Attributes:
        name: the family's name (``PDSPipeline``'s ``decoder`` config, the card's ``decoder`` setting).
        model_index_classes: the ``_class_name`` values of the ``model_index.json`` of checkpoints it decodes with.
        components: the ``PDSPipeline`` components the family needs, besides the CLIP towers.
        defaults: its authors' generation settings (not validated for PDS by hf-pds, except unCLIP's, the paper's).
        takes_prompt: whether the retrieved caption conditions the decoder.
    """

    name: ClassVar[str]
    model_index_classes: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    takes_prompt: ClassVar[bool] = True

    def __init__(self, components: dict[str, Any], settings: dict[str, Any]):
        self.towers = towers_of(components)
        self.settings = settings
        self.pipeline = self.build_pipeline(components, settings.get("scheduler_preset"))
        if self.pipeline is not None:
            self.pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, clip_model_name_or_path=None, **kwargs) -> dict[str, Any]:
        """The ``PDSPipeline`` components of a checkpoint of this family (Hub id or folder), CLIP towers included."""
        raise NotImplementedError

    @classmethod
    def check(cls, components: dict[str, Any]) -> None:
        """``ValueError`` unless the components fit the family (override to check more)."""
        missing = [name for name in cls.components if components.get(name) is None]
        if missing:
            raise ValueError(f"The {cls.name} decoder needs the component(s) {', '.join(missing)}.")

    def build_pipeline(self, components: dict[str, Any], scheduler: str | None):
        """The diffusers pipeline that decodes (sharing the components, no copy), or None."""
        raise NotImplementedError

    @staticmethod
    def pipeline_parts(components: dict[str, Any], names: Sequence[str], scheduler: str | None) -> dict[str, Any]:
        """The components ``names`` of a diffusers pipeline, with the scheduler of the fast preset ``scheduler``
        (built from the checkpoint's scheduler config) in place of the checkpoint's when one is asked for."""
        from ..synthesis import preset_scheduler

        parts = {name: components[name] for name in names}
        if scheduler is not None:
            parts["scheduler"] = preset_scheduler(scheduler, components["scheduler"].config)
        return parts

    @property
    def device(self) -> torch.device:
        if self.pipeline is not None:
            return self.pipeline._execution_device
        return self.towers.device

    def call_kwargs(self, image_embeds: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        """The keyword arguments of the pipeline's call for a batch of image prototypes (on the device, in the
        denoiser's dtype) and their captions, unconditional embeddings included; not the generators."""
        raise NotImplementedError

    def decode(
        self,
        image_embeds: np.ndarray,
        prompts: Sequence[str],
        generators: list[torch.Generator],
        items: Sequence[tuple[int, int]],
    ) -> list[PIL.Image.Image]:
        """The images of a batch: ``items`` are its (prototype, candidate) pairs, ``image_embeds`` and ``prompts``
        their prototypes' rows, ``generators`` one per image."""
        # Pipelines neither move nor cast passed embeddings: the denoiser's device and dtype.
        denoiser = getattr(self.pipeline, "unet", None) or self.pipeline.transformer
        embeds = torch.as_tensor(np.asarray(image_embeds), dtype=denoiser.dtype, device=self.device)
        kwargs = self.call_kwargs(embeds, list(prompts))
        return self.pipeline(**kwargs, generator=generators, output_type="pil").images

    @classmethod
    def embedding_norm(cls, components: dict[str, Any]) -> float | None:
        """The typical L2 norm of the raw image embeddings the decoder was trained on, measured from its
        components, or None when they do not tell (L2-normalised input is rescaled to it on request)."""
        return None

    @classmethod
    def sources(cls, image_embeds: np.ndarray, rows: np.ndarray, prototypes, candidates: int) -> np.ndarray | None:
        """Dataset rows a decoder reads for each prototype's candidates (``[M, candidates]``), or None; ``image_embeds``
        are the source's images, ``rows`` their rows in the dataset."""
        return None
