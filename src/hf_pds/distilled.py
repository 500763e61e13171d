"""Step 8 of PDS: the distilled set as a ``datasets.Dataset``, and its Hub-layout folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

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
    images: Sequence[bytes], prototypes: Prototypes, prompts: Sequence[str]
) -> datasets.Dataset:
    """Rows of (synthetic image, retrieved caption, prototype embeddings, provenance).

    ``images`` are PNG bytes, stored as they are; ``prompts`` the caption of each prototype.
    """
    if not len(images) == len(prompts) == len(prototypes):
        raise ValueError(f"Got {len(images)} images and {len(prompts)} captions for {len(prototypes)} prototypes.")
    columns = {
        "image": [{"bytes": png, "path": None} for png in images],
        "caption": list(prompts),
        "text_embedding": prototypes.text_prototypes.astype(np.float32),
        "image_embedding": prototypes.image_prototypes.astype(np.float32),
        "support": prototypes.support.astype(np.int64),
        "similarity": prototypes.similarity.astype(np.float32),
        "source_caption_index": prototypes.caption_index.astype(np.int64),
    }
    features = distilled_features(prototypes.image_prototypes.shape[1], prototypes.text_prototypes.shape[1])
    return datasets.Dataset.from_dict(columns, features=features)


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


def with_dataset_info(card: str, splits: Mapping[str, datasets.Dataset], shards: Mapping[str, list[Path]]) -> str:
    """``card`` with the YAML ``dataset_info`` that ``push_to_hub`` writes: features, split sizes, bytes.

    Besides informing the Hub, it makes ``load_dataset(folder)`` notice new contents: for a local folder
    whose card has ``configs``, the datasets cache is keyed by the card's YAML, not by the data files.
    """
    from datasets.info import DatasetInfo, DatasetInfosDict
    from huggingface_hub import DatasetCard

    split_dict = datasets.SplitDict()
    for split, data in splits.items():
        split_dict.add(datasets.SplitInfo(name=split, num_bytes=_estimated_bytes(data), num_examples=len(data)))
    info = DatasetInfo(
        features=next(iter(splits.values())).features,
        splits=split_dict,
        download_size=sum(path.stat().st_size for paths in shards.values() for path in paths),
        dataset_size=sum(split.num_bytes for split in split_dict.values()),
    )
    parsed = DatasetCard(card)
    DatasetInfosDict({"default": info}).to_dataset_card_data(parsed.data)
    return str(parsed)


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
        shards = {
            split: write_parquet_shards(data, staging / "data", split, max_shard_bytes)
            for split, data in splits.items()
        }
        (staging / "README.md").write_text(with_dataset_info(card, splits, shards), encoding="utf-8")
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


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a Hub-layout folder to the dataset repo ``repo_id``; returns the commit (or PR) URL.

    The repo is created if needed, private unless ``private=False``. The folder is uploaded as it is, card
    included, so its YAML ``configs`` reach the Hub intact; Parquet shards already in the repo under
    ``data/`` are replaced. Without a token or without a connection this fails before uploading anything.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not list(folder.glob("data/*.parquet")):
        raise ValueError(f"{folder} is not a Hub-layout dataset folder: it needs README.md and data/*.parquet.")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set: unset it to push to the Hub.")
    token = token or get_token()
    if not token:
        raise PermissionError(
            "No Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass token=... to push."
        )
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
    except Exception as error:
        raise ConnectionError(
            f"The Hub cannot be reached or refused the token ({type(error).__name__}: {error}). Nothing was uploaded."
        ) from error
    repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo.repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        repo_type="dataset",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload PDS distilled dataset ({user}, hf-pds)",
        delete_patterns=["data/*.parquet"],
    )
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


@dataclass
class PDSPipelineOutput:
    """What :class:`~hf_pds.PDSPipeline` returns.

    Attributes:
        dataset: the distilled ``datasets.Dataset``, one row per synthetic pair, in prototype order.
        prototypes: the :class:`~hf_pds.Prototypes` behind it.
        settings: the method and generation settings of the run.
        provenance: where it came from: source dataset (id, split, fingerprint, license), models and their
            revisions, hf-pds version. Written into the card; edit it before saving to correct it.
    """

    dataset: datasets.Dataset
    prototypes: Prototypes
    settings: dict
    provenance: dict = field(default_factory=dict)

    def save(self, folder: str | os.PathLike, overwrite: bool = False, repo_id: str | None = None) -> Path:
        """Save as a Hub-layout folder: ``README.md`` (the dataset card), ``preview.png``, ``stats.png`` and
        ``data/train-*.parquet``, which ``datasets.load_dataset(folder)`` loads back. Returns its path.

        ``repo_id`` only fills in the card's loading snippet.
        """
        from .card import card_files

        card, images = card_files(self.dataset, self.prototypes, self.settings, self.provenance, repo_id)
        return write_hub_folder(folder, {"train": self.dataset}, card, extra_files=images, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = True,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
    ) -> str:
        """Publish to the Hub dataset repo ``repo_id`` (private by default); returns the commit URL.

        Writes the same folder as :meth:`save` into a temporary place and uploads it with
        :func:`push_folder`. The token (``token`` or the logged-in one) is never printed or written.
        """
        with tempfile.TemporaryDirectory(prefix="hf-pds-push-") as staging:
            folder = self.save(Path(staging) / "dataset", repo_id=repo_id)
            return push_folder(folder, repo_id, private, token, revision, create_pr, commit_message)
