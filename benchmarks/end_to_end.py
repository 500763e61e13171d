"""End-to-end benchmark: a Flickr30k-shaped dataset through ``PDSPipeline``, against the reference code's way.

The dataset is synthetic and Flickr30k-shaped: ``--images`` encoded JPEG (or PNG) images of ``--image-size`` in a
``datasets.Dataset`` with an ``Image`` feature, ``--captions`` captions each. It has a planted concept structure:
images of one concept share a colour pattern, their captions share words (and 10% of the captions come from another
concept). The models are built from configs with random weights (speed depends on shapes only): ``--size tiny``
uses hf-pds's test components, for a CPU; ``--size real`` the published architectures of
stable-diffusion-2-1-unclip-small and CLIP ViT-L/14 (``hf_pds.testing.real_size_pds_components``), for a GPU.

hf-pds is measured through the public pipeline, in two calls that share one fresh embedding cache:

- run A, ``pipe(dataset, budget=B, num_inference_steps=1)``: the check, embedding and prototype stages, and the cost
  per image of synthesis outside the denoising loop;
- run B, ``pipe(dataset, budget=S, ...)`` at the full number of steps: it reads the embeddings from the cache (the
  script counts the CLIP text tower's forward passes to make sure) and decodes S prototypes, whose time is
  extrapolated to B.

The reference's way is timed in the same process on the same data: synthesis with the unCLIP pipeline called once
per prototype (batch 1, one shared generator) on run B's S prototypes, extrapolated to B; embedding with each image
decoded and embedded once per caption, in batches of 128 pairs, and the captions in chunks of 2000 (on
``--reference-images`` images, extrapolated to all); prototypes with ``extract_prototypes(kmeans_backend="sklearn")``,
the reference's MiniBatchKMeans call, on the same embeddings (or, with ``--skip-reference-kmeans``, hf-pds's time).

    python benchmarks/end_to_end.py --size tiny                    # CPU, about a minute
    python benchmarks/end_to_end.py --size real                    # GPU: 29000 x 5, budget 500, fp16
    python benchmarks/end_to_end.py --size real --scheduler dpm++ --compile --skip-reference-kmeans

The last line is ``end-to-end: <seconds> s (<ratio>x the reference)``: hf-pds's end-to-end seconds, and its speed-up
over the reference (the reference's seconds / hf-pds's: above 1, hf-pds is faster). Every ratio is a speed-up.
``--candidates N`` times best-of-N synthesis (N images and their scores per prototype): its cost shows in the
synthesis row.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import torch

# Per size: dataset shape, budget, timed subset, steps, batch sizes, device, dtype and torch threads (0: torch's
# default). The tiny defaults keep the whole run near a minute on two busy CPU cores (one torch thread: tiny models
# gain nothing from two, and two threads on a core that another job holds ran 40x slower); the real ones are the
# Flickr30k train split and the paper's run.
DEFAULTS = {
    "tiny": {
        "images": 300,
        "captions": 5,
        "image_size": "500x375",
        "budget": 20,
        "subset": 4,
        "steps": 100,
        "batch_size": 8,
        "device": "cpu",
        "dtype": "float32",
        "reference_images": 0,
        "threads": 1,
    },
    "real": {
        "images": 29_000,
        "captions": 5,
        "image_size": "500x375",
        "budget": 500,
        "subset": 64,
        "steps": 100,
        "batch_size": 32,
        "device": "cuda",
        "dtype": "float16",
        "reference_images": 2000,
        "threads": 0,
    },
}
IMAGES_PER_CONCEPT = 10
OFF_CONCEPT_CAPTIONS = 0.1
# The reference code: its train loader yields one (image, caption) pair at a time, 128 per batch, 4 workers; its
# text encoder takes the captions in chunks of 2000; its decoder's settings are the paper's.
REFERENCE_PAIR_BATCH = 128
REFERENCE_TEXT_CHUNK = 2000
REFERENCE_LOADER_WORKERS = 4
GUIDANCE_SCALE = 5.0
NOISE_LEVEL = 10
NEGATIVE_PROMPT = "text, watermark"
OUTPUT_SIZE = 224

COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "golden")
THINGS = (
    "dog", "cat", "bicycle", "boat", "child", "woman", "man", "horse", "car", "bird", "guitar", "ball", "tent",
    "kite", "train", "bus", "umbrella", "surfer", "skier", "climber", "crowd", "chair", "truck", "cow",
)  # fmt: skip
PLACES = (
    "on a beach", "in a park", "on a street", "in the snow", "near a lake", "in a kitchen", "on a mountain",
    "in a field", "at a market", "in a forest", "by the river", "on a bridge", "in a stadium", "at night",
)  # fmt: skip
DETAILS = ("close up", "from afar", "in the sun", "in the rain", "at dusk", "with people around", "alone", "blurry")
TEMPLATES = (
    "a {colour} {thing} {place}",
    "the {thing} is {colour} and it is {place}",
    "a photo of a {colour} {thing} {place}, {detail}",
    "{colour} {thing} seen {place} {detail}",
    "there is a {thing} {place}, mostly {colour}",
)


# --------------------------------------------------------------------------------------------------- the dataset
class Concepts:
    """The planted structure: each concept has a colour pattern (two colours, a wave frequency and direction) and
    words (a colour, a thing, a place)."""

    def __init__(self, count: int, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.colours = rng.uniform(30, 225, (count, 2, 3)).astype(np.float32)
        self.frequency = rng.uniform(1.0, 6.0, (count, 2)).astype(np.float32)
        self.words = [
            {
                "colour": COLOURS[int(rng.integers(len(COLOURS)))],
                "thing": THINGS[int(rng.integers(len(THINGS)))],
                "place": PLACES[int(rng.integers(len(PLACES)))],
            }
            for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.words)


def concept_image(concepts: Concepts, concept: int, rng: np.random.Generator, width: int, height: int, grain):
    """One distinct image of ``concept``: its wave pattern with a jittered phase, frequency and colour, computed at
    1/4 size and upsampled (cheap), plus photographic grain (so that it encodes to a photo-like size)."""
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    x = np.linspace(0, 1, small_w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, small_h, dtype=np.float32)[:, None]
    fx, fy = concepts.frequency[concept] * rng.uniform(0.9, 1.1, 2).astype(np.float32)
    wave = 0.5 + 0.5 * np.sin(6.2832 * (fx * x + fy * y) + rng.uniform(0, 6.2832))
    first, second = concepts.colours[concept] + rng.uniform(-12, 12, (2, 3)).astype(np.float32)
    pixels = wave[..., None] * first + (1 - wave[..., None]) * second
    image = PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize((width, height), PIL.Image.BILINEAR)
    return PIL.Image.fromarray((np.asarray(image, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8))


def concept_captions(concepts: Concepts, concept: int, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions of ``concept`` (each from another concept with probability 10%)."""
    captions = []
    for index in range(count):
        source = int(rng.integers(len(concepts))) if rng.random() < OFF_CONCEPT_CAPTIONS else concept
        template = TEMPLATES[index % len(TEMPLATES)]
        captions.append(template.format(**concepts.words[source], detail=DETAILS[int(rng.integers(len(DETAILS)))]))
    return captions


