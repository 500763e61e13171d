"""Build a Hub-layout MS-COCO folder (Karpathy split) from the BLIP annotation files.

    python dataset_scripts/coco.py --annotations ann/ --images coco/ --output coco-karpathy

``--annotations`` holds ``coco_karpathy_train.json``, ``coco_karpathy_val.json`` and
``coco_karpathy_test.json``; ``--images`` holds ``train2014/`` and ``val2014/``, the folders the entries' paths
start with. The result has the splits ``train`` (113287 images), ``validation`` (5000) and ``test`` (5000), five
or more captions per image, and loads with ``datasets.load_dataset("coco-karpathy")``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

import karpathy


def image_id(relpath: str) -> str:
    """The COCO image id: the trailing digits of the file name, without leading zeros.

    ``val2014/COCO_val2014_000000391895.jpg`` -> ``"391895"``.
    """
    digits = re.search(r"(\d+)$", PurePosixPath(relpath).stem)
    if digits is None:
        raise ValueError(f"cannot read a COCO image id from {relpath!r}: its file name does not end in digits")
    return str(int(digits.group(1)))


COCO = karpathy.KarpathyDataset(
    script="coco.py",
    pretty_name="MS-COCO captions (Karpathy split)",
    annotation_files={
        "train": "coco_karpathy_train.json",
        "validation": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
    image_id=image_id,
    image_id_rule="the COCO image id: the trailing digits of the file name, without leading zeros",
    image_folder_hint="the folder holding train2014/ and val2014/",
    license="cc-by-4.0",
    description=(
        "MS-COCO captions (Lin et al., *Microsoft COCO: Common Objects in Context*, ECCV 2014; Chen et al., "
        "*Microsoft COCO Captions*, 2015): Flickr photos of everyday scenes, each with five or more crowd-sourced "
        "English captions. The Karpathy split draws all three splits from the 2014 train and val images."
    ),
    license_note=(
        "The captions belong to the COCO Consortium and are licensed under CC BY 4.0. The images are Flickr "
        "photos that the COCO Consortium does not own: each keeps its own Flickr license, and their use must "
        "follow the Flickr terms of use. `--push-to-hub` creates a private repository."
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code."""
    return karpathy.main(COCO, argv)


if __name__ == "__main__":
    sys.exit(main())
