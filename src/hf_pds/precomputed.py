"""Embeddings computed elsewhere as the input of a run that reads no image: clip-retrieval's folders, or a dataset's
embedding columns, seen as :class:`hf_pds.shards.ShardRef` shards.

clip-retrieval's layout (LAION's published embeddings, or ``clip-retrieval inference``'s output) is
``DIR/img_emb/img_emb_{i}.npy``, ``DIR/text_emb/text_emb_{i}.npy`` and ``DIR/metadata/metadata_{i}.parquet``: row
``r`` of the three files of shard ``i`` is one pair (one image, its caption), and shards follow the number ``i``
(``img_emb_10`` after ``img_emb_2``). The arrays are memory-mapped (``np.load(mmap_mode="r")``) and the captions are
read with pyarrow, one row group at a time and only where a caption is asked for. The ``embedding-reader`` package
reads this layout too, but one modality per reader, its shards in lexicographic order, copied by up to 50 threads
into a RAM budget of its own (4 GiB by default), and it pins ``pandas<3``: the prototype stage needs both modalities
of a shard together, and memory maps already give it pieces without copies.

A ``datasets.Dataset`` whose columns hold the embeddings (DataComp's parquet files, loaded with ``load_dataset``) is
read as shards of ``shard_size`` rows of its (memory-mapped) Arrow table, each gathered into one array when loaded:
a copy of one shard, since ``datasets`` writes its Arrow files in batches of 1,000 rows whose buffers are apart.

Every check that needs no full read runs when the source is opened (the ``.npy`` headers and sizes, the parquet
footers, the Arrow list offsets): a source that opens is one the prototype stage can read. A NaN or inf row is
named (shard and row) by the prototype stage's first pass, which reads every row anyway;
:func:`check_precomputed` adds the width of the decoder and reads the first shard fully.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .distributed import all_gather, process_share
from .shards import PairShard, ShardRef

logger = logging.getLogger(__name__)

# clip-retrieval's three folders and the suffix of their files: shard ``i`` is ``{folder}/{folder}_{i}{suffix}``.
CLIP_RETRIEVAL_FILES = {"img_emb": ".npy", "text_emb": ".npy", "metadata": ".parquet"}
FLOAT_DTYPES = ("float16", "float32")
# Rows of a dataset's embedding columns per shard: 50k rows of 768-d float32 are 150 MB per modality.
DEFAULT_SHARD_ROWS = 50_000
# L2-normalisation is told from a seeded sample: this many rows of each of up to NORM_SHARDS shards spread over all.
NORM_SHARDS = 8
NORM_ROWS = 512
NORM_SEED = 0
# A row is of unit norm when its norm is within this of 1 (float16 rounding stays within 1e-3).
UNIT_NORM_TOLERANCE = 1e-2
# Rows decoded at a time while a caption is looked for in a parquet row group.
CAPTION_BATCH = 8_192
# Rows read at a time when the first shard is checked fully.
CHECK_ROWS = 65_536


class PrecomputedEmbeddings:
    """Precomputed image and text embeddings, one pair per row, as shards; captions are read only when asked for.

    Made by :func:`open_clip_retrieval` or :func:`embeddings_of_dataset`, which check everything that needs no full
    read. Pairs are numbered globally, shard after shard; each pair is its own image (``caption_image`` is None).

    Attributes:
        shards: every shard, in order (``ShardRef.load()`` memory-maps it, or slices the Arrow table).
        n_pairs: pairs (rows) in all.
        image_dim: width of the image embeddings.
        text_dim: width of the text embeddings.
        dtype: dtype of the rows a shard gives (``"float16"`` or ``"float32"``).
        folder: the clip-retrieval folder (None for a dataset's columns): an output must not be inside it.
        numbers: the number ``i`` of each shard (its files' names); a dataset's shards are numbered 0, 1, ...
        spread: whether the shards are spread over machines (:func:`spread`): each process holds only some.
        skipped_rows: always empty: no row is left out (a bad row is refused, naming it).
    """

    skipped_rows: tuple = ()
    spread: bool = False

    def __init__(
        self,
        shards: list[ShardRef],
        image_dim: int,
        text_dim: int,
        dtype: str,
        captions: _CaptionReader,
        identity: dict,
        description: dict,
        origin: str,
        folder: Path | None = None,
        numbers: list[int] | None = None,
    ):
        self.shards = shards
        self.folder = folder
        self.numbers = list(range(len(shards))) if numbers is None else numbers
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.dtype = dtype
        self.n_pairs = sum(shard.n_pairs for shard in shards)
        self._starts = np.cumsum([0] + [shard.n_pairs for shard in shards])
        self._captions = captions
        self._identity = identity
        self._description = description
        self._origin = origin
        self._norms: tuple[np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (
            f"PrecomputedEmbeddings({self._origin}: {self.n_pairs} pairs in {len(self.shards)} shards, "
            f"{self.image_dim}-d images, {self.text_dim}-d texts, {self.dtype})"
        )

    @property
    def n_images(self) -> int:
        """Images in all: each pair is its own image."""
        return self.n_pairs

    @property
    def rows(self) -> np.ndarray:
        """The row of each image: pair ``i`` is row ``i``."""
        return np.arange(self.n_pairs)

    def caption(self, pair: int) -> str:
        """The caption of global pair ``pair`` (reads only the part of its shard's captions that holds it)."""
        return self.captions([pair])[0]

    def captions(self, pairs: Sequence[int]) -> list[str]:
        """The captions of global pairs ``pairs``, in that order. Each shard's captions are read once, up to the
        last one asked for; a null caption comes back as ``""``, with a warning that names its shard and row."""
        pairs = np.asarray(pairs)
        if pairs.ndim != 1 or (len(pairs) and not np.issubdtype(pairs.dtype, np.integer)):
            raise ValueError(f"pairs must be a sequence of integers, got {pairs.dtype} of shape {pairs.shape}.")
        outside = np.flatnonzero((pairs < 0) | (pairs >= self.n_pairs))
        if len(outside):
            raise ValueError(f"pair {pairs[outside[0]]} is out of range: there are {self.n_pairs} pairs.")
        shard_of = np.searchsorted(self._starts, pairs, side="right") - 1
        found: list[str] = [""] * len(pairs)
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            rows = pairs[where] - self._starts[shard]
            for position, row, text in zip(where, rows, self._captions.read(int(shard), rows), strict=True):
                if text is None:
                    name = self.shards[shard].name
                    logger.warning(
                        "The caption of pair %d (row %d of %s) is null: using ''.", pairs[position], row, name
                    )
                found[position] = text or ""
        return found

    def identity(self) -> dict:
        """What a resumed run must share with the interrupted one: the files' names, sizes and modification times
        (a digest of them; no content is hashed), or a dataset's fingerprint; with the caption column and the
        shard size. The folder's own path is left out, so that a moved folder is the same source."""
        return dict(self._identity)

    def description(self) -> dict:
        """Where the embeddings came from, for the dataset card: ``{"kind", "path", "pairs", "shards", "dim",
        "text_dim", "dtype"}`` (``path``: the folder's last part, or the dataset's name)."""
        return dict(self._description)

    def unit_norm(self) -> bool:
        """Whether the image embeddings are L2-normalised: every sampled image row (a seeded sample from up to
        ``NORM_SHARDS`` shards spread over all) has a norm within ``UNIT_NORM_TOLERANCE`` of 1. clip-retrieval
        normalises by default; a decoder trained on raw-scale embeddings must not be given unit vectors silently.
        The image rows decide, since they are what a decoder reads."""
        image, _ = self._sampled_norms()
        return bool(np.all(np.abs(image - 1) <= UNIT_NORM_TOLERANCE))

    def norms(self) -> dict:
        """The mean L2 norm of the sampled image rows and text rows (see :meth:`unit_norm`), and how many rows
        were sampled: ``{"image": float, "text": float, "rows": int}``."""
        image, text = self._sampled_norms()
        return {"image": float(image.mean()), "text": float(text.mean()), "rows": len(image)}

    def _sampled_norms(self) -> tuple[np.ndarray, np.ndarray]:
        if self._norms is None:
            self._norms = sampled_norms(self.shards)
        return self._norms


def sampled_norms(shards: Sequence[ShardRef]) -> tuple[np.ndarray, np.ndarray]:
    """L2 norms of a seeded sample of image rows and of the text rows of the same pairs: up to ``NORM_ROWS`` rows
    of each of up to ``NORM_SHARDS`` shards spread evenly over ``shards`` (first and last included)."""
    rng = np.random.default_rng(NORM_SEED)
    chosen = np.unique(np.linspace(0, len(shards) - 1, min(len(shards), NORM_SHARDS)).round().astype(int))
    image, text = [], []
    for index in chosen:
        shard = shards[index].load()
        rows = np.sort(rng.choice(shards[index].n_pairs, min(shards[index].n_pairs, NORM_ROWS), replace=False))
        images = shard.image_embeds[shard.image_of_pairs()[rows]]  # a memory map reads only these rows
        image.append(np.linalg.norm(np.asarray(images, dtype=np.float32), axis=1))
        text.append(np.linalg.norm(np.asarray(shard.text_embeds[rows], dtype=np.float32), axis=1))
        del shard
    return np.concatenate(image), np.concatenate(text)


def check_precomputed(source: PrecomputedEmbeddings, image_dim: int) -> None:
    """Raise a ``ValueError`` before any work unless ``source`` can be distilled for a decoder that reads
    ``image_dim``-d image embeddings: its width is the decoder's, and the first shard holds only finite values
    (the prototype stage's first pass names a NaN or inf row of any other shard)."""
    if not isinstance(source, PrecomputedEmbeddings):
        raise ValueError(
            f"source must be a PrecomputedEmbeddings (open_clip_retrieval, embeddings_of_dataset), got "
            f"{type(source).__name__}."
        )
    if isinstance(image_dim, bool) or not isinstance(image_dim, (int, np.integer)) or image_dim <= 0:
        raise ValueError(f"image_dim must be a positive integer, got {image_dim!r}.")
    if source.image_dim != image_dim:
        raise ValueError(
            f"The image embeddings of {source._origin} are {source.image_dim}-d, the decoder reads {image_dim}-d "
            "(its image encoder's projection width): give embeddings made by the decoder's CLIP image model."
        )
    first = source.shards[0]
    shard = first.load()
    for modality, rows in (("image", shard.image_embeds), ("text", shard.text_embeds)):
        for start in range(0, len(rows), CHECK_ROWS):
            finite = np.isfinite(rows[start : start + CHECK_ROWS]).all(axis=1)
            if not finite.all():
                bad = start + np.flatnonzero(~finite)
                raise ValueError(f"{modality.capitalize()} row {bad[0]} of {first.name} holds NaN or inf values.")


# --- clip-retrieval's folders ---


def open_clip_retrieval(folder: str | os.PathLike, caption_column: str = "caption") -> PrecomputedEmbeddings:
    """Open clip-retrieval's layout in ``folder`` (``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``,
    ``metadata/metadata_{i}.parquet``, whose ``caption_column`` holds the captions; other columns are ignored).

    Checks, reading only the ``.npy`` headers and the parquet footers: the three folders exist; every shard
    number has its three files; each ``.npy`` file is a 2-d, non-empty, C-ordered float16 or float32 array,
    whole (its size matches its header); one dtype for all files and one width per modality; each shard's three
    row counts agree; every metadata file has a string column ``caption_column``. Raises ``ValueError`` naming
    the file or shard and what was expected.
    """
    root = Path(folder)
    if not root.exists():
        raise ValueError(f"The embeddings folder {root} does not exist.")
    if not root.is_dir():
        raise ValueError(
            f"The embeddings folder {root} is a file, expected a folder in clip-retrieval's layout "
            "(img_emb/img_emb_{i}.npy, text_emb/text_emb_{i}.npy, metadata/metadata_{i}.parquet)."
        )
    numbered = {part: _numbered_files(root, part) for part in CLIP_RETRIEVAL_FILES}
    numbers = sorted(set().union(*numbered.values()))
    for number in numbers:
        present = [part for part in CLIP_RETRIEVAL_FILES if number in numbered[part]]
        missing = [part for part in CLIP_RETRIEVAL_FILES if number not in numbered[part]]
        if missing:
            have = ", ".join(_relative(root, numbered[part][number]) for part in present)
            lacks = " or ".join(f"{part}/{part}_{number}{CLIP_RETRIEVAL_FILES[part]}" for part in missing)
            raise ValueError(
                f"Shard {number} has {have} but no partner {lacks}: every shard needs its img_emb, text_emb and "
                "metadata files."
            )
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps:
        logger.warning("%s has no shard numbered %s (between %d and %d).", root, gaps[:10], numbers[0], numbers[-1])

    headers = {
        part: [_npy_header(numbered[part][number], _relative(root, numbered[part][number])) for number in numbers]
        for part in ("img_emb", "text_emb")
    }
    first_image, first_text = headers["img_emb"][0], headers["text_emb"][0]
    for header in headers["img_emb"] + headers["text_emb"]:
        if header.dtype != first_image.dtype:
            raise ValueError(
                f"{header.name} holds {header.dtype}, {first_image.name} {first_image.dtype}: every file must hold "
                "one dtype."
            )
    for reference, part in ((first_image, "img_emb"), (first_text, "text_emb")):
        for header in headers[part]:
            if header.shape[1] != reference.shape[1]:
                raise ValueError(
                    f"{header.name} is {header.shape[1]}-d, {reference.name} {reference.shape[1]}-d: every shard "
                    "must have one width."
                )

    metadata = [_caption_file(numbered["metadata"][number], root, caption_column) for number in numbers]
    shards = []
    for index, (number, image, text, meta) in enumerate(
        zip(numbers, headers["img_emb"], headers["text_emb"], metadata, strict=True)
    ):
        if not image.shape[0] == text.shape[0] == meta.n_rows:
            raise ValueError(
                f"Shard {number}: {image.name} has {image.shape[0]} rows, {text.name} {text.shape[0]}, "
                f"{meta.name} {meta.n_rows}: the rows must align (one pair per row)."
            )
        load = partial(_load_clip_shard, numbered["img_emb"][number], numbered["text_emb"][number])
        shards.append(
            ShardRef(index, image.shape[0], image.shape[0], f"shard {number} ({image.name}, {text.name})", load)
        )

    files = [
        [_relative(root, path), *_stat(path)]
        for number in numbers
        for path in (numbered[part][number] for part in CLIP_RETRIEVAL_FILES)
    ]
    n_pairs = sum(shard.n_pairs for shard in shards)
    dims = {"dim": first_image.shape[1], "text_dim": first_text.shape[1], "dtype": str(first_image.dtype)}
    return PrecomputedEmbeddings(
        shards,
        first_image.shape[1],
        first_text.shape[1],
        first_image.dtype,
        _ParquetCaptions(metadata, caption_column),
        identity={
            "kind": "clip-retrieval",
            "caption_column": caption_column,
            "files": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
        },
        description={
            "kind": "clip-retrieval",
            "path": root.resolve().name,
            "pairs": n_pairs,
            "shards": len(shards),
            **dims,
        },
        origin=f"the clip-retrieval folder {root}",
        folder=root.resolve(),
        numbers=numbers,
    )


def _numbered_files(root: Path, part: str) -> dict[int, Path]:
    """The shard files of one of the three folders by shard number (other files are ignored)."""
    folder = root / part
    if not folder.is_dir():
        raise ValueError(
            f"{root} has no {part}/ folder: expected clip-retrieval's layout img_emb/img_emb_{{i}}.npy, "
            "text_emb/text_emb_{i}.npy, metadata/metadata_{i}.parquet."
        )
    pattern = re.compile(rf"{part}_(\d+){re.escape(CLIP_RETRIEVAL_FILES[part])}")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise ValueError(
                f"{_relative(root, found[number])} and {_relative(root, path)} both are shard {number} of {part}/."
            )
        found[number] = path
    if not found and part == "img_emb":
        raise ValueError(f"{folder} holds no img_emb_{{i}}.npy file.")
    return found


@dataclass(frozen=True)
class _NpyHeader:
    name: str
    shape: tuple[int, ...]
    dtype: str


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(path: Path, name: str) -> _NpyHeader:
    """The shape and dtype of a ``.npy`` file from its header, checked against the file's size (a truncated
    copy), the layout a memory map reads by rows, and the dtypes hf-pds reads."""
    with open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f"format version {version} is not read here")
            shape, fortran_order, dtype = _NPY_HEADER_READERS[version](file)
        except ValueError as error:
            raise ValueError(f"{name} is not a .npy array file hf-pds reads ({error}).") from error
        data_start = file.tell()
    if len(shape) != 2:
        raise ValueError(f"{name} holds an array of shape {shape}, expected a 2-d array [rows, dim].")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}).")
    if dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"{name} holds {dtype}, expected float16 or float32.")
    if fortran_order:
        raise ValueError(f"{name} is in Fortran (column) order: save it in C (row) order, which is read by rows.")
    expected, size = data_start + shape[0] * shape[1] * dtype.itemsize, path.stat().st_size
    if size < expected:
        raise ValueError(
            f"{name} is truncated: its header says {shape} {dtype.name}, {expected} bytes, the file has {size}."
        )
    return _NpyHeader(name, shape, dtype.name)


