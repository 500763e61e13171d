"""The defaults of ``PDSPipeline.__call__``, which ``hf-pds distill`` shows as its own.

They live here, in a module that imports nothing, so that ``hf-pds distill --help`` can show them without
importing torch and diffusers (seconds); the pipeline's signature, synthesis and the command line all read them
from here.
"""

from __future__ import annotations

# The checkpoint that ``hf-pds distill`` loads without --pipeline: the paper's, where it lives since Stability AI
# withdrew its own from the Hub (November 2025).
DEFAULT_CHECKPOINT = "sd2-community/stable-diffusion-2-1-unclip-small"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_PRUNE_RATIO = 0.2
DEFAULT_SEED = 42
DEFAULT_KMEANS_BACKEND = "auto"
# The prototype stage: "in-memory" (every embedding in one process's memory, k-means over every point) or "sharded"
# (passes over the embedding shards, k-means trained on a sample: memory bounded by one shard); "auto" takes the
# in-memory stage up to IN_MEMORY_PAIRS pairs (docs/performance.md, "Large datasets", has the measurements).
PROTOTYPE_STAGES = ("auto", "in-memory", "sharded")
DEFAULT_PROTOTYPE_STAGE = "auto"
IN_MEMORY_PAIRS = 600_000  # COCO (566k pairs) stays in memory; at 1M pairs that stage peaked at 17.7 GiB
# How the embedding cache stores embeddings: float32, or float16 (half the disk; docs/performance.md measures what
# it changes in the prototypes).
EMBEDDING_DTYPES = ("float32", "float16")
DEFAULT_EMBEDDING_DTYPE = "float32"
# The paper's generation settings (PDS, Sec. 4 and its reference code): the unclip decoder's defaults. Every other
# decoder declares its authors' own (hf_pds.decoders).
DEFAULT_NUM_INFERENCE_STEPS = 100
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_NOISE_LEVEL = 10
DEFAULT_NEGATIVE_PROMPT = "text, watermark"
DEFAULT_OUTPUT_SIZE = 224
DEFAULT_CANDIDATES = 1  # the paper's one image per prototype
# Prototypes decoded per decoder call on an accelerator.
DEFAULT_BATCH_SIZE = 8
# Images or captions per CLIP forward pass: on a CPU, and on an accelerator.
EMBEDDING_BATCH_SIZES = {"cpu": 64, "accelerator": 256}
# Threads that decode images ahead of the CLIP image encoder, at most.
MAX_DECODE_WORKERS = 8
# The embedded demo (``hf-pds distill`` with no --dataset): its budget and PDS settings. Its encoders live in two
# spaces (1280-d and 384-d), so there is no image-text cosine: no pruning, and the prototypes come out sorted by
# support. Clustering the raw features (normalize=False) kept every digit (benchmarks/digits_demo.py).
DEMO_SETTINGS = {"budget": 10, "prune_ratio": 0.0, "normalize": False, "seed": 42}
# The tiny random unCLIP of --pipeline tiny decodes noise: fewer steps keep it under a minute on a laptop.
TINY_NUM_INFERENCE_STEPS = 25
# Fast presets: a scheduler built from the checkpoint's scheduler config, and its default number of steps. Their
# quality against the paper's 100 PNDM steps is not measured by hf-pds.
SCHEDULER_PRESETS = {"dpm++": ("DPMSolverMultistepScheduler", 25)}


def default_steps(scheduler: str | None, decoder_steps: int | None = DEFAULT_NUM_INFERENCE_STEPS) -> int | None:
    """The number of denoising steps of a fast preset, or (``scheduler`` None) the decoder's default
    (``decoder_steps``: the paper's for unCLIP; None for a decoder that runs no diffusion model)."""
    return decoder_steps if scheduler is None else SCHEDULER_PRESETS[scheduler][1]
