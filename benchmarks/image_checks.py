"""What checking every image before any model runs costs, against decoding every image.

Builds a dataset of encoded images (JPEG or PNG, photo-sized, embedded bytes as in a Hub Parquet set), then times in
one run:
- listing the pairs without the image check (``read_pairs(..., check_images=False)``: captions and empty cells);
- listing them with it (the default of ``PDSPipeline``: headers read, data verified, decoded only when unsure);
- decoding every image to RGB, as the embedding step does.

    python benchmarks/image_checks.py --images 10000 --format jpeg
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time

import datasets
import numpy as np
import PIL.Image

from hf_pds.pairs import decode_rgb, read_pairs, undecoded_cells


def photo(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    """A smooth gradient with grain: compresses like a photograph, not like noise or a flat colour."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    colour = rng.random(3)[:, None, None]
    base = 255 * (0.5 + 0.5 * np.sin(6.28 * (x * colour[0] + y * colour[1]) + colour[2] * 6.28))
    grain = rng.normal(0, 8, (3, height, width))
    pixels = np.clip(base[None] * colour + grain, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return PIL.Image.fromarray(pixels)


def build(count: int, image_format: str, width: int, height: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    templates = []
    for _ in range(16):  # 16 distinct files, repeated: encoding 10k images would dominate the run
        buffer = io.BytesIO()
        photo(rng, width, height).save(buffer, format=image_format, quality=90)
        templates.append(buffer.getvalue())
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    parts = []
    for start in range(0, count, 1000):  # Arrow arrays of binary hold at most 2 GB each
        rows = range(start, min(start + 1000, count))
        cells = [{"bytes": templates[index % len(templates)], "path": None} for index in rows]
        captions = [[f"picture {index}", f"another caption of {index}"] for index in rows]
        parts.append(datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features))
    return datasets.concatenate_datasets(parts)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images in the dataset (10000)")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="encoding of the images (jpeg)")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of each image (500x375, Flickr30k's typical)")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.split("x"))
    dataset = build(args.images, args.format.upper(), width, height)
    megabytes = sum(len(cell["bytes"]) for cell in undecoded_cells(dataset, "image")) / 2**20

    without = timed(lambda: read_pairs(dataset, check_images=False))
    checked = timed(lambda: read_pairs(dataset))
    decoded = timed(lambda: [decode_rgb(cell) for cell in undecoded_cells(dataset, "image")])
    check_cost = checked - without
    print(f"# python benchmarks/image_checks.py {shlex.join(sys.argv[1:])}")
    print(f"{args.images} {args.format.upper()} images of {width}x{height}, {megabytes:.0f} MB encoded")
    print("| step | seconds | per image (ms) |")
    print("|---|---|---|")
    for label, seconds in (
        ("list the pairs, no image check", without),
        ("list the pairs, check every image (the default)", checked),
        ("the image check alone", check_cost),
        ("decode every image to RGB (what embedding does)", decoded),
    ):
        print(f"| {label} | {seconds:.2f} | {1000 * seconds / args.images:.3f} |")
    print(f"image check / decoding: {check_cost / decoded:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