def _load_clip_shard(image_file: Path, text_file: Path) -> PairShard:
    return PairShard(np.load(image_file, mmap_mode="r"), np.load(text_file, mmap_mode="r"))


@dataclass(frozen=True)
class _CaptionFile:
    """A metadata file: its path, name in messages, rows, and the first row of each row group (and the end)."""

    path: Path
    name: str
    n_rows: int
    row_groups: np.ndarray


def _caption_file(path: Path, root: Path, caption_column: str) -> _CaptionFile:
    """A metadata file's footer, checked: a parquet file with a string column ``caption_column``."""
    name = _relative(root, path)
    try:
        footer = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{name} is not a parquet file hf-pds reads ({error}).") from error
    schema = footer.schema.to_arrow_schema()
    if caption_column not in schema.names:
        raise ValueError(
            f"{name} has no column {caption_column!r} (its columns: {', '.join(schema.names)}): pass the one that "
            "holds the captions as caption_column."
        )
    kind = schema.field(caption_column).type
    if not _holds_strings(kind):
        raise ValueError(f"Column {caption_column!r} of {name} holds {kind}, expected strings (one caption per row).")
    sizes = [footer.row_group(group).num_rows for group in range(footer.num_row_groups)]
    return _CaptionFile(path, name, footer.num_rows, np.cumsum([0, *sizes]))


