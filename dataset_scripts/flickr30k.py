"""Build a Hub-layout Flickr30k folder (Karpathy split) from the BLIP annotation files.

    python dataset_scripts/flickr30k.py --annotations ann/ --images flickr30k/ --output flickr30k-karpathy

``--annotations`` holds ``flickr30k_train.json``, ``flickr30k_val.json`` and ``flickr30k_test.json``;
``--images`` holds ``flickr30k-images/``, the folder the entries' paths start with. The result has the splits
``train`` (29000 images), ``validation`` (1014) and ``test`` (1000), five captions per image, and loads with
``datasets.load_dataset("flickr30k-karpathy")``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

import karpathy


def image_id(relpath: str) -> str:
    """The file name without extension: ``flickr30k-images/1007129816.jpg`` -> ``"1007129816"``."""
    return PurePosixPath(relpath).stem


FLICKR30K = karpathy.KarpathyDataset(
    script="flickr30k.py",
    pretty_name="Flickr30k (Karpathy split)",
    annotation_files={
        "train": "flickr30k_train.json",
        "validation": "flickr30k_val.json",
        "test": "flickr30k_test.json",
    },
    image_id=image_id,
    image_id_rule="the image file name without extension, i.e. the Flickr photo id",
    image_folder_hint="the folder holding flickr30k-images/",
    license="other",
    card_metadata={
        "license_name": "flickr30k-terms",
        "license_link": "https://shannon.cs.illinois.edu/DenotationGraph/",
    },
    description=(
        "Flickr30k (Young, Lai, Hodosh and Hockenmaier, *From image descriptions to visual denotations*, TACL "
        "2014): Flickr photos of everyday scenes, each with five crowd-sourced English captions."
    ),
    license_note=(
        "The images are Flickr photos that belong to their authors; they are used under the Flickr terms of use "
        "and the terms under which the Flickr30k authors distribute the dataset (non-commercial research). "
        "Read those terms before sharing this dataset; `--push-to-hub` creates a private repository."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code."""
    return karpathy.main(FLICKR30K, argv)


if __name__ == "__main__":
    sys.exit(main())
