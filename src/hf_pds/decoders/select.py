"""``select``: no diffusion model. Each prototype's image is the real source image nearest its image prototype.

It is ``pds-select`` of the emoji benchmark (:func:`hf_pds.evaluation.coreset.pds_select`): a coreset mode for
users with no GPU or no decoder weights. Its space is that of any CLIP model (both towers), named with
``PDSPipeline.from_pretrained("select", clip_model_name_or_path=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from .base import Decoder

# The paper's embedding space, when no CLIP model is named.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class SelectDecoder(Decoder):
    """Candidate ``c`` of each prototype is a real image: round ``c`` gives each prototype, in order, its nearest
    (Euclidean) source image that no earlier pick took, so all images of a run are distinct. Round 0 is exactly
    ``pds-select``'s choice; best-of-N keeps the candidate closest to the prototype (``fidelity``)."""

    name = "select"
    defaults: ClassVar[dict[str, Any]] = {}
    takes_prompt = False

    def __init__(self, components: dict[str, Any], settings: dict[str, Any], source=None):
        super().__init__(components, settings)
        self.source = source  # (dataset, image column, [M, candidates] dataset rows)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, clip_model_name_or_path=None, **kwargs) -> dict[str, Any]:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from .base import LOADING_KEYS, load_text_tower

        name = clip_model_name_or_path or DEFAULT_CLIP_MODEL
        loading = {key: kwargs[key] for key in LOADING_KEYS if key in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return {
            "image_encoder": CLIPVisionModelWithProjection.from_pretrained(name, dtype=dtype, **loading),
            "feature_extractor": CLIPImageProcessor.from_pretrained(name, **loading),
            **load_text_tower(name, dtype, loading),
        }

    def build_pipeline(self, components: dict[str, Any], scheduler: str | None):
        return None

    @classmethod
    def sources(cls, embeddings, prototypes, candidates: int) -> np.ndarray:
        from ..evaluation.coreset import nearest_distinct_rows

        remaining = np.arange(len(embeddings.image_embeds))
        rounds = []
        for _ in range(candidates):
            picked = remaining[nearest_distinct_rows(prototypes.image_prototypes, embeddings.image_embeds[remaining])]
            rounds.append(picked)
            remaining = np.setdiff1d(remaining, picked)
        return np.asarray(embeddings.rows)[np.stack(rounds, axis=1)]

    def decode(
        self,
        image_embeds: np.ndarray,
        prompts: Sequence[str],
        generators: list[torch.Generator],
        items: Sequence[tuple[int, int]],
    ) -> list[PIL.Image.Image]:
        import datasets

        from ..pairs import decode_rgb, undecoded_cells

        dataset, image_column, rows = self.source
        feature = dataset.features[image_column]
        feature = feature if isinstance(feature, datasets.Image) else None
        cells = undecoded_cells(
            dataset.select([int(rows[index, candidate]) for index, candidate in items]), image_column
        )
        images = []
        for (index, candidate), cell in zip(items, cells, strict=True):
            image, problem = decode_rgb(cell, feature)
            if problem is not None:
                raise ValueError(f"Row {int(rows[index, candidate])}: column {image_column!r} {problem}.")
            images.append(image)
        return images
