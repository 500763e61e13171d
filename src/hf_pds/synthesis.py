"""Step 7 of PDS: decode image prototypes into images with unCLIP, in batches, one seed per prototype."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from .distributed import SINGLE_PROCESS
from .pairs import encode_png

# The paper's generation settings (PDS, Sec. 4 and its reference code).
DEFAULT_NUM_INFERENCE_STEPS = 100
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_NOISE_LEVEL = 10
DEFAULT_NEGATIVE_PROMPT = "text, watermark"
DEFAULT_OUTPUT_SIZE = 224
# Fast presets: a scheduler built from the checkpoint's scheduler config, and its default number of steps. Their
# quality against the paper's 100 PNDM steps is not measured by hf-pds.
SCHEDULER_PRESETS = {"dpm++": ("DPMSolverMultistepScheduler", 25)}


def preset_scheduler(preset: str, config):
    """The scheduler of a fast ``preset`` (see :data:`SCHEDULER_PRESETS`), built from a scheduler config."""
    import diffusers

    class_name, _ = SCHEDULER_PRESETS[preset]
    return getattr(diffusers, class_name).from_config(config)


def default_steps(scheduler: str | None) -> int:
    """The number of denoising steps of the checkpoint's scheduler (None: the paper's) or of a fast preset."""
    return DEFAULT_NUM_INFERENCE_STEPS if scheduler is None else SCHEDULER_PRESETS[scheduler][1]


def compile_unet(unet, enabled: bool) -> None:
    """Regional compilation: ``torch.compile`` each repeated block of the UNet in place (its transformer blocks,
    as diffusers declares them), which compiles a block once for all its copies; ``enabled=False`` undoes it.

    Compiled kernels round differently from eager ones, so a run records whether it compiled."""
    names = getattr(unet, "_repeated_blocks", None) or ()
    for block in (module for module in unet.modules() if type(module).__name__ in names):
        if enabled and getattr(block, "_compiled_call_impl", None) is None:
            block.compile(fullgraph=True)
        elif not enabled:
            block._compiled_call_impl = None  # where nn.Module.compile keeps the compiled call


def prototype_seed(run_seed: int, index: int) -> int:
    """The seed of prototype ``index``: a function of the run seed and the index alone.

    So the image of a prototype depends neither on the batch size nor on which other prototypes are
    generated with it.
    """
    return int(np.random.SeedSequence([int(run_seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def resize(image: PIL.Image.Image, output_size: int | None) -> PIL.Image.Image:
    """Square ``output_size`` x ``output_size`` with LANCZOS, as the reference; None keeps the size."""
    if output_size is None or image.size == (output_size, output_size):
        return image
    return image.resize((output_size, output_size), PIL.Image.LANCZOS)


@torch.no_grad()
def synthesize(
    unclip,
    image_embeds: np.ndarray,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
    output_size: int | None = DEFAULT_OUTPUT_SIZE,
    batch_size: int = 8,
    batch_invariant: bool | None = None,
    store=None,
    state=SINGLE_PROCESS,
    progress=None,
) -> dict[int, bytes]:
    """Generate one image per row of ``image_embeds`` with a ``StableUnCLIPImg2ImgPipeline``.

    Args:
        unclip: the unCLIP pipeline whose components decode the prototypes.
        image_embeds: ``[n, d]`` raw image prototypes in the unCLIP image encoder's space.
        prompts: ``n`` captions, one per prototype.
        seeds: ``n`` seeds, one per prototype (see :func:`prototype_seed`).
        num_inference_steps, guidance_scale, noise_level, negative_prompt: passed to unCLIP.
        output_size: side of the square output images; None keeps the decoder's size.
        batch_size: prototypes decoded together, unless ``batch_invariant``.
        batch_invariant: decode one image per call, so that images are bit-identical for any
            ``batch_size``. Defaults to True on a CPU and False on an accelerator (see below).
        store: an :class:`~hf_pds.run_state.ImageStore`: images found there are not made again, and each
            new image is saved there as soon as its batch is done.
        state: the ``accelerate.PartialState`` of a run on several processes; each makes its share of
            the batches.
        progress: an object with ``update(n)`` (a tqdm bar), told after each batch.

    Returns:
        ``{prototype index: PNG bytes}`` of the images of this process's batches.

    Each image gets its own CPU generator, so its noise is the same whatever the batch. The arithmetic
    is another matter: batched kernels (oneDNN convolutions, small-batch GEMMs, cuBLAS) round differently
    for different batch shapes, which can move a pixel by one level. Batches are therefore fixed by
    ``batch_size`` alone (prototypes ``[0, b)``, ``[b, 2b)``, ...), whichever process makes them and
    whether or not a run is resumed. On a CPU, where batching gains little, images are by default decoded
    one per call and are bit-identical for any ``batch_size``; on an accelerator a given ``batch_size``
    always gives the same images, and another one may differ by one level in a few pixels.
    """
    if not (len(image_embeds) == len(prompts) == len(seeds)):
        raise ValueError(
            f"image_embeds, prompts and seeds must have one entry per prototype, got "
            f"{len(image_embeds)}, {len(prompts)} and {len(seeds)}."
        )
    device = unclip._execution_device
    dtype = unclip.unet.dtype
    if batch_invariant is None:
        batch_invariant = device.type == "cpu"
    images_per_call = 1 if batch_invariant else batch_size
    batches = [
        range(start, min(start + images_per_call, len(prompts))) for start in range(0, len(prompts), images_per_call)
    ]
    made = {}
    for batch in batches[state.process_index :: state.num_processes]:
        stored = [store.load(index) for index in batch] if store is not None else [None]
        if all(png is not None for png in stored):
            made.update(zip(batch, stored, strict=True))
        else:
            # unCLIP neither moves nor casts image_embeds; the batch size comes from the list of prompts.
            embeds = torch.as_tensor(np.asarray(image_embeds[batch.start : batch.stop]), dtype=dtype, device=device)
            # One CPU generator per image: the noise of an image does not depend on its batch or device.
            generators = [torch.Generator("cpu").manual_seed(seeds[index]) for index in batch]
            output = unclip(
                prompt=[prompts[index] for index in batch],
                negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
                image_embeds=embeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                noise_level=noise_level,
                generator=generators,
                output_type="pil",
            )
            for index, image in zip(batch, output.images, strict=True):
                made[index] = encode_png(resize(image, output_size))
                if store is not None:
                    store.save(index, made[index])
        if progress is not None:
            progress.update(len(batch))
    return made
