"""Step 1 of PDS: raw CLIP embeddings of the images and captions of a ``datasets.Dataset``.

A row of the dataset is one image with one caption (a string) or several (a list of strings). Each
image is embedded once; each caption is one pair, pointing at its image through ``caption_image``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .distributed import SINGLE_PROCESS, aligned_batches, gather_rows

logger = logging.getLogger(__name__)


@dataclass
class CaptionTable:
    """The pairs of a dataset, before any model runs.

    Attributes:
        rows: ``[n_images]`` dataset row of each image that is used.
        captions: ``[n_captions]`` every caption, flattened in row order.
        caption_image: ``[n_captions]`` position in ``rows`` of each caption's image.
        skipped_rows: dataset rows left out because their image or caption was missing.
    """

    rows: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    skipped_rows: list[int]


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


def _caption_problem(value) -> str | None:
    """Why a caption cell cannot be used, or None when it can."""
    if value is None:
        return "is None"
    if isinstance(value, str):
        return "is an empty string" if not value.strip() else None
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return "is an empty list"
        for position, caption in enumerate(value):
            if not isinstance(caption, str):
                return f"has a {type(caption).__name__} at position {position}, expected a string"
            if not caption.strip():
                return f"has an empty caption at position {position}"
        return None
    return f"is a {type(value).__name__}, expected a string or a list of strings"


def _missing_image_rows(dataset, image_column: str) -> np.ndarray:
    """Rows whose image cell is empty, read without decoding any image."""
    import datasets
    import pyarrow.compute as pc

    feature = dataset.features[image_column]
    column = dataset.select_columns([image_column])
    if isinstance(feature, datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))
    missing = []
    offset = 0
    for batch in column.with_format("arrow").iter(batch_size=10_000):
        values = batch.column(image_column)
        is_missing = pc.is_null(values)
        if isinstance(feature, datasets.Image):
            no_content = pc.and_(
                pc.is_null(pc.struct_field(values, "bytes")), pc.is_null(pc.struct_field(values, "path"))
            )
            is_missing = pc.or_(is_missing, pc.fill_null(no_content, True))
        missing.extend(offset + np.flatnonzero(is_missing.to_numpy(zero_copy_only=False)))
        offset += len(values)
    return np.asarray(missing, dtype=np.int64)


def check_columns(dataset, image_column: str, caption_column: str) -> None:
    """Raise unless ``dataset`` is a ``Dataset`` or ``IterableDataset`` with both columns (when known)."""
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    if dataset.column_names is None:  # a stream whose features are unknown until its first row
        return
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{role}={column!r} is not a column of the dataset; its columns are {dataset.column_names}."
            )


def collect_captions(
    dataset, image_column: str = "image", caption_column: str = "caption", skip_invalid_rows: bool = False
) -> CaptionTable:
    """Check the two columns of a map-style ``dataset`` and list its pairs, without decoding any image.

    Raises:
        ValueError: a column is missing, or (unless ``skip_invalid_rows``) a row has no image or a
            None/empty caption; the message names the first bad row.
    """
    import datasets

    check_columns(dataset, image_column, caption_column)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError("collect_captions needs a map-style datasets.Dataset; embed a stream with embed_stream.")
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows.")

    problems: dict[int, str] = {}
    for row in _missing_image_rows(dataset, image_column):
        problems[int(row)] = f"column {image_column!r} has no image"
    caption_cells = dataset.select_columns([caption_column]).with_format(None)[caption_column]
    for row, value in enumerate(caption_cells):
        problem = _caption_problem(value)
        if problem is not None:
            problems.setdefault(row, f"column {caption_column!r} {problem}")

    if problems and not skip_invalid_rows:
        first = min(problems)
        raise ValueError(
            f"Row {first}: {problems[first]}. {len(problems)} row(s) of {len(dataset)} are unusable "
            f"(first rows: {sorted(problems)[:10]}). Fix them, or pass skip_invalid_rows=True to leave them out."
        )
    if problems:
        logger.warning("Skipping %d of %d rows with a missing image or caption.", len(problems), len(dataset))

    rows, captions, caption_image = [], [], []
    for row, value in enumerate(caption_cells):
        if row in problems:
            continue
        for caption in [value] if isinstance(value, str) else value:
            captions.append(caption)
            caption_image.append(len(rows))
        rows.append(row)
    if not rows:
        raise ValueError("No usable row is left: every row has a missing image or caption.")
    return CaptionTable(
        rows=np.asarray(rows, dtype=np.int64),
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        skipped_rows=sorted(problems),
    )


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as RGB: transparency composited on white, 16-bit greyscale scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = image.point(lambda value: value / 257).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@torch.no_grad()
def embed_images(
    images, image_encoder, feature_extractor, device: torch.device | str, progress: bool = True
) -> np.ndarray:
    """Projected CLIP image embeddings ``[n, d]`` (float32) of an iterable of batches of PIL images."""
    dtype = next(image_encoder.parameters()).dtype
    chunks = []
    with tqdm(total=getattr(images, "total", None), desc="Embedding images", unit="img", disable=not progress) as bar:
        for batch in images:
            pixels = feature_extractor(images=[to_rgb(image) for image in batch], return_tensors="pt").pixel_values
            embeds = image_encoder(pixels.to(device=device, dtype=dtype)).image_embeds
            chunks.append(embeds.float())
            bar.update(len(batch))
    if not chunks:
        return torch.zeros((0, image_encoder.config.projection_dim), device=device)
    return torch.cat(chunks)


@torch.no_grad()
def embed_texts(
    batches: list[list[str]],
    text_encoder,
    tokenizer,
    device: torch.device | str,
    progress: bool = True,
) -> torch.Tensor:
    """Projected CLIP text embeddings ``[n, d]`` (float32, on ``device``) of batches of captions.

    Captions are padded to the tokenizer's full length so that a caption's embedding does not depend on
    which other captions share its batch.
    """
    chunks = []
    total = sum(len(batch) for batch in batches)
    with tqdm(total=total, desc="Embedding captions", unit="caption", disable=not progress) as bar:
        for batch in batches:
            tokens = tokenizer(
                batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            )
            embeds = text_encoder(
                input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
            ).text_embeds
            chunks.append(embeds.float())
            bar.update(len(batch))
    return torch.cat(chunks)


def _in_batches(items: list, batch_size: int) -> list[list]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


class _ImageBatches:
    """Decoded images of dataset rows, batch by batch, with a length for progress bars."""

    def __init__(self, dataset, image_column: str, batches: list[list[int]]):
        import datasets

        column = dataset.select_columns([image_column]).with_format(None)
        if not isinstance(column.features[image_column], datasets.Image):
            column = column.cast_column(image_column, datasets.Image())
        self._column = column.select([row for batch in batches for row in batch])
        self._name = image_column
        self._sizes = [len(batch) for batch in batches]
        self.total = len(self._column)

    def __iter__(self):
        start = 0
        for size in self._sizes:
            yield self._column[start : start + size][self._name]
            start += size


def embed_dataset(
    dataset,
    table: CaptionTable,
    image_column: str,
    image_encoder,
    feature_extractor,
    text_encoder,
    tokenizer,
    device: torch.device | str,
    batch_size: int = 64,
    progress: bool = True,
    state=SINGLE_PROCESS,
) -> Embeddings:
    """Embed the images of ``table.rows`` (once each) and every caption of ``table``.

    Under several processes (``state``, an ``accelerate.PartialState``), each embeds a share of the batches
    of images and of captions (the same batches as on one process), and every process gets all the
    embeddings back, in order.
    """
    progress = progress and state.is_main_process
    image_batches = [[table.rows[i] for i in batch] for batch in aligned_batches(len(table.rows), batch_size, state)]
    image_embeds = embed_images(
        _ImageBatches(dataset, image_column, image_batches), image_encoder, feature_extractor, device, progress
    )
    text_batches = [
        [table.captions[i] for i in batch] for batch in aligned_batches(len(table.captions), batch_size, state)
    ]
    text_embeds = embed_texts(text_batches, text_encoder, tokenizer, device, progress)
    return Embeddings(
        image_embeds=gather_rows(image_embeds, len(table.rows), state).cpu().numpy(),
        text_embeds=gather_rows(text_embeds, len(table.captions), state).cpu().numpy(),
        caption_image=table.caption_image,
        captions=table.captions,
        rows=table.rows,
        skipped_rows=table.skipped_rows,
    )


def _decoded(cell) -> PIL.Image.Image | None:
    """A stream's image cell as a PIL image: streams of unknown features yield ``{"bytes", "path"}``."""
    if isinstance(cell, dict):
        import datasets

        return datasets.Image().decode_example(cell) if cell.get("bytes") or cell.get("path") else None
    return cell


