"""The student of the PDS evaluation protocol: train on a few pairs, test image-text retrieval.

Default (the paper's): a frozen ImageNet image backbone whose 1000-d head output is the image feature, frozen
text features, and a trainable text projection head (a 2-layer MLP with a residual connection and a
LayerNorm) mapping the text features onto the image features. Loss: symmetric InfoNCE at temperature 0.07.
SGD with lr 0.2, momentum 0.9, weight decay 5e-4, batch 128, 100 epochs, lr x0.1 from epoch 51. Options: a
head on the image side too (``head="both"``), and a trainable image backbone (``trainable_backbone=True``,
which needs the backbone module and preprocessed images instead of cached features).

Model selection is on the validation split: every epoch is evaluated on validation, the epoch with the
highest validation rsum (first on ties) is selected, and the test split is evaluated at that epoch only.
The test-selected figure (best epoch on TEST, what the reference code reports) is computed only on request
(``report_test_selected=True``) and kept apart, labelled "selected on test".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .metrics import retrieval_metrics_from_features

HEADS = ("text", "both")
METRIC_KEYS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "mean", "rsum")


@dataclass
class StudentConfig:
    """Training settings; the defaults are the PDS protocol.

    Attributes:
        epochs: training epochs.
        batch_size: pairs per step (the last, smaller batch of an epoch is kept).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_decay_epoch: the (1-based) epoch from which the learning rate is multiplied by ``lr_decay``.
        lr_decay: the factor.
        temperature: InfoNCE temperature (fixed).
        head: ``"text"`` (a projection head on the text side only, the paper's) or ``"both"`` (one per side).
        embed_dim: output width of the heads with ``head="both"`` (default: the image feature width); with
            ``head="text"`` the text head maps onto the image features.
        trainable_backbone: train the image backbone too (needs ``image_backbone`` and image tensors).
        report_test_selected: also evaluate the test split at every epoch and report its best epoch, labelled
            "selected on test". Never used for the reported figures.
        device: torch device.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_epoch: int = 51
    lr_decay: float = 0.1
    temperature: float = 0.07
    head: str = "text"
    embed_dim: int | None = None
    trainable_backbone: bool = False
    report_test_selected: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}.")
        for name in ("epochs", "batch_size", "lr_decay_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")


@dataclass
class RetrievalSplit:
    """An evaluation split: image features (or model inputs, for a trainable backbone), text features and the
    image row of each text."""

    images: Any  # [n_images, d_image] features, or [n_images, 3, H, W] inputs for a trainable backbone
    texts: np.ndarray  # [n_texts, d_text]
    text_image: np.ndarray  # [n_texts]

    def __post_init__(self) -> None:
        self.texts = np.asarray(self.texts, dtype=np.float32)
        self.text_image = np.asarray(self.text_image)
        if self.texts.ndim != 2 or self.text_image.shape != (len(self.texts),):
            raise ValueError(
                f"texts must be [n_texts, d] and text_image [n_texts], got shapes {self.texts.shape} and "
                f"{self.text_image.shape}."
            )


@dataclass
class StudentRun:
    """One trained student.

    Attributes:
        seed: the run's seed (head initialisation and batch order).
        selected_epoch: the epoch with the best validation rsum (1-based).
        validation: validation metrics at that epoch.
        test: test metrics at that epoch (the reported figures).
        validation_history: validation rsum of every epoch.
        test_selected: only with ``report_test_selected``: ``{"epoch", "metrics", "label": "selected on test"}``.
    """

    seed: int
    selected_epoch: int
    validation: dict[str, float]
    test: dict[str, float]
    validation_history: list[float] = field(default_factory=list)
    test_selected: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


def _torch():
    import torch

    return torch


