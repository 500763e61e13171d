"""Step 8 of PDS: the distilled set as a ``datasets.Dataset``, and its Hub-layout folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from .prototypes import Prototypes

DATA_FILE = "data/train-00000-of-00001.parquet"
COLUMNS = (
    "image",
    "caption",
    "text_embedding",
    "image_embedding",
    "support",
    "similarity",
    "source_caption_index",
)


def distilled_features(image_dim: int, text_dim: int) -> datasets.Features:
    """The schema of a distilled set: one row per synthetic (image, text) pair."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "text_embedding": datasets.List(datasets.Value("float32"), length=text_dim),
            "image_embedding": datasets.List(datasets.Value("float32"), length=image_dim),
            "support": datasets.Value("int64"),
            "similarity": datasets.Value("float32"),
            "source_caption_index": datasets.Value("int64"),
        }
    )


def build_distilled_dataset(
    images: Sequence[PIL.Image.Image], prototypes: Prototypes, captions: Sequence[str]
) -> datasets.Dataset:
    """Rows of (synthetic image, retrieved caption, prototype embeddings, provenance).

    ``captions`` is the flat caption list the prototypes' ``caption_index`` points into.
    """
    if len(images) != len(prototypes):
        raise ValueError(f"Got {len(images)} images for {len(prototypes)} prototypes.")
    columns = {
        "image": list(images),
        "caption": [captions[index] for index in prototypes.caption_index],
        "text_embedding": prototypes.text_prototypes.astype(np.float32),
        "image_embedding": prototypes.image_prototypes.astype(np.float32),
        "support": prototypes.support.astype(np.int64),
        "similarity": prototypes.similarity.astype(np.float32),
        "source_caption_index": prototypes.caption_index.astype(np.int64),
    }
    features = distilled_features(prototypes.image_prototypes.shape[1], prototypes.text_prototypes.shape[1])
    return datasets.Dataset.from_dict(columns, features=features)


def minimal_card(dataset: datasets.Dataset, settings: dict) -> str:
    """A dataset card whose YAML ``configs`` point ``load_dataset`` at the Parquet data."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
        tags=["dataset-distillation", "synthetic", "pds"],
        task_categories=["image-to-text", "text-to-image"],
    )
    lines = "\n".join(f"| `{key}` | `{value}` |" for key, value in settings.items())
    body = (
        f"# Distilled image-text set ({len(dataset)} pairs)\n\n"
        "Synthetic image-caption pairs made with PDS (prototype-guided data synthesis, ICLR 2026) by "
        "[hf-pds](https://pypi.org/project/hf-pds/). Each row holds a synthetic image, the training caption "
        "closest to its text prototype, both prototype embeddings and the number of source pairs behind them.\n\n"
        "| setting | value |\n|---|---|\n"
        f"{lines}\n\n"
        "```python\nfrom datasets import load_dataset\n\n"
        'ds = load_dataset("<this folder or repo id>", split="train")\n```\n'
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def save_folder(dataset: datasets.Dataset, folder: str | os.PathLike, card: str, overwrite: bool = False) -> Path:
    """Write ``dataset`` as a Hub-layout folder: ``README.md`` + ``data/*.parquet``.

    Everything is written into a temporary folder beside the target and moved into place when complete,
    so an interrupted save never leaves a half-written folder.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the saved folder should not be
    try:
        (staging / "data").mkdir()
        dataset.to_parquet(staging / DATA_FILE)
        (staging / "README.md").write_text(card, encoding="utf-8")
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            folder.rename(retired / folder.name)
            staging.rename(folder)
            shutil.rmtree(retired)
        else:
            staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


@dataclass
class PDSPipelineOutput:
    """What :class:`~hf_pds.PDSPipeline` returns.

    Attributes:
        dataset: the distilled ``datasets.Dataset``, one row per synthetic pair, in prototype order.
        prototypes: the :class:`~hf_pds.Prototypes` behind it.
        settings: the method and generation settings of the run (written into the card).
    """

    dataset: datasets.Dataset
    prototypes: Prototypes
    settings: dict

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save as a Hub-layout folder that ``datasets.load_dataset(folder)`` loads back; returns its path."""
        return save_folder(self.dataset, folder, minimal_card(self.dataset, self.settings), overwrite=overwrite)
