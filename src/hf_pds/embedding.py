"""Step 1 of PDS: raw CLIP embeddings of the images and captions of a dataset, through the embedding cache.

Each image is embedded once; each caption is one pair, pointing at its image through ``caption_image``. The result
is a store of fixed-size shards on disk (:mod:`hf_pds.shards`). A map-style dataset's shards are shared between
processes, each writing its own, into the embedding cache (resumable shard by shard) or a temporary folder; a stream
is read once, by the main process, one batch of images at a time, its rows checked as they arrive, and written as a
store.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import EmbeddingCache, towers_description
from .defaults import DEFAULT_EMBEDDING_DTYPE
from .distributed import SINGLE_PROCESS, barrier, broadcast, process_share
from .pairs import (
    PairTable,
    caption_problem,
    captions_of,
    dataset_identity,
    decode_rgb,
    report_problems,
    undecoded_cells,
)
from .shards import (
    DEFAULT_SHARD_IMAGES,
    ShardRef,
    Store,
    StoreArrays,
    finish_store,
    finished_shards,
    shard_spans,
    write_shard,
    write_store,
)

logger = logging.getLogger(__name__)


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
    """What the embedding stage gives: raw (not normalised) projected CLIP embeddings in a store, with the pairs.

    ``store`` holds the shards (:class:`hf_pds.shards.Store`: ``store.shards`` for passes over them,
    ``store.arrays()`` for the whole of it in memory); pair ``k`` of the store (shard after shard) is caption
    ``caption_texts[k]`` (:meth:`captions` reads several); ``skipped_rows`` are the dataset rows left out as
    unusable. The attributes ``image_embeds``, ``text_embeds``, ``caption_image`` and ``rows`` read the whole store
    into memory once (the in-memory path).

    Shards that are not cached live in a temporary folder (``scratch``, the main process's) until :meth:`close`:
    use the object as a context manager (``with embed(...) as embeddings:``) to remove it when the block ends;
    otherwise it is removed when the object is garbage-collected, or at exit.
    """

    store: Store
    caption_texts: list[str]
    skipped_rows: list[int]
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    state: Any = field(default=SINGLE_PROCESS, repr=False)

    @cached_property
    def arrays(self) -> StoreArrays:
        return self.store.arrays()

    @property
    def image_embeds(self) -> np.ndarray:
        return self.arrays.image_embeds

    @property
    def text_embeds(self) -> np.ndarray:
        return self.arrays.text_embeds

    @property
    def caption_image(self) -> np.ndarray:
        return self.arrays.caption_image

    @property
    def rows(self) -> np.ndarray:
        return self.store.rows()

    @property
    def shards(self) -> list[ShardRef]:
        return self.store.shards

    @property
    def n_images(self) -> int:
        return self.store.n_images

    @property
    def n_pairs(self) -> int:
        return self.store.n_pairs

    def captions(self, pairs) -> list[str]:
        """The captions of pairs ``pairs`` (indices into the store's pairs), in that order."""
        return [self.caption_texts[int(pair)] for pair in pairs]

    def close(self) -> None:
        """Remove the temporary folder of uncached shards, once every process is done with them (a barrier)."""
        barrier(self.state)
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _scratch(state) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """A temporary folder for one run's uncached shards (in ``$TMPDIR``), made by the main process; its path on
    every process (the processes of one embedding stage share a file system, as they share the cache)."""
    scratch = tempfile.TemporaryDirectory(prefix="hf-pds-embeddings-") if state.is_main_process else None
    return scratch, Path(broadcast(scratch and scratch.name, state))


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
    shard_size: int = DEFAULT_SHARD_IMAGES,
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
) -> Embeddings:
    """Embed ``dataset``: its ``pairs`` (a map-style dataset, checked by :func:`hf_pds.pairs.read_pairs`) or, with
    ``pairs=None``, a stream read once by the main process. Every process gets the same :class:`Embeddings` (a
    store of shards of ``shard_size`` images, embeddings stored as ``dtype``: see :func:`hf_pds.shards.write_store`).

    A map-style dataset is embedded shard by shard, each process embedding and writing its own shards
    (:func:`embed_pairs`); nothing is gathered. With a ``cache``, its embeddings are read from it when the same
    dataset (its table and the content of the image files it points to: :func:`hf_pds.pairs.dataset_identity`),
    columns, row policy, towers, dtype and shard size were embedded before, and written to it otherwise: a run
    killed in the middle leaves its finished shards, and the next run embeds only the others. Without a cache (or
    with one that cannot be written) the shards go to a temporary folder, removed by :meth:`Embeddings.close`.
    ``workers`` threads decode a map-style dataset's images ahead of the encoder (a stream is read one batch at a
    time).
    """
    progress = progress and state.is_main_process
    if pairs is None:
        scratch, folder = _scratch(state)
        found = None
        if state.is_main_process:
            arrays, captions, skipped_rows = embed_stream(
                dataset, image_column, caption_column, towers, device, batch_size, skip_invalid_rows, progress
            )
            found = write_store(folder / "shards", arrays, shard_size=shard_size, dtype=dtype), captions, skipped_rows
        store, captions, skipped_rows = broadcast(found, state)
        return Embeddings(store, captions, skipped_rows, scratch, state)
    key = staging = scratch = None
    if cache is not None:
        source = {
            "dataset": dataset_identity(dataset, pairs),  # its table and the image files its cells point to
            "image_column": image_column,
            "caption_column": caption_column,
            "skip_invalid_rows": skip_invalid_rows,
        }
        key = cache.key(source, towers, dtype=dtype, shard_size=shard_size)
        cached = broadcast(cache.load(key) if state.is_main_process else None, state)
        if cached is not None:
            return Embeddings(cached, pairs.captions, pairs.skipped_rows, state=state)
        staging = broadcast(cache.staging(key) if state.is_main_process else None, state)
    if staging is None:
        scratch, folder = _scratch(state)
        staging = folder / "shards.partial"
    try:
        embed_pairs(
            dataset, pairs, image_column, towers, device, staging, batch_size, progress, state, workers,
            shard_size=shard_size, dtype=dtype,
        )  # fmt: skip
        barrier(state)
        store = None
        if state.is_main_process:
            n_shards = math.ceil(len(pairs.rows) / shard_size)
            if scratch is None:
                store = cache.finish(key, n_shards, dtype=dtype, shard_size=shard_size)
            else:
                store = finish_store(staging, folder / "shards", n_shards, dtype=dtype, shard_size=shard_size)
        store = broadcast(store, state)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    return Embeddings(store, pairs.captions, pairs.skipped_rows, scratch, state)


@torch.no_grad()
def embed_images(
    batches: Iterable[torch.Tensor],
    towers: ClipTowers,
    device: torch.device | str,
    total: int | None,
    progress: bool = True,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Image embeddings ``[n, d]`` (float32, on ``device``) of batches of the towers' input (``towers.pixels``),
    counted on ``bar`` when given (else on a bar of their own)."""
    chunks = []
    if bar is None:
        bar = own = tqdm(total=total, desc="Embedding images", unit="img", disable=not progress)
    else:
        own = nullcontext()
    with own:
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
    batches: list[list[str]],
    towers: ClipTowers,
    device: torch.device | str,
    progress: bool = True,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Text embeddings ``[n, d]`` (float32, on ``device``) of batches of captions, counted on ``bar`` when given
    (else on a bar of their own)."""
    chunks = []
    total = sum(len(batch) for batch in batches)
    if bar is None:
        bar = own = tqdm(total=total, desc="Embedding captions", unit="caption", disable=not progress)
    else:
        own = nullcontext()
    with own:
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
    staging: str | os.PathLike,
    batch_size: int = 64,
    progress: bool = True,
    state=SINGLE_PROCESS,
    workers: int = 1,
    *,
    shard_size: int = DEFAULT_SHARD_IMAGES,
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
) -> list[int]:
    """Embed this process's shards of ``pairs`` and write each into ``staging``; return the indices it wrote.

    Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)`` of ``pairs.rows`` (each embedded once) with
    every caption of those images. Each process (``state``, an ``accelerate.PartialState``) takes its contiguous
    share of the shards (:func:`hf_pds.distributed.process_share`) and embeds them in batches of ``batch_size``
    counted from the shard's start, so a shard has the same bits whatever the number of processes. Shards already
    in ``staging`` (:func:`hf_pds.shards.finished_shards`: an interrupted run's) are not embedded again. Nothing is
    gathered: the caller finishes the store (:func:`hf_pds.shards.finish_store`) once every process is done.
    ``workers`` threads decode and pre-process the images, ahead of the encoder.
    """
    staging = Path(staging)
    spans = shard_spans(pairs.caption_image, len(pairs.rows), shard_size)
    share = process_share(len(spans), state)
    finished = finished_shards(staging)
    todo = [index for index in share if index not in finished]
    if len(todo) < len(share):
        logger.info(
            "Resuming: %d of %d shard(s) are already embedded in %s.", len(share) - len(todo), len(share), staging
        )
    total = sum(spans[index][1] - spans[index][0] + spans[index][3] - spans[index][2] for index in todo)
    with tqdm(total=total, desc="Embedding images and captions", unit="row", disable=not progress) as bar:
        for index in todo:
            image_start, image_end, pair_start, pair_end = spans[index]
            rows = pairs.rows[image_start:image_end]
            image_batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
            pixels = _pixel_batches(dataset, image_column, image_batches, towers, workers)
            image_embeds = embed_images(pixels, towers, device, total=None, bar=bar)
            captions = pairs.captions[pair_start:pair_end]
            text_batches = [captions[start : start + batch_size] for start in range(0, len(captions), batch_size)]
            text_embeds = embed_texts(text_batches, towers, device, bar=bar)
            caption_image = pairs.caption_image[pair_start:pair_end] - image_start
            write_shard(
                staging, index, image_embeds.cpu().numpy(), text_embeds.cpu().numpy(), caption_image, rows, dtype
            )
    return todo


def embed_stream(
    dataset,
    image_column: str,
    caption_column: str,
    towers: ClipTowers,
    device: torch.device | str,
    batch_size: int = 64,
    skip_invalid_rows: bool = False,
    progress: bool = True,
) -> tuple[StoreArrays, list[str], list[int]]:
    """Embed an ``IterableDataset`` in one pass, holding one batch of images at a time; return its arrays, its
    captions (one per pair) and the rows it skipped.

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
    arrays = StoreArrays(
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        rows=np.asarray(rows, dtype=np.int64),
    )
    return arrays, captions, sorted(problems)