def _holds_strings(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class _CaptionReader(Protocol):
    """Reads the captions of some rows of one shard (None for a null caption)."""

    def read(self, shard: int, rows: np.ndarray) -> list[str | None]: ...


class _ParquetCaptions(_CaptionReader):
    """Captions of clip-retrieval's metadata files: only the row groups that hold a wanted row are read, batch by
    batch, up to the last wanted row (the row-group offsets come from the footers read when the folder opened)."""

    def __init__(self, files: list[_CaptionFile], column: str):
        self.files = files
        self.column = column

    def read(self, shard: int, rows: np.ndarray) -> list[str | None]:
        file = self.files[shard]
        group_of = np.searchsorted(file.row_groups, rows, side="right") - 1
        found: list[str | None] = [None] * len(rows)
        parquet = pq.ParquetFile(file.path)
        for group in np.unique(group_of):
            where = np.flatnonzero(group_of == group)
            local = rows[where] - file.row_groups[group]
            start = 0
            for batch in parquet.iter_batches(CAPTION_BATCH, row_groups=[int(group)], columns=[self.column]):
                inside = np.flatnonzero((local >= start) & (local < start + len(batch)))
                values = batch.column(0).take(pa.array(local[inside] - start)).to_pylist()
                for position, value in zip(where[inside], values, strict=True):
                    found[position] = value
                start += len(batch)
                if start > local.max():
                    break
        return found


class _DatasetCaptions(_CaptionReader):
    """Captions of a dataset's column, read by row from its Arrow table (``dataset[rows]`` of that column alone)."""

    def __init__(self, captions, starts: np.ndarray):
        self.captions = captions  # the dataset's caption column alone, formatted as Arrow
        self.starts = starts

    def read(self, shard: int, rows: np.ndarray) -> list[str | None]:
        return self.captions[(rows + self.starts[shard]).tolist()].column(0).to_pylist()


# --- a dataset's embedding columns ---


def embeddings_of_dataset(
    dataset,
    image_embedding_column: str,
    text_embedding_column: str,
    caption_column: str = "caption",
    shard_size: int = DEFAULT_SHARD_ROWS,
) -> PrecomputedEmbeddings:
    """The embeddings held by two columns of a ``datasets.Dataset`` (lists of floats, of any Arrow list type; one
    pair per row, e.g. DataComp's parquet files loaded with ``load_dataset("parquet", ...)``), as shards of
    ``shard_size`` rows.

    A loaded shard is one array gathered from the Arrow table's chunks (a view, without a copy, where one chunk
    holds the shard's rows); float64 cells (``Dataset.from_dict`` of Python floats) are read as float32. Checks,
    reading the columns' Arrow types and list offsets, not their values (a dataset with an indices mapping, from
    ``select`` or ``shuffle``, has its rows gathered to be checked): the columns exist; the embedding columns hold
    lists of floats, none null, all of one width, with no null value; the caption column holds strings.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"dataset must be a datasets.Dataset (read by row), got {type(dataset).__name__}: load it without "
            "streaming=True."
        )
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}.")
    arguments = {
        "image_embedding_column": image_embedding_column,
        "text_embedding_column": text_embedding_column,
        "caption_column": caption_column,
    }
    for argument, column in arguments.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no column {column!r} ({argument}); its columns: {', '.join(dataset.column_names)}."
            )
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows.")
    kind = dataset.features.arrow_schema.field(caption_column).type
    if not _holds_strings(kind):
        raise ValueError(
            f"Column {caption_column!r} (caption_column) holds {kind}, expected one string per row: precomputed "
            "embeddings are one pair per row."
        )
    columns = {
        argument: dataset.select_columns([column]).with_format("arrow") for argument, column in arguments.items()
    }
    image_dim, image_dtype = _check_embedding_column(
        columns["image_embedding_column"], image_embedding_column, shard_size
    )
    text_dim, text_dtype = _check_embedding_column(columns["text_embedding_column"], text_embedding_column, shard_size)
    if image_dtype != text_dtype:
        raise ValueError(
            f"Column {image_embedding_column!r} holds {image_dtype}, column {text_embedding_column!r} {text_dtype}: "
            "both must hold one dtype."
        )
    bounds = [(start, min(start + shard_size, len(dataset))) for start in range(0, len(dataset), shard_size)]
    shards = [
        ShardRef(
            index,
            stop - start,
            stop - start,
            f"rows {start}-{stop - 1} of the dataset",
            partial(
                _load_dataset_shard,
                columns["image_embedding_column"],
                columns["text_embedding_column"],
                start,
                stop,
                image_dim,
                text_dim,
            ),
        )
        for index, (start, stop) in enumerate(bounds)
    ]
    dims = {"dim": image_dim, "text_dim": text_dim, "dtype": str(image_dtype)}
    return PrecomputedEmbeddings(
        shards,
        image_dim,
        text_dim,
        image_dtype,
        _DatasetCaptions(columns["caption_column"], np.array([start for start, _ in bounds])),
        identity={"kind": "dataset", "fingerprint": dataset._fingerprint, **arguments, "shard_size": int(shard_size)},
        description={
            "kind": "dataset",
            "path": dataset.info.dataset_name,
            "pairs": len(dataset),
            "shards": len(shards),
            **dims,
            "columns": arguments,
        },
        origin=f"column {image_embedding_column!r} of the dataset",
    )


def _check_embedding_column(column_dataset, column: str, batch_rows: int) -> tuple[int, str]:
    """The width and dtype (as read) of an embedding column, whose cells must be non-null lists of one length of
    non-null floats; raises naming the column and the first bad row."""
    kind = column_dataset.features.arrow_schema.field(column).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and pa.types.is_floating(kind.value_type)):
        raise ValueError(f"Column {column!r} holds {kind}, expected lists of floats (one embedding per row).")
    width = None
    for start in range(0, len(column_dataset), batch_rows):
        offset = start
        for chunk in column_dataset[start : start + batch_rows].column(0).chunks:
            if chunk.null_count:
                row = offset + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"Row {row} of column {column!r} is null, expected a list of floats.")
            lengths = pc.list_value_length(chunk).to_numpy()
            width = int(lengths[0]) if width is None else width
            if width == 0:
                raise ValueError(f"Row {offset} of column {column!r} is an empty list, expected an embedding.")
            ragged = np.flatnonzero(lengths != width)
            if len(ragged):
                row = offset + int(ragged[0])
                raise ValueError(
                    f"Row {row} of column {column!r} has {lengths[ragged[0]]} values, row 0 has {width}: every "
                    "embedding must have one width."
                )
            if chunk.flatten().null_count:
                parents = pc.list_parent_indices(chunk).to_numpy()
                values = chunk.flatten().is_null().to_numpy(zero_copy_only=False)
                row = offset + int(parents[np.flatnonzero(values)[0]])
                raise ValueError(f"Row {row} of column {column!r} holds a null value, expected floats.")
            offset += len(chunk)
    dtype = np.dtype(kind.value_type.to_pandas_dtype()).name
    return width, "float32" if dtype == "float64" else dtype


def _dataset_rows(column_dataset, start: int, stop: int, width: int) -> np.ndarray:
    """Rows ``start:stop`` of an embedding column as a ``[rows, width]`` array (a view of the Arrow buffer when it
    is one chunk of floats; float64 becomes float32)."""
    chunks = column_dataset[start:stop].column(0).chunks
    parts = [chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width) for chunk in chunks]
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return rows.astype(np.float32) if rows.dtype == np.float64 else rows


def _load_dataset_shard(images, texts, start: int, stop: int, image_dim: int, text_dim: int) -> PairShard:
    return PairShard(_dataset_rows(images, start, stop, image_dim), _dataset_rows(texts, start, stop, text_dim))


# --- several machines ---


class _Process:
    """The place of one process among ``num_processes`` (for :func:`process_share`)."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes = index, count


def spread(source: PrecomputedEmbeddings, state) -> PrecomputedEmbeddings:
    """``source`` as the processes of ``state`` see it together, when each machine may hold only the shards its
    processes read (several machines without a shared file system).

    Every process reports the shards it sees (their numbers and sizes); the shards of all of them, in the order of
    their numbers, are the source. Process ``p`` reads the contiguous block of them that
    :func:`~hf_pds.distributed.process_share` gives it, so its machine must hold those: ``ValueError``, on every
    process alike, naming the first process that lacks one. When every process sees every shard (one machine, or a
    shared file system) ``source`` comes back as it is. Otherwise the view's shards that this process does not hold
    raise when loaded, and :meth:`PrecomputedEmbeddings.captions` becomes collective: each process reads the captions
    of its own shards and the processes exchange them.
    """
    if state.num_processes == 1:
        return source
    seen = all_gather(
        [(number, shard.n_pairs) for number, shard in zip(source.numbers, source.shards, strict=True)], state
    )
    sizes: dict[int, int] = {}
    for process, shards in enumerate(seen):
        for number, n_pairs in shards:
            if sizes.setdefault(number, n_pairs) != n_pairs:
                raise ValueError(
                    f"Shard {number} has {n_pairs} pairs on process {process} but {sizes[number]} on another: the "
                    "machines hold different files under one name."
                )
    numbers = sorted(sizes)
    for process, shards in enumerate(seen):
        reads = [numbers[position] for position in process_share(len(numbers), _Process(process, state.num_processes))]
        missing = sorted(set(reads) - {number for number, _ in shards})
        if missing:
            raise ValueError(
                f"Process {process} of {state.num_processes} reads shards {reads[0]} to {reads[-1]} (each process "
                f"reads its block of the {len(numbers)} shards, in order), but its machine has no shard {missing[0]} "
                f"({len(missing)} missing): put those files on that machine."
            )
    if all(len(shards) == len(numbers) for shards in seen):
        return source
    return _SpreadEmbeddings(source, numbers, sizes, all_gather(source.identity(), state), state)


class _SpreadEmbeddings(PrecomputedEmbeddings):
    """The shards of every machine, of which this process holds some (:func:`spread`)."""

    spread = True

    def __init__(self, local: PrecomputedEmbeddings, numbers: list[int], sizes: dict[int, int], identities, state):
        held = dict(zip(local.numbers, local.shards, strict=True))
        shards = [
            ShardRef(position, sizes[number], sizes[number], f"shard {number}", _elsewhere(number))
            if number not in held
            else ShardRef(position, *(getattr(held[number], name) for name in ("n_images", "n_pairs", "name", "load")))
            for position, number in enumerate(numbers)
        ]
        digest = hashlib.sha256(json.dumps(identities, sort_keys=True, default=str).encode()).hexdigest()
        description = {**local.description(), "pairs": sum(sizes.values()), "shards": len(numbers)}
        super().__init__(
            shards,
            local.image_dim,
            local.text_dim,
            local.dtype,
            local._captions,
            identity={"kind": "spread", "machines": digest},
            description=description,
            origin=local._origin,
            folder=local.folder,
            numbers=numbers,
        )
        self._local = local
        self._local_start = dict(
            zip(local.numbers, np.cumsum([0] + [shard.n_pairs for shard in local.shards])[:-1], strict=True)
        )
        self._state = state

    def captions(self, pairs: Sequence[int]) -> list[str]:
        """The captions of global pairs ``pairs``: each process reads those of its own shards, then the processes
        exchange them (call it on every process)."""
        pairs = np.asarray(pairs, dtype=np.int64)
        shard_of = np.searchsorted(self._starts, pairs, side="right") - 1
        here = [
            (position, int(self._local_start[self.numbers[shard]] + pair - self._starts[shard]))
            for position, (pair, shard) in enumerate(zip(pairs, shard_of, strict=True))
            if self.numbers[shard] in self._local_start
        ]
        texts = self._local.captions([pair for _, pair in here])
        found: dict[int, str] = {}
        for part in all_gather(dict(zip((position for position, _ in here), texts, strict=True)), self._state):
            found.update(part)
        return [found[position] for position in range(len(pairs))]

    def _sampled_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """The norms sampled on every machine, from its own shards, gathered (call it on every process): every
        process sees the same sample, so :meth:`unit_norm` and :meth:`norms` agree everywhere."""
        if self._norms is None:
            samples = all_gather(self._local._sampled_norms(), self._state)
            self._norms = tuple(np.concatenate([sample[part] for sample in samples]) for part in (0, 1))
        return self._norms


def _elsewhere(number: int):
    """The load of a shard that another machine holds: it raises, naming it."""

    def load() -> PairShard:
        raise ValueError(
            f"Shard {number} is on another machine: only the sharded prototype stage reads shards spread over "
            "machines (prototype_stage='sharded')."
        )

    return load
