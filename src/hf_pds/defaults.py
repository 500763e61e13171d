"""The defaults of ``PDSPipeline.__call__``, which ``hf-pds distill`` shows as its own.

They live here, in a module that imports nothing, so that ``hf-pds distill --help`` can show them without
importing torch and diffusers (seconds); the pipeline's signature, synthesis and the command line all read them
from here.
"""

from __future__ import annotations

# The checkpoint that ``hf-pds distill`` loads without --pipeline.
DEFAULT_CHECKPOINT = "stabilityai/stable-diffusion-2-1-unclip-small"
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_PRUNE_RATIO = 0.2
DEFAULT_SEED = 42
DEFAULT_KMEANS_BACKEND = "auto"
# The paper's generation settings (PDS, Sec. 4 and its reference code).
DEFAULT_NUM_INFERENCE_STEPS = 100
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_NOISE_LEVEL = 10
DEFAULT_NEGATIVE_PROMPT = "text, watermark"
DEFAULT_OUTPUT_SIZE = 224
DEFAULT_CANDIDATES = 1  # the paper's one image per prototype
# Prototypes decoded per unCLIP call on an accelerator.
DEFAULT_BATCH_SIZE = 8
# Images or captions per CLIP forward pass: on a CPU, and on an accelerator.
EMBEDDING_BATCH_SIZES = {"cpu": 64, "accelerator": 256}
# Threads that decode images ahead of the CLIP image encoder, at most.
MAX_DECODE_WORKERS = 8
# Fast presets: a scheduler built from the checkpoint's scheduler config, and its default number of steps. Their
# quality against the paper's 100 PNDM steps is not measured by hf-pds.
SCHEDULER_PRESETS = {"dpm++": ("DPMSolverMultistepScheduler", 25)}


def default_steps(scheduler: str | None) -> int:
    """The number of denoising steps of the checkpoint's scheduler (None: the paper's) or of a fast preset."""
    return DEFAULT_NUM_INFERENCE_STEPS if scheduler is None else SCHEDULER_PRESETS[scheduler][1]