def projection_head(in_dim: int, out_dim: int):
    """The trainable head, a 2-layer MLP with a residual connection and a LayerNorm:
    ``h = W1 x``; ``out = LayerNorm(h + W2 gelu(h))`` (``W1``: in -> out, ``W2``: out -> out)."""
    torch = _torch()

    class ProjectionHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projection = torch.nn.Linear(in_dim, out_dim)
            self.residual = torch.nn.Linear(out_dim, out_dim)
            self.norm = torch.nn.LayerNorm(out_dim)

        def forward(self, features):
            projected = self.projection(features)
            return self.norm(projected + self.residual(torch.nn.functional.gelu(projected)))

    return ProjectionHead()


def info_nce(image_embeds, text_embeds, temperature: float):
    """Symmetric InfoNCE of matched rows: the mean of the image->text and text->image cross-entropies."""
    torch = _torch()
    functional = torch.nn.functional
    logits = functional.normalize(image_embeds, dim=-1) @ functional.normalize(text_embeds, dim=-1).T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (functional.cross_entropy(logits, targets) + functional.cross_entropy(logits.T, targets)) / 2


class _Student:
    """The trainable parts and how features flow through them."""

    def __init__(self, image_dim: int, text_dim: int, config: StudentConfig, image_backbone: Any | None) -> None:
        torch = _torch()
        self.config = config
        out_dim = image_dim if config.head == "text" else (config.embed_dim or image_dim)
        self.text_head = projection_head(text_dim, out_dim).to(config.device)
        self.image_head = projection_head(image_dim, out_dim).to(config.device) if config.head == "both" else None
        self.backbone = image_backbone.to(config.device) if image_backbone is not None else None
        modules = [module for module in (self.text_head, self.image_head, self.backbone) if module is not None]
        self.modules = torch.nn.ModuleList(modules)

    def image_embeds(self, images):
        features = self.backbone(images) if self.backbone is not None else images
        return self.image_head(features) if self.image_head is not None else features

    def text_embeds(self, texts):
        return self.text_head(texts)

    def state(self) -> dict:
        return copy.deepcopy(self.modules.state_dict())

    def load(self, state: dict) -> None:
        self.modules.load_state_dict(state)

    def evaluate(self, split: RetrievalSplit, batch_size: int = 512) -> dict[str, float]:
        torch = _torch()
        device = self.config.device
        self.text_head.eval()
        if self.image_head is not None:
            self.image_head.eval()
        with torch.inference_mode():
            images = torch.as_tensor(split.images, dtype=torch.float32)
            image_embeds = torch.cat(
                [
                    self.image_embeds(images[i : i + batch_size].to(device)).cpu()
                    for i in range(0, len(images), batch_size)
                ]
            )
            texts = torch.as_tensor(split.texts, dtype=torch.float32)
            text_embeds = torch.cat(
                [self.text_embeds(texts[i : i + batch_size].to(device)).cpu() for i in range(0, len(texts), batch_size)]
            )
        self.text_head.train()
        if self.image_head is not None:
            self.image_head.train()
        return retrieval_metrics_from_features(image_embeds.numpy(), text_embeds.numpy(), split.text_image)


def _check_pairs(train_images: Any, train_texts: np.ndarray) -> None:
    n_images, n_texts = len(train_images), len(train_texts)
    if n_images != n_texts:
        raise ValueError(f"train pairs: {n_images} images but {n_texts} texts; give one image row per text.")
    if n_images == 0:
        raise ValueError("no training pairs.")