def build_dataset(n_images: int, n_captions: int, width: int, height: int, image_format: str, seed: int = 0):
    """The Flickr30k-shaped dataset, its images made and encoded by one thread per core, and its encoded size."""
    import datasets

    concepts = Concepts(max(2, n_images // IMAGES_PER_CONCEPT), seed)
    grain_rng = np.random.default_rng([seed, 1])
    grains = [grain_rng.normal(0, 6, (height, width, 1)).astype(np.int16) for _ in range(8)]

    def make(start: int, stop: int) -> tuple[list[dict], list[list[str]]]:
        cells, captions = [], []
        for index in range(start, stop):
            rng = np.random.default_rng([seed, 2, index])
            concept = int(rng.integers(len(concepts)))
            image = concept_image(concepts, concept, rng, width, height, grains[index % len(grains)])
            buffer = io.BytesIO()
            image.save(buffer, format=image_format, quality=90)
            cells.append({"bytes": buffer.getvalue(), "path": None})
            captions.append(concept_captions(concepts, concept, rng, n_captions))
        return cells, captions

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    chunk = 1000  # rows per Arrow table: an Arrow binary array holds at most 2 GB
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = [pool.submit(make, start, min(start + chunk, n_images)) for start in range(0, n_images, chunk)]
        tables, n_bytes = [], 0
        for part in parts:
            cells, captions = part.result()
            n_bytes += sum(len(cell["bytes"]) for cell in cells)
            tables.append(datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features))
    return datasets.concatenate_datasets(tables), n_bytes


# ------------------------------------------------------------------------------------------------ measurements
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


class ForwardCounter:
    """Counts forward passes of modules. Of the CLIP text tower, to tell whether a call read its embeddings from the
    cache: embedding a dataset always runs it, while the image tower also scores the generated images."""

    def __init__(self, *modules):
        self.calls = 0
        self.handles = [module.register_forward_hook(self._count) for module in modules]

    def _count(self, *_) -> None:
        self.calls += 1


@torch.no_grad()
def reference_embedding(dataset, towers, device: str, n_images: int) -> tuple[int, int]:
    """The reference's embedding of the first ``n_images`` rows: one (image, caption) pair at a time, so each image
    is decoded, pre-processed and embedded once per caption (128 pairs per batch); then every caption, in chunks of
    2000. Returns (image forward passes, captions)."""
    import datasets

    from hf_pds.embedding import embed_texts, in_threads

    subset = dataset.select(range(n_images))
    captions = list(subset["caption"])
    blobs = list(subset.cast_column("image", datasets.Image(decode=False))["image"])
    pairs = [(row, caption) for row in range(n_images) for caption in captions[row]]
    batches = [pairs[start : start + REFERENCE_PAIR_BATCH] for start in range(0, len(pairs), REFERENCE_PAIR_BATCH)]
    dtype = next(towers.image_encoder.parameters()).dtype

    def load(batch):
        images = [PIL.Image.open(io.BytesIO(blobs[row]["bytes"])).convert("RGB") for row, _ in batch]
        return towers.feature_extractor(images=images, return_tensors="pt").pixel_values

    workers = min(REFERENCE_LOADER_WORKERS, os.cpu_count() or 1)
    for pixels in in_threads(load, batches, workers):  # the reference's DataLoader workers, as threads
        towers.image_encoder(pixels.to(device=device, dtype=dtype)).image_embeds.cpu()
    texts = [caption for _, caption in pairs]
    chunks = [texts[start : start + REFERENCE_TEXT_CHUNK] for start in range(0, len(texts), REFERENCE_TEXT_CHUNK)]
    embed_texts(chunks, towers, device, progress=False).cpu()
    return len(pairs), len(texts)


@torch.no_grad()
def reference_synthesis(unclip, image_prototypes: np.ndarray, prompts: list[str], steps: int, device: str) -> None:
    """The reference's decoding: one unCLIP call per prototype (batch 1), noise from one shared generator seeded
    once, the paper's settings; each image resized to 224x224 (LANCZOS) and encoded as PNG, as the reference saves
    it."""
    generator = torch.Generator(device).manual_seed(42)
    dtype = unclip.unet.dtype
    for index, prompt in enumerate(prompts):
        embeds = torch.as_tensor(image_prototypes[index : index + 1], dtype=dtype, device=device)
        image = unclip(
            prompt=prompt,
            negative_prompt=NEGATIVE_PROMPT,
            image_embeds=embeds,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            noise_level=NOISE_LEVEL,
            generator=generator,
        ).images[0]
        image.resize((OUTPUT_SIZE, OUTPUT_SIZE), PIL.Image.LANCZOS).save(io.BytesIO(), format="PNG")


def timed(function, device: str) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, result


# ------------------------------------------------------------------------------------------------------ the run
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def default(name: str) -> str:
        return f"(tiny: {DEFAULTS['tiny'][name]}, real: {DEFAULTS['real'][name]})"

    parser.add_argument("--size", choices=("tiny", "real"), default="tiny", help="model sizes (tiny)")
    parser.add_argument("--images", type=int, help=f"images in the dataset {default('images')}")
    parser.add_argument("--captions", type=int, help=f"captions per image {default('captions')}")
    parser.add_argument("--image-size", help=f"WIDTHxHEIGHT of the images {default('image_size')}")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="image encoding (jpeg)")
    parser.add_argument("--budget", type=int, help=f"distilled pairs B {default('budget')}")
    parser.add_argument("--subset", type=int, help=f"prototypes S whose synthesis is timed {default('subset')}")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"denoising steps of the reference, and of hf-pds without --scheduler {default('steps')}",
    )
    parser.add_argument("--scheduler", choices=("dpm++",), help="hf-pds's fast scheduler preset (none: PNDM)")
    parser.add_argument(
        "--fast-steps", type=int, help="hf-pds's steps with --scheduler (default: the preset's, 25 for dpm++)"
    )
    parser.add_argument("--batch-size", type=int, help=f"hf-pds's synthesis batch size {default('batch_size')}")
    parser.add_argument("--embedding-batch-size", type=int, help="hf-pds's CLIP batch size (the pipeline's default)")
    parser.add_argument("--compile", action="store_true", help="hf-pds compiles the UNet's repeated blocks")
    parser.add_argument(
        "--candidates", type=int, default=1, help="hf-pds's images per prototype, best of N kept (1: the paper's)"
    )
    parser.add_argument("--decode-workers", type=int, help="hf-pds's image-decoding threads (the pipeline's default)")
    parser.add_argument("--kmeans-backend", default="auto", help="hf-pds's k-means backend (auto)")
    parser.add_argument("--device", help=f"torch device {default('device')}")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help=f"{default('dtype')}")
    parser.add_argument(
        "--reference-images",
        type=int,
        help=f"images embedded the reference's way, then extrapolated; 0: all {default('reference_images')}",
    )
    parser.add_argument(
        "--skip-reference-kmeans",
        action="store_true",
        help="do not run the reference's k-means (minutes at the Flickr30k shape): count hf-pds's time for it",
    )
    parser.add_argument(
        "--cache-dir", help="where to make the run's fresh embedding cache, removed at the end (the temp folder)"
    )
    parser.add_argument("--threads", type=int, help=f"torch threads, 0: torch's default {default('threads')}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset (0)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reference_images <= 0 or args.reference_images > args.images:
        args.reference_images = args.images
    if not 2 <= args.subset <= args.budget:
        parser.error(f"--subset must be in [2, --budget], got {args.subset}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    print(f"# python benchmarks/end_to_end.py {shlex.join(sys.argv[1:] if argv is None else argv)}", flush=True)

    import datasets

    from hf_pds import PDSPipeline, extract_prototypes
    from hf_pds.cache import EmbeddingCache
    from hf_pds.defaults import SCHEDULER_PRESETS
    from hf_pds.embedding import embed, embed_texts
    from hf_pds.pairs import read_pairs
    from hf_pds.synthesis import compile_unet, prototype_seed, synthesize
    from hf_pds.testing import real_size_pds_components, tiny_pds_components

    datasets.disable_progress_bars()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    width, height = (int(side) for side in args.image_size.lower().split("x"))
    hf_steps = args.steps if args.scheduler is None else (args.fast_steps or SCHEDULER_PRESETS[args.scheduler][1])
    # A fresh embedding cache, so that run A embeds; removed at the end.
    cache_dir = tempfile.mkdtemp(prefix="hf-pds-e2e-", dir=args.cache_dir)

    started = time.perf_counter()
    dataset, n_bytes = build_dataset(args.images, args.captions, width, height, args.format.upper(), args.seed)
    n_captions = args.images * args.captions
    print(
        f"dataset: {args.images} {args.format.upper()} images of {width}x{height} ({n_bytes / 2**20:.0f} MB) x "
        f"{args.captions} captions = {n_captions} pairs, {max(2, args.images // IMAGES_PER_CONCEPT)} planted concepts; "
        f"built in {time.perf_counter() - started:.1f} s (not timed)",
        flush=True,
    )

    started = time.perf_counter()
    components = real_size_pds_components() if args.size == "real" else tiny_pds_components()
    pipe = PDSPipeline(**components).to(device)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"device: {device_name}, torch threads: {torch.get_num_threads()}, models: {args.size} (random weights), "
        f"dtype: {args.dtype}; built in {time.perf_counter() - started:.1f} s (not timed)",
        flush=True,
    )
    scheduler_name = "PNDM" if args.scheduler is None else SCHEDULER_PRESETS[args.scheduler][0]
    print(
        f"hf-pds: budget {args.budget}, {scheduler_name} at {hf_steps} steps, batch size {args.batch_size}, "
        f"compile {args.compile}, candidates {args.candidates}, k-means backend {args.kmeans_backend}; "
        f"reference: PNDM at {args.steps} steps, "
        "batch 1, guidance 5, noise_level 10",
        flush=True,
    )

    # Warm-up, not timed: CLIP towers (one batch), and a 2-prototype synthesis (kernel selection, allocator).
    towers = pipe.towers
    width_embed = pipe.image_encoder.config.projection_dim
    rng = np.random.default_rng(1)
    cells = dataset.select(range(2)).cast_column("image", datasets.Image(decode=False))["image"]
    sample = [PIL.Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in cells]
    with torch.no_grad():
        towers.encode_pixels(towers.pixels(sample), device)
    embed_texts([dataset[0]["caption"]], towers, device, progress=False)
    warm_prompts = ["a warm-up prompt"] * 2
    warm_seeds = [prototype_seed(0, index) for index in range(2)]
    synthesize(
        pipe.make_decoder(num_inference_steps=2),
        rng.normal(size=(2, width_embed)).astype(np.float32),
        warm_prompts,
        warm_seeds,
        batch_size=2,
        batch_invariant=False,
    )
    synchronize(device)

    compile_seconds = 0.0
    if args.compile:  # the compiler's one-time cost, at the timed batch shape: counted, in its own row
        compile_unet(pipe.unet, True)
        count = min(args.batch_size, args.subset)
        compile_seconds, _ = timed(
            lambda: synthesize(
                pipe.make_decoder(num_inference_steps=1, scheduler_preset=args.scheduler),
                rng.normal(size=(count, width_embed)).astype(np.float32),
                ["a warm-up prompt"] * count,
                [prototype_seed(0, index) for index in range(count)],
                batch_size=args.batch_size,
                batch_invariant=False,
            ),
            device,
        )
        print(f"compile warm-up (batch {count}, 1 step): {compile_seconds:.1f} s, counted in the end-to-end time")

    counter = ForwardCounter(pipe.clip_text_encoder)
    options = {
        "batch_size": args.batch_size,
        "scheduler": args.scheduler,
        "compile": args.compile,
        "embedding_batch_size": args.embedding_batch_size,
        "decode_workers": args.decode_workers,
        "kmeans_backend": args.kmeans_backend,
        "cache_dir": cache_dir,
    }
    peaks = {}

    # Run A: the whole pipeline at budget B with one denoising step.
    reset_peak(device)
    seconds_a, out_a = timed(lambda: pipe(dataset, budget=args.budget, num_inference_steps=1, **options), device)
    peaks["run A"] = peak_gib(device)
    forwards_a = counter.calls
    timings_a = out_a.timings
    print(
        f"run A: pipe(dataset, budget={args.budget}, num_inference_steps=1): {seconds_a:.1f} s, "
        f"{forwards_a} CLIP text forward passes",
        flush=True,
    )

    # Run B: S prototypes at the full steps, embeddings from the cache.
    counter.calls = 0
    reset_peak(device)
    seconds_b, out_b = timed(
        lambda: pipe(dataset, budget=args.subset, num_inference_steps=hf_steps, candidates=args.candidates, **options),
        device,
    )
    peaks["run B"] = peak_gib(device)
    forwards_b = counter.calls
    cache_note = (
        "run B read its embeddings from the cache: no CLIP text forward pass"
        if forwards_b == 0
        else f"run B ran {forwards_b} CLIP text forward passes: the embedding cache was not used (not counted)"
    )
    print(
        f"run B: pipe(dataset, budget={args.subset}, num_inference_steps={hf_steps}): {seconds_b:.1f} s; {cache_note}",
        flush=True,
    )
    synthesis_b = out_b.timings["synthesis"]

    # The reference's synthesis: the same S prototypes, one call each, eager.
    compile_unet(pipe.unet, False)
    prompts = list(out_b.dataset["caption"])
    reset_peak(device)
    reference_synthesis_seconds, _ = timed(
        lambda: reference_synthesis(
            pipe.make_decoder().pipeline, out_b.prototypes.image_prototypes, prompts, args.steps, device
        ),
        device,
    )
    peaks["reference synthesis"] = peak_gib(device)
    print(f"reference synthesis of {args.subset} prototypes: {reference_synthesis_seconds:.1f} s", flush=True)

    # The reference's embedding: each image once per caption.
    reset_peak(device)
    reference_embedding_subset, (image_forwards, texts) = timed(
        lambda: reference_embedding(dataset, towers, device, args.reference_images), device
    )
    peaks["reference embedding"] = peak_gib(device)
    reference_embedding_seconds = reference_embedding_subset * args.images / args.reference_images
    print(
        f"reference embedding of {args.reference_images} images ({image_forwards} image forward passes, {texts} "
        f"captions): {reference_embedding_subset:.1f} s",
        flush=True,
    )

    # The reference's prototypes: MiniBatchKMeans (n_init=20) over repeated image rows, on the same embeddings.
    if args.skip_reference_kmeans:
        reference_prototypes_seconds = timings_a["prototypes"]
        kmeans_note = "reference prototypes: not run (--skip-reference-kmeans); hf-pds's time is counted for it"
    else:
        counter.calls = 0
        embeddings = embed(
            dataset,
            read_pairs(dataset, "image", "caption"),
            "image",
            "caption",
            towers,
            device,
            cache=EmbeddingCache(cache_dir),
            progress=False,
        )
        loaded = (
            "read from the cache" if counter.calls == 0 else f"recomputed ({counter.calls} CLIP text forward passes)"
        )
        reference_prototypes_seconds, _ = timed(
            lambda: extract_prototypes(
                embeddings.image_embeds,
                embeddings.text_embeds,
                embeddings.caption_image,
                budget=args.budget,
                seed=42,
                kmeans_backend="sklearn",
            ),
            "cpu",
        )
        kmeans_note = (
            f"reference prototypes: extract_prototypes(kmeans_backend='sklearn') on run A's embeddings ({loaded})"
        )
    print(kmeans_note, flush=True)
    for handle in counter.handles:
        handle.remove()

    # The table.
    scale = args.budget / args.subset
    synthesis_hf = synthesis_b * scale
    synthesis_reference = reference_synthesis_seconds * scale
    one_step = timings_a["synthesis"] / args.budget
    per_step = (synthesis_b / args.subset - one_step) / max(1, hf_steps - 1)
    rows = [
        ("check inputs", timings_a["check_inputs"], None),
        (
            f"embedding ({args.images} images, {n_captions} captions)",
            timings_a["embedding"],
            reference_embedding_seconds,
        ),
        (f"prototypes (budget {args.budget})", timings_a["prototypes"], reference_prototypes_seconds),
        (f"synthesis ({args.budget} images, from {args.subset})", synthesis_hf, synthesis_reference),
    ]
    if args.compile:
        rows.append(("compile (one-time)", compile_seconds, None))
    hf_total = sum(row[1] for row in rows)
    reference_total = sum(row[2] or 0.0 for row in rows)
    print()
    print(f"device: {device_name}, torch threads: {torch.get_num_threads()}, dtype: {args.dtype}")
    print("| stage | hf-pds seconds | reference seconds | speed-up (reference / hf-pds) |")
    print("|---|---|---|---|")
    for label, ours, theirs in rows:
        speedup = f"{theirs / ours:.2f}x" if theirs else "-"
        print(f"| {label} | {ours:.2f} | {'-' if theirs is None else f'{theirs:.2f}'} | {speedup} |")
    print(f"| end-to-end | {hf_total:.2f} | {reference_total:.2f} | {reference_total / hf_total:.2f}x |")
    print()
    print("| throughput | hf-pds | reference |")
    print("|---|---|---|")
    print(
        f"| embedding, images/s | {args.images / timings_a['embedding']:.1f} | "
        f"{args.reference_images / reference_embedding_subset:.1f} |"
    )
    print(
        f"| embedding, captions/s | {n_captions / timings_a['embedding']:.1f} | "
        f"{texts / reference_embedding_subset:.1f} |"
    )
    print(
        f"| synthesis, images/s ({hf_steps} / {args.steps} steps) | {args.subset / synthesis_b:.3f} | "
        f"{args.subset / reference_synthesis_seconds:.3f} |"
    )
    print(f"| synthesis, s/image at 1 step (run A: mostly outside the denoising loop) | {one_step:.4f} | - |")
    if hf_steps > 1:
        print(f"| synthesis, s/image per further step (runs A and B) | {per_step:.4f} | - |")
    print()
    print("Notes:")
    print(
        f"- synthesis was timed on {args.subset} prototypes (run B for hf-pds, the same {args.subset} for the "
        f"reference) and extrapolated linearly to {args.budget}"
    )
    print(
        f"- the reference's embedding decodes and embeds each image once per caption ({args.captions} times), "
        f"{REFERENCE_PAIR_BATCH} pairs per batch, {min(REFERENCE_LOADER_WORKERS, os.cpu_count() or 1)} decoding "
        f"threads; its images/s count distinct images"
    )
    if args.reference_images < args.images:
        print(
            f"- the reference's embedding was timed on {args.reference_images} images and extrapolated to {args.images}"
        )
    print(f"- {cache_note}")
    print(f"- {kmeans_note}")
    print("- embedding images/s and captions/s are over the whole embedding stage (images and captions together)")
    print("- hf-pds's end-to-end time counts check inputs, which the reference does not do; no output is saved")
    if device.startswith("cuda"):
        print(
            "- peak GPU memory (torch.cuda.max_memory_allocated): "
            + ", ".join(f"{name} {value:.2f} GiB" for name, value in peaks.items())
        )
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"- peak RSS of the process: {rss:.0f} MiB")
    shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"end-to-end: {hf_total:.2f} s ({reference_total / hf_total:.2f}x the reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
