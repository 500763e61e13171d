"""Embeddings as fixed-size shards on disk: the one store format of hf-pds, and the plain-array view of a shard.

A shard holds a run of images with every caption of those images (one pair per caption), so that a pass over the
shards sees each pair once, with its image. The embedding cache writes shards; precomputed embeddings
(clip-retrieval's layout, embedding columns of a dataset) are read as shards; the prototype stage makes passes over
them (:func:`hf_pds.prototypes.extract_prototypes_sharded`), holding one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .defaults import DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES
from .hub import _NO_SPACE, NoSpaceError, no_space_error, write_atomically


@dataclass
class PairShard:
    """One shard's arrays (memory-mapped or in memory); drop it after each pass, so that its pages are released.

    Attributes:
        image_embeds: ``[n_images, d]`` raw image embeddings (float16 or float32).
        text_embeds: ``[n_pairs, d_text]`` raw text embeddings, one row per pair (caption).
        caption_image: ``[n_pairs]`` row of ``image_embeds`` of each pair; None when pair ``i`` is image ``i``
            (clip-retrieval's layout: one caption per image).
    """

    image_embeds: np.ndarray
    text_embeds: np.ndarray
    caption_image: np.ndarray | None = None

    def image_of_pairs(self) -> np.ndarray:
        """The image row of each pair (``caption_image``, or ``0..n_pairs-1``)."""
        if self.caption_image is None:
            return np.arange(len(self.text_embeds))
        return np.asarray(self.caption_image)


@dataclass(frozen=True)
class ShardRef:
    """Where a shard is and how big, without reading it.

    Attributes:
        index: the shard's position among all shards (0, 1, ...); pairs are numbered shard after shard, in this
            order, so that a pair's global index is the same whichever process reads its shard.
        n_images: rows of its ``image_embeds``.
        n_pairs: rows of its ``text_embeds``.
        name: how messages name it (a file, ``img_emb/img_emb_3.npy``, or an entry's shard folder).
        load: opens the shard (memory-mapped where it is on disk).
    """

    index: int
    n_images: int
    n_pairs: int
    name: str
    load: Callable[[], PairShard]


# The store format: a folder of shard folders and a manifest, written shard by shard.
STORE_FORMAT = 2
MANIFEST = "manifest.json"
# Images per shard of the embedding stage (with all their captions): about 150 MB per modality at d=768 in float32,
# few enough files for a billion pairs, small enough that one shard in memory is nothing.
DEFAULT_SHARD_IMAGES = 50_000
_RECORD = "shard.json"
# The arrays of a shard folder: what each holds and its element type (None: the store's dtype).
_ARRAYS = {"image_embeds": None, "text_embeds": None, "caption_image": "<i4", "rows": "<i8"}


@dataclass
class StoreArrays:
    """A whole store in memory: the in-memory path of the prototype stage (up to a few hundred thousand pairs).

    Attributes:
        image_embeds: ``[n_images, d]`` raw image embeddings, in the store's dtype.
        text_embeds: ``[n_pairs, d_text]`` raw text embeddings.
        caption_image: ``[n_pairs]`` global image row of each pair (non-decreasing: pairs follow their images).
        rows: ``[n_images]`` dataset row of each image.
    """

    image_embeds: np.ndarray
    text_embeds: np.ndarray
    caption_image: np.ndarray
    rows: np.ndarray


def shard_name(index: int) -> str:
    """The folder of shard ``index`` in a store: ``shard-00000``."""
    return f"shard-{index:05d}"


def shard_spans(caption_image: np.ndarray, n_images: int, shard_size: int) -> list[tuple[int, int, int, int]]:
    """``(image_start, image_end, pair_start, pair_end)`` of each shard: runs of ``shard_size`` images with every
    pair of those images. ``caption_image`` must be non-decreasing (pairs in the order of their images), so that a
    shard's pairs are one run and pairs are numbered shard after shard as they were given."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1 image, not {shard_size}.")
    caption_image = np.asarray(caption_image)
    if len(caption_image) and np.any(np.diff(caption_image) < 0):
        first = int(np.flatnonzero(np.diff(caption_image) < 0)[0]) + 1
        raise ValueError(f"caption_image must be non-decreasing (pairs follow their images); pair {first} is not.")
    spans = []
    for start in range(0, n_images, shard_size):
        end = min(n_images, start + shard_size)
        first, last = np.searchsorted(caption_image, [start, end], side="left")
        spans.append((start, end, int(first), int(last)))
    return spans


class _HashingWriter:
    """A binary file that counts and hashes what is written to it: the checksum costs no second read."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)


def _save_npy(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` as ``.npy``; its record: shape, dtype, bytes and SHA-256 (hashed while writing)."""
    with path.open("wb") as file:
        writer = _HashingWriter(file)
        np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
    return {
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "bytes": writer.size,
        "sha256": writer.digest.hexdigest(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, not {dtype!r}.")
    return np.dtype(dtype)


def write_shard(
    staging: str | os.PathLike,
    index: int,
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    caption_image: np.ndarray,
    rows: np.ndarray,
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
) -> dict:
    """Write shard ``index`` into the store being built in ``staging``; return its record.

    The shard is written into a temporary folder beside it, then moved into place (``os.replace``): a run killed
    while writing leaves the whole shard or none of it, so :func:`finished_shards` can trust what it finds. Its
    record (``shard.json``: counts, and per file its shape, dtype, bytes and SHA-256, hashed while writing) goes
    with it. ``caption_image`` holds local rows (``0 .. n_images - 1``); ``rows`` the dataset row of each image.
    ``dtype="float16"`` halves the embeddings on disk (see :func:`write_store`). Several processes may write
    different shards of one staging folder at once.
    """
    staging = Path(staging)
    numpy_dtype = _check_dtype(dtype)
    n_images, n_pairs = len(image_embeds), len(text_embeds)
    caption_image = np.asarray(caption_image)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(f"Shard {index}: embeddings must be 2-d, not {image_embeds.shape} and {text_embeds.shape}.")
    if caption_image.shape != (n_pairs,) or np.shape(rows) != (n_images,):
        raise ValueError(
            f"Shard {index}: caption_image must hold {n_pairs} rows (one per pair) and rows {n_images} "
            f"(one per image), not {caption_image.shape} and {np.shape(rows)}."
        )
    if n_pairs and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError(f"Shard {index}: caption_image must point at its {n_images} images (local rows).")
    arrays = {
        "image_embeds": np.asarray(image_embeds).astype(numpy_dtype, copy=False),
        "text_embeds": np.asarray(text_embeds).astype(numpy_dtype, copy=False),
        "caption_image": caption_image.astype(_ARRAYS["caption_image"]),
        "rows": np.asarray(rows).astype(_ARRAYS["rows"]),
    }
    name = shard_name(index)
    target = staging / name
    partial = staging / f".{name}.{os.getpid()}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        files = {f"{key}.npy": _save_npy(partial / f"{key}.npy", array) for key, array in arrays.items()}
        record = {"index": index, "name": name, "n_images": n_images, "n_pairs": n_pairs, "files": files}
        (partial / _RECORD).write_bytes(json.dumps(record, indent=1).encode())
        if target.exists():  # a shard written again (an entry being repaired): the new one wins
            shutil.rmtree(target)
        os.replace(partial, target)
    except OSError as error:
        if error.errno in _NO_SPACE and not isinstance(error, NoSpaceError):
            raise no_space_error(target, sum(array.nbytes for array in arrays.values())) from error
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def _file_problem(path: Path, expected: dict) -> str | None:
    """Why ``path`` is not the ``.npy`` file its record describes (byte size, then header: shape and dtype), or
    None. Reads the header only."""
    try:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"holds {size} bytes, its record says {expected['bytes']}"
        with path.open("rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read_header[version](file)
            offset = file.tell()
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, KeyError) as error:
        return f"has no readable .npy header ({error})"
    if list(shape) != expected["shape"] or dtype.str != expected["dtype"] or fortran:
        return f"holds {dtype.str} {list(shape)}, its record says {expected['dtype']} {expected['shape']}"
    if offset + dtype.itemsize * math.prod(shape) != size:
        return f"holds {size} bytes, its header needs {offset + dtype.itemsize * math.prod(shape)}"
    return None


def _record_problem(folder: Path, record: dict) -> str | None:
    """Why the shard folder does not hold what its record says (see :func:`_file_problem`), or None."""
    for key in _ARRAYS:
        problem = _file_problem(folder / f"{key}.npy", record["files"][f"{key}.npy"])
        if problem:
            return f"{key}.npy {problem}"
    return None


def finished_shards(staging: str | os.PathLike) -> dict[int, dict]:
    """The records of the whole shards already in ``staging`` (a resumed run skips them), by index. A shard folder
    whose files do not match its record (size, header) is left out, to be written again."""
    found = {}
    for folder in sorted(Path(staging).glob("shard-*")):
        try:
            record = json.loads((folder / _RECORD).read_text(encoding="utf-8"))
            if record["name"] != folder.name or _record_problem(folder, record):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[record["index"]] = record
    return found


def finish_store(
    staging: str | os.PathLike,
    entry: str | os.PathLike,
    n_shards: int,
    *,
    dtype: str,
    shard_size: int,
    key: str | None = None,
) -> Store:
    """Write the manifest of the ``n_shards`` shards in ``staging`` and move it to ``entry`` (``os.replace``; what
    was at ``entry`` is replaced); return the opened :class:`Store`. Call it once, after every shard is written
    (under several processes: on the main process, after a barrier). The manifest is written last: a folder
    without one is a store being built."""
    staging, entry = Path(staging), Path(entry)
    records = finished_shards(staging)
    missing = [index for index in range(n_shards) if index not in records]
    if missing:
        raise ValueError(f"{staging} lacks shard(s) {missing[:5]} of {n_shards}: they were not written whole.")
    for leftover in staging.glob(".shard-*.partial"):  # a process killed while writing, before this run
        shutil.rmtree(leftover, ignore_errors=True)
    shards = [records[index] for index in range(n_shards)]
    first = shards[0]["files"] if shards else None
    manifest = {
        "format": STORE_FORMAT,
        "key": key,
        "dtype": dtype,
        "image_dim": first["image_embeds.npy"]["shape"][1] if first else 0,
        "text_dim": first["text_embeds.npy"]["shape"][1] if first else 0,
        "shard_size": shard_size,
        "shards": [{field: record[field] for field in ("name", "n_images", "n_pairs", "files")} for record in shards],
    }
    write_atomically(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
    if entry.exists():
        retired = entry.with_name(f".{entry.name}.{os.getpid()}.old")
        os.replace(entry, retired)
        shutil.rmtree(retired, ignore_errors=True)
    os.replace(staging, entry)
    return open_store(entry, key)


def write_store(
    entry: str | os.PathLike,
    arrays: StoreArrays,
    *,
    shard_size: int = DEFAULT_SHARD_IMAGES,
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
    key: str | None = None,
) -> Store:
    """Write ``arrays`` as a store at ``entry``, cut into shards of ``shard_size`` images (built in
    ``<entry>.partial`` and moved into place).

    ``dtype="float16"`` stores the embeddings rounded to float16: half the disk and half the pages read per pass;
    the prototype stage computes in float32 (or float64 sums) from them. The rounding (a relative error of at most
    2**-11 per value) moves the mean of a fixed set of pairs by at most as much, but k-means may then settle in
    another, equally good, partition: measured with ``extract_prototypes`` (faiss) on the planted sets of
    ``benchmarks/prototypes.py``, at the Flickr30k shape (29k images x 5, budget 500) float16 changes the
    prototypes as much as another k-means seed does (matched overlap 22909 -> 23389; seed 43: 23847); with
    well-separated clusters (2k images, 200 concepts, budget 200) the median prototype moves by 7e-5 of its norm
    and 85% keep their caption. A value beyond float16's range (65504) becomes inf, which the prototype stage
    reports by shard and row.
    """
    entry = Path(entry)
    staging = entry.with_name(f"{entry.name}.partial")
    spans = shard_spans(arrays.caption_image, len(arrays.image_embeds), shard_size)
    for index, (image_start, image_end, pair_start, pair_end) in enumerate(spans):
        write_shard(
            staging,
            index,
            arrays.image_embeds[image_start:image_end],
            arrays.text_embeds[pair_start:pair_end],
            np.asarray(arrays.caption_image[pair_start:pair_end]) - image_start,
            arrays.rows[image_start:image_end],
            dtype,
        )
    return finish_store(staging, entry, len(spans), dtype=dtype, shard_size=shard_size, key=key)


def _load_shard(folder: Path) -> PairShard:
    """A shard folder's arrays, memory-mapped (read only)."""
    image_embeds, text_embeds, caption_image = (
        np.load(folder / f"{key}.npy", mmap_mode="r") for key in ("image_embeds", "text_embeds", "caption_image")
    )
    return PairShard(image_embeds, text_embeds, caption_image)


@dataclass(frozen=True)
class Store:
    """An opened store: a manifest and its shard folders (see :func:`open_store`).

    Attributes:
        folder: the store's folder.
        key: the cache key it was written for (None outside the cache).
        dtype: ``"float32"`` or ``"float16"``: how its embeddings are stored.
        image_dim, text_dim: widths of its image and text embeddings.
        shard_size: images per shard (the last may hold fewer).
        shards: every shard, in order; ``load()`` memory-maps one.
    """

    folder: Path
    key: str | None
    dtype: str
    image_dim: int
    text_dim: int
    shard_size: int
    shards: list[ShardRef]

    @property
    def n_images(self) -> int:
        return sum(shard.n_images for shard in self.shards)

    @property
    def n_pairs(self) -> int:
        return sum(shard.n_pairs for shard in self.shards)

    def rows(self) -> np.ndarray:
        """``[n_images]`` dataset row of each image (a few bytes per image: read whole)."""
        return _concatenate([np.load(self.folder / shard.name / "rows.npy") for shard in self.shards], np.int64)

    def arrays(self) -> StoreArrays:
        """The whole store in memory (every shard read and concatenated; ``caption_image`` made global): the
        in-memory path, for stores that fit (up to a few hundred thousand pairs)."""
        image_embeds, text_embeds, caption_image = load_pairs(self.shards, self.dtype, self.image_dim, self.text_dim)
        return StoreArrays(image_embeds, text_embeds, caption_image, self.rows())

    def verify(self) -> None:
        """Read every file and compare it with the SHA-256 its manifest recorded while writing; raise ``ValueError``
        naming the shard and the file that differ. Opening a store checks sizes and headers only (O(shards), no
        content read): a checksum of hundreds of GB is not reread on every load, only when asked here."""
        manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        for record in manifest["shards"]:
            for file, expected in record["files"].items():
                if _sha256(self.folder / record["name"] / file) != expected["sha256"]:
                    raise ValueError(f"{self.folder}: {record['name']}/{file} does not match its SHA-256.")


def load_pairs(
    shards: list[ShardRef],
    dtype: str = "float32",
    image_dim: int = 0,
    text_dim: int = 0,
    check: Callable[[str, np.ndarray], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image_embeds, text_embeds, caption_image)`` of ``shards`` read whole and concatenated in their order, with
    ``caption_image`` made global (the in-memory path); ``dtype`` and the widths shape the result of no shard.
    ``check(name, matrix)``, when given, sees each shard's matrices first, named by their shard (so that a bad row is
    named by its shard and row, not by its place in the concatenation)."""
    images, texts, pairs, offset = [], [], [], 0
    for shard in shards:
        loaded = shard.load()
        if check is not None:
            check(f"image_embeds of shard {shard.name!r}", np.asarray(loaded.image_embeds))
            check(f"text_embeds of shard {shard.name!r}", np.asarray(loaded.text_embeds))
        images.append(np.asarray(loaded.image_embeds))
        texts.append(np.asarray(loaded.text_embeds))
        pairs.append(loaded.image_of_pairs().astype(np.int64) + offset)
        offset += shard.n_images
    return (
        _concatenate(images, dtype, (0, image_dim)),
        _concatenate(texts, dtype, (0, text_dim)),
        _concatenate(pairs, np.int64),
    )


def _concatenate(parts: list[np.ndarray], dtype, empty_shape: tuple = (0,)) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


def open_store(entry: str | os.PathLike, key: str | None = None) -> Store:
    """Open the store at ``entry``, checking on every open: its manifest (format, ``key`` when given), and of each
    shard's files their existence, byte size and ``.npy`` header (shape, dtype) against the manifest. That costs
    O(shards) small reads and no content read; the SHA-256 of the content is checked by :meth:`Store.verify` only.
    Raises ``ValueError`` naming what is wrong (the shard and file)."""
    entry = Path(entry)
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{entry} has no {MANIFEST}: it is not a finished store.") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{entry}/{MANIFEST} cannot be read ({error}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise ValueError(f"{entry} is not a store of format {STORE_FORMAT} (an older cache entry).")
    if key is not None and manifest.get("key") != key:
        raise ValueError(f"{entry}: its manifest names another entry ({manifest.get('key')}).")
    try:
        dtype = str(_check_dtype(manifest["dtype"]))
        shards = []
        for index, record in enumerate(manifest["shards"]):
            folder = entry / record["name"]
            problem = _record_problem(folder, record)
            if problem is None:
                problem = _shape_problem(record, dtype, manifest["image_dim"], manifest["text_dim"])
            if problem:
                raise ValueError(f"{entry}: {record['name']}: {problem}.")
            load = partial(_load_shard, folder)
            shards.append(ShardRef(index, record["n_images"], record["n_pairs"], record["name"], load))
        return Store(
            entry, manifest["key"], dtype, manifest["image_dim"], manifest["text_dim"], manifest["shard_size"], shards
        )
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{entry}/{MANIFEST} lacks {error} or is malformed.") from None


def _shape_problem(record: dict, dtype: str, image_dim: int, text_dim: int) -> str | None:
    """Whether a shard's recorded shapes and dtypes fit the manifest's counts, widths and dtype."""
    files = record["files"]
    expected = {
        "image_embeds.npy": ([record["n_images"], image_dim], np.dtype(dtype).str),
        "text_embeds.npy": ([record["n_pairs"], text_dim], np.dtype(dtype).str),
        "caption_image.npy": ([record["n_pairs"]], _ARRAYS["caption_image"]),
        "rows.npy": ([record["n_images"]], _ARRAYS["rows"]),
    }
    for file, (shape, kind) in expected.items():
        if files[file]["shape"] != shape or files[file]["dtype"] != kind:
            return f"{file} holds {files[file]['dtype']} {files[file]['shape']}, the manifest needs {kind} {shape}"
    return None
