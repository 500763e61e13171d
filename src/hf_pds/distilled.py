"""Step 8 of PDS: the distilled set as a ``datasets.Dataset``, and its Hub-layout folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from .prototypes import Prototypes

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
        configs=hub_configs(["train"]),
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


def hub_configs(splits: Sequence[str]) -> list[dict]:
    """The card YAML ``configs`` entry that points ``load_dataset`` at the Parquet shards of each split."""
    return [
        {
            "config_name": "default",
            "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in splits],
        }
    ]


def _estimated_bytes(dataset: datasets.Dataset) -> int:
    """Arrow size plus the size of image files that the Parquet shards will embed."""
    total = dataset.data.nbytes
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            cells = dataset.select_columns([name]).cast_column(name, datasets.Image(decode=False))[name]
            total += sum(os.path.getsize(cell["path"]) for cell in cells if cell and not cell["bytes"] and cell["path"])
    return total


def write_parquet_shards(
    dataset: datasets.Dataset, data_dir: Path, split: str, max_shard_bytes: int = 500 * 2**20
) -> list[Path]:
    """Write ``dataset`` as ``data_dir/{split}-0000i-of-0000n.parquet`` shards of at most about
    ``max_shard_bytes``, with image files embedded as bytes (as ``push_to_hub`` does)."""
    from datasets.table import embed_table_storage

    n_shards = max(1, -(-_estimated_bytes(dataset) // max_shard_bytes))
    n_shards = min(n_shards, max(1, len(dataset)))
    paths = []
    for index in range(n_shards):
        shard = dataset.shard(n_shards, index, contiguous=True).with_format("arrow")
        shard = shard.map(embed_table_storage, batched=True, batch_size=1000, keep_in_memory=True)
        path = data_dir / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
        shard.to_parquet(path)
        paths.append(path)
    return paths


def write_hub_folder(
    folder: str | os.PathLike,
    splits: Mapping[str, datasets.Dataset],
    card: str,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 500 * 2**20,
) -> Path:
    """Write a Hub-layout dataset folder: ``README.md`` (``card``), ``data/{split}-*.parquet`` and
    ``extra_files`` (relative path -> content), which ``datasets.load_dataset(folder)`` loads.

    Everything is written into a temporary folder beside the target and moved into place when complete,
    so an interrupted write never leaves a half-written folder.
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
        for split, dataset in splits.items():
            write_parquet_shards(dataset, staging / "data", split, max_shard_bytes)
        (staging / "README.md").write_text(card, encoding="utf-8")
        for relative_path, content in (extra_files or {}).items():
            target = staging / relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
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
        card = minimal_card(self.dataset, self.settings)
        return write_hub_folder(folder, {"train": self.dataset}, card, overwrite=overwrite)
