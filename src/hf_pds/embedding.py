"""Step 1 of PDS: raw CLIP embeddings of the images and captions of a dataset, through the embedding cache.

Each image is embedded once; each caption is one pair, pointing at its image through ``caption_image``. A
map-style dataset is embedded in batches shared between processes and cached on disk; a stream is read once, by
the main process, one batch of images at a time, and its rows are checked as they arrive.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import EmbeddingCache, towers_description
from .distributed import SINGLE_PROCESS, aligned_batches, broadcast, gather_rows
from .pairs import (
    PairTable,
    caption_problem,
    captions_of,
    dataset_identity,
    decode_rgb,
    report_problems,
    undecoded_cells,
)

logger = logging.getLogger(__name__)

_ARRAYS = ("image_embeds", "text_embeds", "caption_image", "rows")


@dataclass(frozen=True)
class ClipTowers:
    """The two towers of one CLIP model, with their pre-processing: the space prototypes live in.

    Embedding reads towers through the members below only, so other encoders can stand in for a CLIP model (the
    ``select`` decoder's packaged encoders: :class:`hf_pds.decoders.select.PackagedTowers`).
    """

    image_encoder: Any  # transformers.CLIPVisionModelWithProjection
    feature_extractor: Any  # transformers.CLIPImageProcessor
    text_encoder: Any  # transformers.CLIPTextModelWithProjection
    tokenizer: Any  # transformers.CLIPTokenizer
    # Images and captions are embedded in one space, so their cosine means something (pruning, text_alignment).
    shares_space: ClassVar[bool] = True

    @property
    def image_dim(self) -> int:
        return self.image_encoder.config.projection_dim

    @property
    def device(self) -> torch.device:
        return next(self.image_encoder.parameters()).device

    def pixels(self, images: list) -> torch.Tensor:
        """The image encoder's input for a batch of RGB PIL images."""
        return self.feature_extractor(images=images, return_tensors="pt").pixel_values

    def encode_pixels(self, pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Projected image embeddings ``[n, d]``, float32 on ``device``, of a batch of :meth:`pixels`."""
        dtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixels.to(device=device, dtype=dtype)).image_embeds.float()

    def encode_texts(self, texts: list[str], device: torch.device | str) -> torch.Tensor:
        """Projected text embeddings ``[n, d]``, float32 on ``device``. Captions are padded to the tokenizer's full
        length, so that a caption's embedding does not depend on which other captions share its batch."""
        tokenizer = self.tokenizer
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        ).text_embeds.float()

    def description(self) -> dict:
        """What of the towers changes the embeddings: the embedding cache's key."""
        return towers_description(self)


@dataclass
class Embeddings:
    """Raw (not normalised) projected CLIP embeddings, float32, with the pair structure.

    ``image_embeds[caption_image[k]]`` is the image of caption ``k``; ``rows`` gives each image's row in
    the dataset (or stream), ``skipped_rows`` the rows left out as unusable.
    """

    image_embeds: np.ndarray
    text_embeds: np.ndarray
    caption_image: np.ndarray
    captions: list[str]
    rows: np.ndarray
    skipped_rows: list[int]


def embed(
    dataset,
    pairs: PairTable | None,
    image_column: str,
    caption_column: str,
    towers: ClipTowers,
    device: torch.device | str,
    *,
    batch_size: int = 64,
    skip_invalid_rows: bool = False,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    state=SINGLE_PROCESS,
    workers: int = 1,
) -> Embeddings:
    """Embed ``dataset``: its ``pairs`` (a map-style dataset, checked by :func:`hf_pds.pairs.read_pairs`) or, with
    ``pairs=None``, a stream read once by the main process. Every process gets the embeddings.

    With a ``cache``, a map-style dataset's embeddings are read from it when the same dataset (its table and the
    content of the image files it points to: :func:`hf_pds.pairs.dataset_identity`), columns, row policy and towers
    were embedded before, and written to it otherwise. ``workers`` threads decode a map-style dataset's
    images ahead of the encoder (a stream is read one batch at a time).
    """
    progress = progress and state.is_main_process
    if pairs is None:
        embeddings = None
        if state.is_main_process:
            embeddings = embed_stream(
                dataset, image_column, caption_column, towers, device, batch_size, skip_invalid_rows, progress
            )
        return broadcast(embeddings, state)
    key = None
    if cache is not None:
        source = {
            "dataset": dataset_identity(dataset, pairs),  # its table and the image files its cells point to
            "image_column": image_column,
            "caption_column": caption_column,
            "skip_invalid_rows": skip_invalid_rows,
        }
        key = cache.key(source, towers)
        cached = broadcast(cache.load(key) if state.is_main_process else None, state)
        if cached is not None:
            arrays, lists = cached
            return Embeddings(**arrays, **lists)
    embeddings = embed_pairs(dataset, pairs, image_column, towers, device, batch_size, progress, state, workers)
    if cache is not None and state.is_main_process:
        cache.save(
            key,
            {name: getattr(embeddings, name) for name in _ARRAYS},
            {"captions": embeddings.captions, "skipped_rows": [int(row) for row in embeddings.skipped_rows]},
        )
    return embeddings


@torch.no_grad()
def embed_images(
    batches: Iterable[torch.Tensor],
    towers: ClipTowers,
    device: torch.device | str,
    total: int | None,
    progress: bool = True,
) -> torch.Tensor:
    """Image embeddings ``[n, d]`` (float32, on ``device``) of batches of the towers' input (``towers.pixels``)."""
    chunks = []
    with tqdm(total=total, desc="Embedding images", unit="img", disable=not progress) as bar:
        for pixels in batches:
            chunks.append(towers.encode_pixels(pixels, device))
            bar.update(len(pixels))
    if not chunks:
        return torch.zeros((0, towers.image_dim), device=device)
    return torch.cat(chunks)


def in_threads(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``function(item)`` for each item, in order, computed by ``workers`` threads that run up to ``workers`` items
    ahead of the consumer (one at a time, in this thread, when ``workers`` is 1). An exception is raised when its
    item's result is due. Decoding and resizing images release the GIL, so the threads keep an accelerator fed."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@torch.no_grad()
def embed_texts(
    batches: list[list[str]], towers: ClipTowers, device: torch.device | str, progress: bool = True
) -> torch.Tensor:
    """Text embeddings ``[n, d]`` (float32, on ``device``) of batches of captions."""
    chunks = []
    total = sum(len(batch) for batch in batches)
    with tqdm(total=total, desc="Embedding captions", unit="caption", disable=not progress) as bar:
        for batch in batches:
            chunks.append(towers.encode_texts(batch, device))
            bar.update(len(batch))
    return torch.cat(chunks)


def _pixel_batches(
    dataset, image_column: str, batches: list[list[int]], towers: ClipTowers, workers: int
) -> Iterator[torch.Tensor]:
    """The encoder's input for each batch of dataset rows, decoded and pre-processed by ``workers`` threads; a row
    that cannot be decoded raises, naming it."""
    import datasets

    feature = dataset.features[image_column]
    feature = feature if isinstance(feature, datasets.Image) else None
    cells = undecoded_cells(dataset.select([int(row) for batch in batches for row in batch]), image_column)

    def batches_of_cells():  # read here, in order; the threads only decode
        for batch in batches:
            yield [(int(row), next(cells)) for row in batch]

    def prepare(batch: list[tuple[int, dict]]) -> torch.Tensor:
        images = []
        for row, cell in batch:
            image, problem = decode_rgb(cell, feature)
            if problem is not None:  # the cheap check before embedding could not tell
                report_problems({row: f"column {image_column!r} {problem}"}, None, skip_invalid_rows=False)
            images.append(image)
        return towers.pixels(images)

    return in_threads(prepare, batches_of_cells(), workers)


def embed_pairs(
    dataset,
    pairs: PairTable,
    image_column: str,
    towers: ClipTowers,
    device: torch.device | str,
    batch_size: int = 64,
    progress: bool = True,
    state=SINGLE_PROCESS,
    workers: int = 1,
) -> Embeddings:
    """Embed the images of ``pairs.rows`` (once each) and every caption of ``pairs``.

    ``workers`` threads decode and pre-process the images, ahead of the encoder. Under several processes
    (``state``, an ``accelerate.PartialState``), each embeds a share of the batches of images and of captions (the
    same batches as on one process), and every process gets all the embeddings back, in order.
    """
    image_batches = [[pairs.rows[i] for i in batch] for batch in aligned_batches(len(pairs.rows), batch_size, state)]
    image_embeds = embed_images(
        _pixel_batches(dataset, image_column, image_batches, towers, workers),
        towers,
        device,
        total=sum(len(batch) for batch in image_batches),
        progress=progress,
    )
    text_batches = [
        [pairs.captions[i] for i in batch] for batch in aligned_batches(len(pairs.captions), batch_size, state)
    ]
    text_embeds = embed_texts(text_batches, towers, device, progress)
    return Embeddings(
        image_embeds=gather_rows(image_embeds, len(pairs.rows), state).cpu().numpy(),
        text_embeds=gather_rows(text_embeds, len(pairs.captions), state).cpu().numpy(),
        caption_image=pairs.caption_image,
        captions=pairs.captions,
        rows=pairs.rows,
        skipped_rows=pairs.skipped_rows,
    )


def embed_stream(
    dataset,
    image_column: str,
    caption_column: str,
    towers: ClipTowers,
    device: torch.device | str,
    batch_size: int = 64,
    skip_invalid_rows: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Embed an ``IterableDataset`` in one pass, holding one batch of images at a time.

    Each row is checked as it arrives, before its image is embedded: a row without a decodable image or with an
    empty caption raises ``ValueError`` naming it (or is skipped with ``skip_invalid_rows``).
    """
    import datasets

    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image):
        # Decoded here, row by row, so that an undecodable image is reported with its row.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    rows: list[int] = []
    captions: list[str] = []
    caption_image: list[int] = []
    problems: dict[int, str] = {}

    def image_batches():
        batch = []
        for row, example in enumerate(dataset):
            for column in (image_column, caption_column):
                if column not in example:
                    raise ValueError(f"Column {column!r} is not in the stream; its rows have {sorted(example)}.")
            problem = caption_problem(example[caption_column])
            problem = problem and f"column {caption_column!r} {problem}"
            image = None
            if problem is None:
                image, image_problem = decode_rgb(example[image_column], feature)
                problem = image_problem and f"column {image_column!r} {image_problem}"
            if problem:
                if not skip_invalid_rows:
                    report_problems({row: problem}, None, skip_invalid_rows=False)  # raises, naming the row
                problems[row] = problem
                continue
            for caption in captions_of(example[caption_column]):
                captions.append(caption)
                caption_image.append(len(rows))
            rows.append(row)
            batch.append(image)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    pixels = (towers.pixels(batch) for batch in image_batches())  # one batch at a time: no read-ahead
    image_embeds = embed_images(pixels, towers, device, total=None, progress=progress).cpu().numpy()
    report_problems(problems, len(rows) + len(problems), skip_invalid_rows=True)
    if not rows:
        raise ValueError("No usable row is left: the stream is empty, or no row has a usable image and caption.")
    batches = [captions[start : start + batch_size] for start in range(0, len(captions), batch_size)]
    text_embeds = embed_texts(batches, towers, device, progress).cpu().numpy()
    return Embeddings(
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        captions=captions,
        rows=np.asarray(rows, dtype=np.int64),
        skipped_rows=sorted(problems),
    )
