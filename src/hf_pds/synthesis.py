"""Step 7 of PDS: decode image prototypes into images with a decoder, in batches, one seed per prototype."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_CANDIDATES, DEFAULT_OUTPUT_SIZE, SCHEDULER_PRESETS
from .distributed import SINGLE_PROCESS
from .pairs import encode_png
from .prototypes import pair_cosine


def preset_scheduler(preset: str, config):
    """The scheduler of a fast ``preset`` (see :data:`SCHEDULER_PRESETS`), built from a scheduler config."""
    import diffusers

    class_name, _ = SCHEDULER_PRESETS[preset]
    return getattr(diffusers, class_name).from_config(config)


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


def candidate_seed(prototype_seed: int, candidate: int) -> int:
    """The seed of candidate image ``candidate`` of a prototype whose seed is ``prototype_seed``: candidate 0 is the
    prototype's own seed (the one image of the paper), the others are drawn from (prototype seed, candidate), so
    from (run seed, prototype index, candidate index)."""
    if candidate == 0:
        return int(prototype_seed)
    entropy = [int(prototype_seed), int(candidate)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Generated:
    """One generated image and how faithful it is to its prototypes.

    Attributes:
        png: the image, resized to the output size, as PNG bytes.
        fidelity: cosine of the CLIP image embedding of the image (before the final resize) and its image
            prototype.
        text_alignment: cosine of the same embedding and its text prototype (NaN when no text prototype is known).
    """

    png: bytes
    fidelity: float
    text_alignment: float


def best_candidates(made: dict[tuple[int, int], Generated], count: int, candidates: int) -> list[Generated]:
    """For each of ``count`` prototypes, its candidate of highest fidelity; a tie goes to the lowest candidate."""
    return [
        max(
            (made[index, candidate] for candidate in range(candidates)),
            key=lambda image: image.fidelity,  # max keeps the first of equal keys: the lowest candidate
        )
        for index in range(count)
    ]


def resize(image: PIL.Image.Image, output_size: int | None) -> PIL.Image.Image:
    """Square ``output_size`` x ``output_size`` with LANCZOS, as the reference; None keeps the size."""
    if output_size is None or image.size == (output_size, output_size):
        return image
    return image.resize((output_size, output_size), PIL.Image.LANCZOS)


@torch.no_grad()
def image_fidelity(
    decoder,
    images: Sequence[PIL.Image.Image],
    image_prototypes: np.ndarray,
    text_prototypes: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(fidelity, text_alignment)`` of a decoder's images: the cosine of each image's CLIP embedding, by the image
    encoder that defines the prototypes' space (the decoder's), with its image prototype and with its text
    prototype (NaN without text prototypes, or when the towers embed images and texts in two spaces)."""
    towers = decoder.towers
    embeds = towers.encode_pixels(towers.pixels(list(images)), decoder.device).cpu().numpy()
    fidelity = pair_cosine(image_prototypes, embeds)
    if text_prototypes is None or not towers.shares_space:
        return fidelity, np.full(len(embeds), np.nan, dtype=np.float32)
    return fidelity, pair_cosine(text_prototypes, embeds)


@torch.no_grad()
def synthesize(
    decoder,
    image_embeds: np.ndarray,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    text_embeds: np.ndarray | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    output_size: int | None = DEFAULT_OUTPUT_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_invariant: bool | None = None,
    store=None,
    state=SINGLE_PROCESS,
    progress=None,
) -> dict[tuple[int, int], Generated]:
    """Generate ``candidates`` images per row of ``image_embeds`` with a decoder, and score each against its
    prototypes.

    Args:
        decoder: a :class:`~hf_pds.decoders.base.Decoder` bound to a pipeline's components and to the generation
            settings (``PDSPipeline.make_decoder``); its image encoder scores the images.
        image_embeds: ``[n, d]`` raw image prototypes in the decoder's image encoder's space.
        prompts: ``n`` captions, one per prototype.
        seeds: ``n`` seeds, one per prototype (see :func:`prototype_seed`); candidate ``c`` of a prototype draws
            its noise from :func:`candidate_seed` (candidate 0: the prototype's seed).
        text_embeds: ``[n, d]`` text prototypes, for ``text_alignment``; optional.
        candidates: images made per prototype (:func:`best_candidates` keeps one).
        output_size: side of the square output images; None keeps the decoder's size.
        batch_size: images decoded together, unless ``batch_invariant``.
        batch_invariant: decode one image per call, so that images are bit-identical for any
            ``batch_size``. Defaults to True on a CPU and False on an accelerator (see below).
        store: an :class:`~hf_pds.run_state.ImageStore`: images found there are not made again, and each
            new image is saved there, with its scores, as soon as its batch is done.
        state: the ``accelerate.PartialState`` of a run on several processes; each makes its share of
            the batches.
        progress: an object with ``update(n)`` (a tqdm bar), told after each batch.

    Returns:
        ``{(prototype index, candidate): Generated}`` for the images of this process's batches.

    Each image gets its own CPU generator, so its noise is the same whatever the batch. The arithmetic
    is another matter: batched kernels (oneDNN convolutions, small-batch GEMMs, cuBLAS) round differently
    for different batch shapes, which can move a pixel by one level. Batches are therefore fixed by
    ``batch_size`` alone (images ``[0, b)``, ``[b, 2b)``, ... of the list of (prototype, candidate), candidates
    of a prototype next to each other), whichever process makes them and whether or not a run is resumed; an
    image is scored in the batch that made it. On a CPU, where batching gains little, images are by default
    decoded one per call and are bit-identical for any ``batch_size``; on an accelerator a given ``batch_size``
    always gives the same images, and another one may differ by one level in a few pixels.
    """
    if not (len(image_embeds) == len(prompts) == len(seeds)):
        raise ValueError(
            f"image_embeds, prompts and seeds must have one entry per prototype, got "
            f"{len(image_embeds)}, {len(prompts)} and {len(seeds)}."
        )
    device = decoder.device
    if batch_invariant is None:
        batch_invariant = device.type == "cpu"
    images_per_call = 1 if batch_invariant else batch_size
    items = [(index, candidate) for index in range(len(prompts)) for candidate in range(candidates)]
    batches = [items[start : start + images_per_call] for start in range(0, len(items), images_per_call)]
    made = {}
    for batch in batches[state.process_index :: state.num_processes]:
        stored = [store.load(*item) for item in batch] if store is not None else [None]
        if all(image is not None for image in stored):
            made.update(zip(batch, stored, strict=True))
        else:
            rows = [index for index, _ in batch]
            # One CPU generator per image: the noise of an image does not depend on its batch or device.
            generators = [torch.Generator("cpu").manual_seed(candidate_seed(seeds[index], c)) for index, c in batch]
            images = decoder.decode(image_embeds[rows], [prompts[index] for index in rows], generators, batch)
            fidelity, alignment = image_fidelity(
                decoder,
                images,
                np.asarray(image_embeds[rows]),
                None if text_embeds is None else np.asarray(text_embeds[rows]),
            )
            for position, (item, image) in enumerate(zip(batch, images, strict=True)):
                made[item] = Generated(
                    encode_png(resize(image, output_size)), float(fidelity[position]), float(alignment[position])
                )
                if store is not None:
                    store.save(*item, made[item])
        if progress is not None:
            progress.update(len(batch))
    return made
