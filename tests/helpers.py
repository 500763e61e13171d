"""Datasets shared by the tests."""

import datasets
import numpy as np
import PIL.Image

IMAGE_MODES = ("RGB", "L", "P", "RGBA", "CMYK", "LA", "I;16")
# Generation settings that keep a tiny-pipeline run under a second.
FAST = {"num_inference_steps": 2, "output_size": 40}


def mixed_image(index: int, rng: np.random.Generator) -> PIL.Image.Image:
    """An image of one of several modes and an odd size."""
    height, width = 20 + 7 * index, 48 - 3 * index
    mode = IMAGE_MODES[index % len(IMAGE_MODES)]
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    rgb = PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode)


def mixed_dataset(n_images: int = 10, seed: int = 0) -> datasets.Dataset:
    """Images of mixed modes and sizes, each with a list of 2-3 captions."""
    rng = np.random.default_rng(seed)
    images = [mixed_image(index, rng) for index in range(n_images)]
    topics = ["dog", "cat", "bird", "boat", "tree"]
    captions = [
        [
            f"a {topics[i % 5]} in picture {i}",
            f"picture {i} shows a {topics[i % 5]}",
            f"the {topics[i % 5]} again",
        ][: 2 + i % 2]
        for i in range(n_images)
    ]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)