def embed_stream(
    dataset,
    image_column: str,
    caption_column: str,
    image_encoder,
    feature_extractor,
    text_encoder,
    tokenizer,
    device: torch.device | str,
    batch_size: int = 64,
    skip_invalid_rows: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Embed an ``IterableDataset`` in one pass, holding one batch of images at a time.

    Each row is checked as it arrives, before its image is embedded: a row without an image or with an
    empty caption raises ``ValueError`` naming it (or is skipped with ``skip_invalid_rows``).
    """
    rows: list[int] = []
    captions: list[str] = []
    caption_image: list[int] = []
    skipped: list[int] = []

    def image_batches():
        batch = []
        for row, example in enumerate(dataset):
            for column in (image_column, caption_column):
                if column not in example:
                    raise ValueError(f"Column {column!r} is not in the stream; its rows have {sorted(example)}.")
            image = _decoded(example[image_column])
            problem = f"column {image_column!r} has no image" if image is None else None
            caption_problem = _caption_problem(example[caption_column])
            problem = problem or (caption_problem and f"column {caption_column!r} {caption_problem}")
            if problem:
                if not skip_invalid_rows:
                    raise ValueError(f"Row {row}: {problem}. Fix it, or pass skip_invalid_rows=True to leave it out.")
                skipped.append(row)
                continue
            value = example[caption_column]
            for caption in [value] if isinstance(value, str) else value:
                captions.append(caption)
                caption_image.append(len(rows))
            rows.append(row)
            batch.append(image)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    image_embeds = embed_images(image_batches(), image_encoder, feature_extractor, device, progress).cpu().numpy()
    if skipped:
        logger.warning("Skipped %d of %d rows with a missing image or caption.", len(skipped), len(rows) + len(skipped))
    if not rows:
        raise ValueError("No usable row is left: the stream is empty, or every row has a missing image or caption.")
    text_embeds = (
        embed_texts(_in_batches(captions, batch_size), text_encoder, tokenizer, device, progress).cpu().numpy()
    )
    return Embeddings(
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        captions=captions,
        rows=np.asarray(rows, dtype=np.int64),
        skipped_rows=skipped,
    )
