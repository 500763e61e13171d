"""The digits demo's recipe over several k-means seeds: how many digits its captions name, and how many of its
images (the real scan nearest each image prototype, as the ``select`` decoder picks it) show their caption's digit.

Encodes scikit-learn's digits (1797 scans, 3 captions each) once with the demo's frozen encoders
(``hf_pds.testing.digits_demo_encoders``), then runs ``hf_pds.extract_prototypes`` with
``hf_pds.defaults.DEMO_SETTINGS`` at each seed. Prints the time of loading and encoding, then one line per seed.

    python benchmarks/digits_demo.py --seeds 42 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hf_pds import extract_prototypes
from hf_pds.defaults import DEMO_SETTINGS
from hf_pds.evaluation.coreset import nearest_distinct_rows
from hf_pds.testing import digits_dataset, digits_demo_encoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3, 4])
    parser.add_argument("--kmeans-backend", default="auto")
    args = parser.parse_args()

    dataset = digits_dataset()
    labels = np.asarray(dataset["label"])
    captions = [caption for row in dataset["caption"] for caption in row]
    caption_image = np.repeat(np.arange(dataset.num_rows), [len(row) for row in dataset["caption"]])
    started = time.perf_counter()
    encoders = digits_demo_encoders()
    loaded = time.perf_counter()
    image_embeds = encoders.encode_pixels(encoders.pixels(dataset["image"]), "cpu").numpy()
    encoded_images = time.perf_counter()
    text_embeds = encoders.encode_texts(captions, "cpu").numpy()
    done = time.perf_counter()
    print(
        f"encoders: load {loaded - started:.1f} s, {len(labels)} images {encoded_images - loaded:.1f} s, "
        f"{len(captions)} captions {done - encoded_images:.1f} s, total {done - started:.1f} s"
    )
    for seed in args.seeds:
        settings = {**DEMO_SETTINGS, "seed": seed}
        prototypes = extract_prototypes(
            image_embeds, text_embeds, caption_image, kmeans_backend=args.kmeans_backend, **settings
        )
        caption_digits = labels[caption_image[prototypes.caption_index]]
        image_digits = labels[nearest_distinct_rows(prototypes.image_prototypes, image_embeds)]
        print(
            f"seed {seed}: {len(set(caption_digits.tolist()))}/10 distinct digits among captions, "
            f"{int((image_digits == caption_digits).sum())}/{len(prototypes)} images of their caption's digit "
            f"(captions {caption_digits.tolist()}, images {image_digits.tolist()})"
        )


if __name__ == "__main__":
    main()