def train_student(
    train_images: Any,
    train_texts: np.ndarray,
    validation: RetrievalSplit,
    test: RetrievalSplit,
    config: StudentConfig | None = None,
    seed: int = 0,
    image_backbone: Any | None = None,
) -> StudentRun:
    """Train one student on pairs ``(train_images[i], train_texts[i])``; select the epoch on validation.

    Args:
        train_images: ``[n_pairs, d_image]`` frozen image features (or ``[n_pairs, 3, H, W]`` model inputs with
            ``config.trainable_backbone``).
        train_texts: ``[n_pairs, d_text]`` text features: the distilled text embeddings (the paper's student)
            or the captions encoded by a frozen text encoder.
        validation: the split the epoch is selected on.
        test: the split the reported figures come from, at the selected epoch.
        config: :class:`StudentConfig` (default: the PDS protocol).
        seed: seeds the head initialisation and the batch order.
        image_backbone: with ``config.trainable_backbone``, the ``torch.nn.Module`` mapping model inputs to
            image features; it is copied, never changed in place.

    Returns:
        :class:`StudentRun`.
    """
    torch = _torch()
    config = config or StudentConfig()
    train_texts = np.asarray(train_texts, dtype=np.float32)
    _check_pairs(train_images, train_texts)
    if config.trainable_backbone and image_backbone is None:
        raise ValueError("trainable_backbone=True needs image_backbone (the module) and image tensors as images.")
    if not config.trainable_backbone and image_backbone is not None:
        raise ValueError("image_backbone is only used with trainable_backbone=True; pass features instead.")
    if train_texts.shape[1] != validation.texts.shape[1] or train_texts.shape[1] != test.texts.shape[1]:
        raise ValueError(
            f"train texts have width {train_texts.shape[1]}, validation {validation.texts.shape[1]} and test "
            f"{test.texts.shape[1]}: all must come from one text space."
        )
    images = torch.as_tensor(np.asarray(train_images), dtype=torch.float32)
    texts = torch.as_tensor(train_texts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = copy.deepcopy(image_backbone) if image_backbone is not None else None
        if backbone is not None:
            image_dim = int(backbone(images[:1]).shape[1])
        else:
            if images.ndim != 2:
                raise ValueError(f"train image features must be [n_pairs, d], got shape {tuple(images.shape)}.")
            image_dim = images.shape[1]
        student = _Student(image_dim, texts.shape[1], config, backbone)
    optimizer = torch.optim.SGD(
        student.modules.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    n_pairs = len(texts)
    history: list[float] = []
    best: tuple[float, int, dict, dict] | None = None  # (rsum, epoch, validation metrics, state)
    best_test: dict | None = None
    for epoch in range(1, config.epochs + 1):
        lr = config.lr * (config.lr_decay if epoch >= config.lr_decay_epoch else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n_pairs, generator=generator)
        for start in range(0, n_pairs, config.batch_size):
            batch = order[start : start + config.batch_size]
            if len(batch) < 2 and n_pairs >= 2:
                continue  # a contrastive batch of one pair has no negatives
            image_embeds = student.image_embeds(images[batch].to(config.device))
            text_embeds = student.text_embeds(texts[batch].to(config.device))
            loss = info_nce(image_embeds, text_embeds, config.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the student's loss is {loss.item()} at epoch {epoch}; lower the lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        metrics = student.evaluate(validation)
        history.append(metrics["rsum"])
        if best is None or metrics["rsum"] > best[0]:
            best = (metrics["rsum"], epoch, metrics, student.state())
        if config.report_test_selected:
            test_metrics = student.evaluate(test)
            if best_test is None or test_metrics["rsum"] > best_test["metrics"]["rsum"]:
                best_test = {"epoch": epoch, "metrics": test_metrics, "label": "selected on test"}
    assert best is not None
    student.load(best[3])
    return StudentRun(
        seed=int(seed),
        selected_epoch=best[1],
        validation=best[2],
        test=student.evaluate(test),
        validation_history=history,
        test_selected=best_test,
    )


def train_students(
    train_images: Any,
    train_texts: np.ndarray,
    validation: RetrievalSplit,
    test: RetrievalSplit,
    config: StudentConfig | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    image_backbone: Any | None = None,
) -> list[StudentRun]:
    """:func:`train_student` once per seed on the same pairs."""
    return [train_student(train_images, train_texts, validation, test, config, seed, image_backbone) for seed in seeds]
