"""Benchmark of the prototype stage (PDS steps 2-6): hf-pds against the reference algorithm.

The embeddings are synthetic, with the shapes of Flickr30k (29k images x 5 captions) and COCO (113k x 5),
d=768, and a cluster structure: each image belongs to one of n_images / 10 concepts, its captions lie near
the concept's text centre, and 10% of the captions belong to another concept. Each run happens in a fresh
process that reads the embeddings memory-mapped, so that its wall time and peak memory (max RSS) are its
own. The methods:

- reference: a straightforward re-implementation of the reference code. Image rows are repeated per caption;
  MiniBatchKMeans(n_clusters=K, batch_size=10000, n_init=20, random_state=42) runs on both modalities; the
  count table is matched with linear_sum_assignment; the means are taken over the intersections.
- hf-pds (sklearn): ``extract_prototypes(kmeans_backend="sklearn")``, the same k-means as the reference.
- hf-pds (faiss): ``extract_prototypes(kmeans_backend="faiss")``: a k-means++ seed, then 20 Lloyd
  iterations over every point, each distinct image weighted by its kept captions.
- hf-pds (torch): ``extract_prototypes(kmeans_backend="torch", device=...)``: the faiss algorithm written with
  torch, on ``--device`` (cpu by default, cuda on a GPU). torch is imported, and the device initialised,
  before the clock starts: a pipeline that embeds with CLIP has both done already. Its import still counts in
  the peak RSS.
- hf-pds (sharded): ``extract_prototypes_sharded(kmeans_backend="faiss")`` over the same embeddings cut into
  shards of ``--shard-images`` images (memory-mapped views, with their captions): k-means (faiss) trained on a
  sample of at most 256 pairs per centre, then passes over the shards.

"matched pairs" is the matched overlap: the number of kept pairs that fall in the intersection of the image
and text clusters of their prototype (the sum of ``support``). Higher is better.

    python benchmarks/prototypes.py                                   # Flickr30k shape, budgets 100 500 1000
    python benchmarks/prototypes.py --shapes coco --methods faiss     # COCO shape, one method
    python benchmarks/prototypes.py --methods faiss,torch --device cuda   # torch k-means on a GPU
    python benchmarks/prototypes.py --shapes flickr30k,coco --methods faiss,sharded --budgets 500,1000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {"flickr30k": (29_000, 5), "coco": (113_287, 5), "small": (5_000, 5)}  # small: a quick check
DIM = 768
IMAGES_PER_CONCEPT = 10
METHODS = ("reference", "sklearn", "faiss", "torch", "sharded")
SHARD_IMAGES = 10_000


def make_embeddings(n_images: int, captions_per_image: int, folder: Path, seed: int = 0) -> None:
    """Write image_embeds.npy, text_embeds.npy and caption_image.npy with a planted concept structure."""
    rng = np.random.default_rng(seed)
    n_concepts = n_images // IMAGES_PER_CONCEPT
    image_centres = rng.normal(size=(n_concepts, DIM)).astype(np.float32)
    text_centres = (0.6 * image_centres + 0.8 * rng.normal(size=(n_concepts, DIM))).astype(np.float32)
    concept = rng.integers(0, n_concepts, n_images)
    images = np.lib.format.open_memmap(folder / "image_embeds.npy", mode="w+", dtype=np.float32, shape=(n_images, DIM))
    for start in range(0, n_images, 10_000):
        stop = min(start + 10_000, n_images)
        images[start:stop] = image_centres[concept[start:stop]] + rng.normal(scale=0.7, size=(stop - start, DIM))
    images.flush()
    caption_image = np.repeat(np.arange(n_images), captions_per_image)
    caption_concept = concept[caption_image].copy()
    wrong = rng.random(len(caption_image)) < 0.1
    caption_concept[wrong] = rng.integers(0, n_concepts, int(wrong.sum()))
    texts = np.lib.format.open_memmap(
        folder / "text_embeds.npy", mode="w+", dtype=np.float32, shape=(len(caption_image), DIM)
    )
    for start in range(0, len(caption_image), 50_000):
        stop = min(start + 50_000, len(caption_image))
        texts[start:stop] = text_centres[caption_concept[start:stop]] + rng.normal(scale=0.7, size=(stop - start, DIM))
    texts.flush()
    np.save(folder / "caption_image.npy", caption_image)


def reference_prototypes(image_embeds, text_embeds, caption_image, budget, prune_ratio=0.2, seed=42):
    """The reference algorithm, written plainly: returns the support of each prototype."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import MiniBatchKMeans

    pair_images = np.asarray(image_embeds[caption_image])  # one image row per caption
    texts = np.asarray(text_embeds)
    cosine = (pair_images * texts).sum(axis=1) / np.linalg.norm(pair_images, axis=1) / np.linalg.norm(texts, axis=1)
    keep = np.sort(np.argsort(cosine)[int(len(cosine) * prune_ratio) :])
    pair_images, texts = pair_images[keep], texts[keep]
    image_labels = MiniBatchKMeans(budget, batch_size=10_000, n_init=20, random_state=seed).fit_predict(pair_images)
    text_labels = MiniBatchKMeans(budget, batch_size=10_000, n_init=20, random_state=seed).fit_predict(texts)
    table = np.zeros((budget, budget), dtype=np.int64)
    np.add.at(table, (image_labels, text_labels), 1)
    rows, cols = linear_sum_assignment(-table)
    support = []
    for i, j in zip(rows, cols, strict=True):
        members = (image_labels == i) & (text_labels == j)
        pair_images[members].mean(axis=0)
        texts[members].mean(axis=0)
        support.append(int(members.sum()))
    return np.asarray(support)


