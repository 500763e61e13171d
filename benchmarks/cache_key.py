"""What it costs to key the embedding cache (and a resumable run) by the image files a dataset points to.

A dataset whose image column holds file paths (a CSV of paths, ``datasets.Image`` cells with a path only) has a
fingerprint that covers the paths, not the files. The image check before any model runs already reads every
file, so the key can cover what it reads. Writes N small image files and a dataset of their paths, then times in
one run:
- the image check alone (``hf_pds.pairs.image_problem`` of every cell: read, headers, data verified);
- ``read_pairs`` as the pipeline runs it: the captions listed, the same check, and a SHA-256 of every file's bytes;
- a size, modification time and inode of every file (``os.stat``): the cheap identity, blind to a file replaced with
  one of the same size and time (``cp -p``, ``rsync -a``, an archive extracted again);
- SHA-256 and BLAKE2b of every file's bytes, read again, and of the bytes alone (what the check adds, holding them).

The files are read from the page cache (they were just written); each step runs ``--repeat`` times, the fastest
kept.

    python benchmarks/cache_key.py --images 10000 --format png --size 64
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from hf_pds.pairs import image_problem, read_pairs


def write_files(folder: Path, count: int, image_format: str, side: int) -> list[str]:
    """``count`` distinct images (a gradient with grain, so each file differs) of ``side`` pixels square."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side)
    paths = []
    for index in range(count):
        base = np.add.outer(ramp, ramp * (1 + index % 7)) % 255
        pixels = np.clip(base[..., None] + rng.normal(0, 8, (side, side, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{index:06d}.{image_format}"
        PIL.Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def timed(function, repeat: int) -> float:
    """The fastest of ``repeat`` runs: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def stat_identity(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0".encode())
    return digest.hexdigest()


def content_identity(paths: list[str], algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    for path in paths:
        with open(path, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def hash_only(contents: list[bytes], algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    for data in contents:
        digest.update(data)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="image files (10000)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="encoding of the files (png)")
    parser.add_argument("--size", type=int, default=64, help="side of each square image, in pixels (64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each step; the fastest is kept (3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hf-pds-cache-key-") as folder:
        paths = write_files(Path(folder), args.images, args.format, args.size)
        dataset = datasets.Dataset.from_dict({"image": paths, "caption": [f"picture {i}" for i in range(len(paths))]})
        megabytes = sum(os.path.getsize(path) for path in paths) / 2**20
        contents = [Path(path).read_bytes() for path in paths]  # also warms the page cache for every row below

        check = timed(lambda: [image_problem(path) for path in paths], args.repeat)
        rows = [
            ("the image check alone (read, verify)", check),
            (
                "read_pairs as the pipeline runs it: captions, the check, SHA-256",
                timed(lambda: read_pairs(dataset), args.repeat),
            ),
            ("size + mtime + inode of every file (os.stat)", timed(lambda: stat_identity(paths), args.repeat)),
            ("read + SHA-256 of every file", timed(lambda: content_identity(paths, "sha256"), args.repeat)),
            ("read + BLAKE2b of every file", timed(lambda: content_identity(paths, "blake2b"), args.repeat)),
            (
                "SHA-256 of the bytes alone (what the check adds)",
                timed(lambda: hash_only(contents, "sha256"), args.repeat),
            ),
            ("BLAKE2b of the bytes alone", timed(lambda: hash_only(contents, "blake2b"), args.repeat)),
        ]
    print(f"# python benchmarks/cache_key.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{args.images} {args.format.upper()} files of {args.size}x{args.size}, {megabytes:.0f} MB")
    print("| step | seconds | per image (ms) | vs the check |")
    print("|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {1000 * seconds / args.images:.4f} | {100 * seconds / check:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
