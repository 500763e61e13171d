"""Step 8 of PDS: the distilled set as a ``datasets.Dataset``, and what the pipeline returns."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from .card import card_files
from .hub import check_repo_id, push_folder, write_hub_folder
from .prototypes import Prototypes
from .synthesis import Generated

COLUMNS = (
    "image",
    "caption",
    "text_embedding",
    "image_embedding",
    "support",
    "similarity",
    "source_caption_index",
    "fidelity",
    "text_alignment",
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
            "fidelity": datasets.Value("float32"),
            "text_alignment": datasets.Value("float32"),
        }
    )


def build_distilled_dataset(
    images: Sequence[Generated], prototypes: Prototypes, prompts: Sequence[str]
) -> datasets.Dataset:
    """Rows of (synthetic image, retrieved caption, prototype embeddings, provenance, fidelity).

    ``images`` are the generated images with their scores (their PNG bytes are stored as they are); ``prompts``
    the caption of each prototype.
    """
    if not len(images) == len(prompts) == len(prototypes):
        raise ValueError(f"Got {len(images)} images and {len(prompts)} captions for {len(prototypes)} prototypes.")
    columns = {
        "image": [{"bytes": image.png, "path": None} for image in images],
        "caption": list(prompts),
        "text_embedding": prototypes.text_prototypes.astype(np.float32),
        "image_embedding": prototypes.image_prototypes.astype(np.float32),
        "support": prototypes.support.astype(np.int64),
        # None from encoders of two spaces (they have no image-text cosine): NaN, as text_alignment is then.
        "similarity": prototypes.similarity.astype(np.float32)
        if prototypes.similarity.size
        else np.full(len(prototypes), np.nan, np.float32),
        "source_caption_index": prototypes.caption_index.astype(np.int64),
        "fidelity": np.asarray([image.fidelity for image in images], dtype=np.float32),
        "text_alignment": np.asarray([image.text_alignment for image in images], dtype=np.float32),
    }
    features = distilled_features(prototypes.image_prototypes.shape[1], prototypes.text_prototypes.shape[1])
    return datasets.Dataset.from_dict(columns, features=features)


@dataclass
class PDSPipelineOutput:
    """What :class:`~hf_pds.PDSPipeline` returns.

    Attributes:
        dataset: the distilled ``datasets.Dataset``, one row per synthetic pair, in prototype order.
        prototypes: the :class:`~hf_pds.Prototypes` behind it.
        settings: the method and generation settings of the run.
        provenance: where it came from: source dataset (id, split, fingerprint, license), models and their
            revisions, hf-pds version. Written into the card; edit it before saving to correct it.
        timings: seconds spent in each step of the call that made it (``check_inputs``, ``embedding``,
            ``prototypes``, ``synthesis``, ``save``; a resumed run skips ``embedding`` and ``prototypes``). Not
            written into the card.
    """

    dataset: datasets.Dataset
    prototypes: Prototypes
    settings: dict
    provenance: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def save(
        self,
        folder: str | os.PathLike,
        overwrite: bool = False,
        repo_id: str | None = None,
        protected: Iterable[str | os.PathLike | None] = (),
    ) -> Path:
        """Save as a Hub-layout folder: ``README.md`` (the dataset card), ``preview.png``, ``stats.png`` and
        ``data/train-*.parquet``, which ``datasets.load_dataset(folder)`` loads back. Returns its path.

        The folder appears only when complete. ``overwrite=True`` replaces an existing folder only when it is
        empty or holds nothing but an hf-pds output, and never the current folder, one of its parents, or a folder
        in ``protected`` (what the run read) or inside one. ``repo_id`` only fills in the card's loading snippet.

        Raises:
            FileExistsError, ValueError, PermissionError: the folder may not be written there (see
                :func:`~hf_pds.hub.check_output_folder`); nothing was written.
            NoSpaceError: the disk filled up; nothing was written.
        """
        card, images = card_files(self.dataset, self.prototypes, self.settings, self.provenance, repo_id)
        return write_hub_folder(
            folder, {"train": self.dataset}, card, extra_files=images, overwrite=overwrite, protected=protected
        )

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
        check_repo_id(repo_id)  # before the folder is written
        with tempfile.TemporaryDirectory(prefix="hf-pds-push-") as staging:
            folder = self.save(Path(staging) / "dataset", repo_id=repo_id)
            return push_folder(folder, repo_id, private, token, revision, create_pr, commit_message)