def memory_mapped_shards(folder: Path, caption_image: np.ndarray, shard_images: int) -> list:
    """The embeddings in ``folder`` as shards of ``shard_images`` images with all their captions. Each load maps
    the files afresh and keeps only its rows: once a pass drops the shard, its pages leave the resident set, as
    a store's shards do."""
    from hf_pds.shards import PairShard, ShardRef

    n_images = len(np.load(folder / "image_embeds.npy", mmap_mode="r"))
    refs = []
    for index, first in enumerate(range(0, n_images, shard_images)):
        last = min(first + shard_images, n_images)
        start, stop = np.searchsorted(caption_image, [first, last])  # captions are grouped by image, in order

        def load(first=first, last=last, start=start, stop=stop):
            return PairShard(
                np.load(folder / "image_embeds.npy", mmap_mode="r")[first:last],
                np.load(folder / "text_embeds.npy", mmap_mode="r")[start:stop],
                caption_image[start:stop] - first,
            )

        refs.append(ShardRef(index, last - first, int(stop - start), f"shard-{index}", load))
    return refs


def _run(folder: str, method: str, budget: int, device: str, queue, shard_images: int = SHARD_IMAGES) -> None:
    """One measurement, in a process of its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    image_embeds = np.load(Path(folder) / "image_embeds.npy", mmap_mode="r")
    text_embeds = np.load(Path(folder) / "text_embeds.npy", mmap_mode="r")
    caption_image = np.load(Path(folder) / "caption_image.npy")
    options = {}
    if method == "torch":
        import torch

        torch.empty(1, device=device)  # import torch and start the device before the clock
        options = {"device": device}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if method == "reference":
        support = reference_prototypes(image_embeds, text_embeds, caption_image, budget)
    elif method == "sharded":
        from hf_pds.prototypes import extract_prototypes_sharded

        del image_embeds, text_embeds  # each shard maps the files itself
        shards = memory_mapped_shards(Path(folder), caption_image, shard_images)
        support = extract_prototypes_sharded(shards, budget, kmeans_backend="faiss").support
    else:
        from hf_pds import extract_prototypes

        support = extract_prototypes(
            image_embeds, text_embeds, caption_image, budget, kmeans_backend=method, **options
        ).support
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "seconds": seconds,
            "peak_mib": peak / 1024,
            "added_mib": (peak - baseline) / 1024,
            "matched": int(support.sum()),
        }
    )


def measure(folder: Path, method: str, budget: int, device: str = "cpu", shard_images: int = SHARD_IMAGES) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(str(folder), method, budget, device, queue, shard_images))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="flickr30k", help="comma-separated: flickr30k, coco, small")
    parser.add_argument("--budgets", default="100,500,1000", help="comma-separated budgets")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--device", default="cpu", help="device of the torch method: cpu (default), cuda, cuda:1")
    parser.add_argument("--shard-images", type=int, default=SHARD_IMAGES, help="images per shard (sharded method)")
    parser.add_argument("--json", help="also append the results to this JSON-lines file")
    args = parser.parse_args()
    command = "python benchmarks/prototypes.py " + " ".join(sys.argv[1:])
    print(f"# {command}")
    print("| shape | pairs | budget | method | seconds | peak RSS (MiB) | matched pairs | speed-up vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_images, per_image = SHAPES[shape]
        with tempfile.TemporaryDirectory(prefix="pds-bench-") as folder:
            make_embeddings(n_images, per_image, Path(folder))
            for budget in (int(value) for value in args.budgets.split(",")):
                reference_seconds = None
                for method in args.methods.split(","):
                    result = measure(Path(folder), method, budget, args.device, args.shard_images)
                    if method == "reference":
                        reference_seconds = result["seconds"]
                    ratio = f"{reference_seconds / result['seconds']:.1f}x" if reference_seconds else "-"
                    name = "reference" if method == "reference" else f"hf-pds ({method})"
                    if method == "torch":
                        name = f"hf-pds (torch, {args.device})"
                    print(
                        f"| {shape} | {n_images * per_image} | {budget} | {name} | {result['seconds']:.1f} | "
                        f"{result['peak_mib']:.0f} | {result['matched']} | {ratio} |",
                        flush=True,
                    )
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as file:
                            file.write(
                                json.dumps(
                                    {
                                        "shape": shape,
                                        "budget": budget,
                                        "method": method,
                                        "device": args.device,
                                        **result,
                                    }
                                )
                                + "\n"
                            )


if __name__ == "__main__":
    main()
