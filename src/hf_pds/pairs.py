"""The image-caption pair structure, before any model runs: columns, captions, images. Needs no torch.

A row of a dataset is one image with one caption (a string) or several (a list of strings); each caption
makes one pair with its row's image. This module checks the two columns, lists the pairs of a dataset,
checks that every image can be decoded, tells a dataset's data from another's (:func:`dataset_identity`), and
converts any decoded image to RGB. Distilling and evaluating both read their data through it, so they see the
same pairs and the same pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Rows of the image column read per Arrow batch when the cells are checked.
CHECK_BATCH = 1_000


@dataclass
class PairTable:
    """The pairs of a dataset.

    Attributes:
        rows: ``[n_images]`` dataset row of each image that is used.
        captions: ``[n_captions]`` every caption of those rows, flattened in row order.
        caption_image: ``[n_captions]`` position in ``rows`` of each caption's image.
        skipped_rows: dataset rows left out as unusable (``skip_invalid_rows``).
        distinct_images: how many different images ``rows`` hold: rows whose image bytes are identical (the same
            file, or two copies of it) count once, since k-means cannot tell them apart.
        image_files: a SHA-256 of the content of every local file the image column points to (with its row and
            path), or None when no cell is a path. A dataset's fingerprint covers its table, so the paths but not
            the files: this is what tells that an image file was replaced.
    """

    rows: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    skipped_rows: list[int]
    distinct_images: int
    image_files: str | None = None


def caption_problem(value) -> str | None:
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


def captions_of(value) -> list[str]:
    """The captions of a usable caption cell (see :func:`caption_problem`)."""
    return [value] if isinstance(value, str) else list(value)


def check_columns(dataset, image_column: str, caption_column: str) -> None:
    """Raise unless ``dataset`` is a ``Dataset`` or ``IterableDataset`` whose two columns exist (when its
    columns are known) and whose image column can hold images."""
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if not isinstance(column, str):
            raise TypeError(f"{role} must be a column name (a string), got {column!r}.")
    if dataset.column_names is None:  # a stream whose features are unknown until its first row
        return
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{role}={column!r} is not a column of the dataset; its columns are {dataset.column_names}."
            )
    feature = (dataset.features or {}).get(image_column)
    if feature is not None and not holds_images(feature):
        raise ValueError(
            f"image_column={image_column!r} holds {describe_feature(feature)}; expected images (datasets.Image), "
            "image file paths (strings) or encoded image bytes."
        )


def holds_images(feature) -> bool:
    """Whether a column of this ``datasets`` feature can hold images: ``datasets.Image``, paths or encoded bytes."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")


def describe_feature(feature) -> str:
    """A ``datasets`` feature in words, for a message: "float64 values", "lists of string values", "Image"..."""
    import datasets

    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
        return f"lists of {describe_feature(feature.feature)}"
    return type(feature).__name__


def read_pairs(
    dataset,
    image_column: str = "image",
    caption_column: str = "caption",
    skip_invalid_rows: bool = False,
    check_images: bool = True,
    progress: bool = False,
) -> PairTable:
    """Check the two columns of a map-style ``dataset`` and list its pairs, before any model runs.

    Every caption cell is checked, and (``check_images``) every image cell is checked to decode: its
    headers are read and its data verified (:func:`image_problem`), which costs much less than decoding. The
    local files that the image cells point to are read (even without ``check_images``) and hashed into the table's
    ``image_files``.

    Raises:
        ValueError: a column is missing or of the wrong type, or (unless ``skip_invalid_rows``) a row has no
            usable image or caption; the message names the first bad row, its column and the reason.
    """
    import datasets

    check_columns(dataset, image_column, caption_column)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError("read_pairs needs a map-style datasets.Dataset; a stream is checked row by row as it is read.")
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows.")

    problems: dict[int, str] = {}
    caption_cells = dataset.select_columns([caption_column]).with_format(None)[caption_column]
    for row, value in enumerate(caption_cells):
        problem = caption_problem(value)
        if problem is not None:
            problems[row] = f"column {caption_column!r} {problem}"
    cells = undecoded_cells(dataset, image_column)
    bar = tqdm(cells, total=len(dataset), desc="Checking images", unit="img", disable=not (progress and check_images))
    # The files that path cells point to are read here anyway: one SHA-256 of each image's bytes tells identical
    # images apart (the budget counts distinct images) and, for files, a replaced file from the one that was
    # embedded (the cache key). Hashing adds 8-25% to the check (benchmarks/cache_key.py) and, unlike a size and a
    # modification time, cannot miss a replaced file.
    images: dict[int, bytes | str | int] = {}  # row -> what tells its image apart from the others
    files, has_files = hashlib.sha256(), False
    for row, cell in enumerate(bar):
        data, problem = _image_bytes(cell)
        if problem is None and data is not None and check_images:
            problem = _data_problem(data, _where(cell))
        identity = _image_identity(cell, data, row)
        path = _local_file(cell)
        if path is not None:
            has_files = True
            files.update(f"{row}\0{path}\0{problem or identity.hex()}\0".encode())
        if problem is not None:
            problems.setdefault(row, f"column {image_column!r} {problem}")
        else:
            images[row] = identity
    report_problems(problems, len(dataset), skip_invalid_rows)

    rows, captions, caption_image = [], [], []
    for row, value in enumerate(caption_cells):
        if row in problems:
            continue
        for caption in captions_of(value):
            captions.append(caption)
            caption_image.append(len(rows))
        rows.append(row)
    if not rows:
        raise ValueError("No usable row is left: every row has a missing or unreadable image, or no caption.")
    return PairTable(
        rows=np.asarray(rows, dtype=np.int64),
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        skipped_rows=sorted(problems),
        distinct_images=len({images[row] for row in rows}),
        image_files=files.hexdigest() if has_files else None,
    )


def dataset_identity(dataset, pairs: PairTable | None) -> str | None:
    """A SHA-256 that tells the data of ``dataset`` from any other, known before it is embedded: the embedding
    cache's key and what a resumed run must share with the interrupted one.

    A map-style dataset: its fingerprint (its table) and the ``image_files`` digest of its ``pairs`` (the files its
    cells point to). A stream has no fingerprint: its source (builder, config, data files with their size and
    modification time, or the fingerprints of the datasets it streams) and the steps over it (take, skip,
    select_columns). None when that cannot be known: a stream made by a function (``from_generator``, ``map``,
    ``filter``) or shuffled, whose rows hf-pds cannot tell from another's before reading them.
    """
    if pairs is not None:
        identity = {"fingerprint": dataset._fingerprint, "image_files": pairs.image_files}
    else:
        identity = _stream_identity(dataset)
        if identity is None:
            return None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _stream_identity(stream) -> dict | None:
    """What an ``IterableDataset`` reads, from its iterables, before it is read (see :func:`dataset_identity`)."""
    steps = []
    source = getattr(stream, "_ex_iterable", None)  # datasets' internals: a release without them gives no identity
    while hasattr(source, "ex_iterable"):  # a step over another stream
        settings = _plain({key: value for key, value in vars(source).items() if not key.startswith("_")}, "ex_iterable")
        if settings is _UNKNOWN:
            return None
        steps.append([type(source).__name__, settings])
        source = source.ex_iterable
    origin = _stream_origin(source)
    features = _plain(stream.features)
    if origin is None or features is _UNKNOWN:
        return None
    return {"stream": origin, "steps": steps, "split": str(stream.split), "features": features}


_UNKNOWN = object()  # a value whose identity cannot be told from what it holds (a function, a random generator)


def _plain(value, skip: str | None = None):
    """``value`` as JSON-like data (a dataset as its fingerprint; key ``skip`` of a dict left out), or ``_UNKNOWN``."""
    import datasets

    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, datasets.Dataset):
        return {"fingerprint": value._fingerprint}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        items = [(str(key), _plain(item)) for key, item in value.items() if key != skip]
        return _UNKNOWN if any(item is _UNKNOWN for _, item in items) else dict(sorted(items))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(item) for item in value]
        if any(item is _UNKNOWN for item in items):
            return _UNKNOWN
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    return _UNKNOWN


def _stream_origin(source) -> dict | None:
    """The identity of the innermost iterable of a stream: what it reads, and how; None when it cannot be known."""
    import datasets

    read = getattr(source, "generate_tables_fn", None) or getattr(source, "generate_examples_fn", None)
    arguments = _plain(getattr(source, "kwargs", None))
    if read is None or arguments is _UNKNOWN:
        return None
    builder = getattr(read, "__self__", None)
    if isinstance(builder, datasets.DatasetBuilder):  # load_dataset(..., streaming=True)
        config = _plain(vars(builder.config))  # a generator function here (from_generator) makes it unknown
        if config is _UNKNOWN:
            return None
        files = []
        for split_files in (builder.config.data_files or {}).values():
            # datasets' own identity of each file: a local file's modification time, a Hub file's commit, an ETag.
            origins = list(getattr(split_files, "origin_metadata", None) or [])
            origins += [()] * (len(split_files) - len(origins))
            files += [
                [str(path), _plain(origin), _file_stat(str(path))]
                for path, origin in zip(split_files, origins, strict=False)
            ]
        return {"builder": builder.name, "repo": builder.repo_id, "config": config, "files": files, "read": arguments}
    if getattr(read, "__module__", "").startswith("datasets."):  # Dataset.to_iterable_dataset(): its shards
        return {"read": read.__qualname__, "arguments": arguments}
    return None


def _file_stat(path: str) -> list[int] | None:
    """Size and modification time (ns) of a local data file; None for a remote one (its revision or ETag, in the
    data file's origin metadata, identifies it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def report_problems(problems: dict[int, str], n_rows: int | None, skip_invalid_rows: bool) -> None:
    """Raise on the first bad row, or (``skip_invalid_rows``) warn that the bad rows are left out, with the
    reason of the first one. ``n_rows`` None: a stream, whose size is not known."""
    if not problems:
        return
    first = min(problems)
    of_rows = f" of {n_rows}" if n_rows is not None else ""
    if not skip_invalid_rows:
        raise ValueError(
            f"Row {first}: {problems[first]}. {len(problems)} row(s){of_rows} are unusable "
            f"(first rows: {sorted(problems)[:10]}). Fix them, or pass skip_invalid_rows=True to leave them out."
        )
    logger.warning(
        "Skipping %d%s rows that have no usable image or caption (first: row %d, %s).",
        len(problems),
        of_rows,
        first,
        problems[first],
    )


def undecoded_cells(dataset, image_column: str) -> Iterator:
    """The image cells of a map-style dataset as ``{"bytes", "path"}`` dicts (or what the column holds when it is
    not an Image column), read in Arrow batches without decoding any image."""
    import datasets

    column = dataset.select_columns([image_column])
    if isinstance(column.features[image_column], datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))
    for batch in column.with_format(None).iter(batch_size=CHECK_BATCH):
        yield from batch[image_column]


def _is_empty(cell) -> bool:
    if isinstance(cell, dict):
        return not cell.get("bytes") and not cell.get("path")
    return cell is None or (isinstance(cell, (str, bytes)) and not cell)


def image_problem(cell) -> str | None:
    """Why an image cell cannot be decoded, or None when it can.

    ``cell`` is what a dataset holds: a ``{"bytes", "path"}`` dict, a path, encoded bytes, or a decoded PIL image.
    The check reads the headers and verifies the data without decoding it (PNG: every chunk's checksum; JPEG: the
    end-of-image marker). Only when that cheap check cannot tell (a JPEG without its end marker, other formats)
    is the image decoded. Remote files (``hf://``, ``https://`` paths of a stream) are not checked here: they are
    checked as they are read.
    """
    data, problem = _image_bytes(cell)
    if problem is None and data is not None:
        problem = _data_problem(data, _where(cell))
    return problem


def _image_bytes(cell) -> tuple[bytes | None, str | None]:
    """``(the encoded bytes of an image cell, None)``: its own, or those of the local file it points to; or ``(None,
    why there are none)``. ``(None, None)`` for a decoded image or a remote file, which are not read here."""
    if isinstance(cell, PIL.Image.Image):
        return None, None
    if _is_empty(cell):
        return None, "has no image"
    data, path = _cell_source(cell)
    if data is not None:
        return data, None
    if path is None:
        return None, f"holds a {type(cell).__name__}, expected an image, a path or encoded bytes"
    if "://" in path:
        return None, None
    return _read_file(path)


def _where(cell) -> str:
    """The file an image cell points to, for a message: `` (PATH)``, or nothing."""
    path = _cell_source(cell)[1]
    return f" ({path})" if path else ""


def _image_identity(cell, data: bytes | None, row: int) -> bytes:
    """What tells an image apart from the others: the SHA-256 of its encoded bytes (``data``), else of its path (a
    remote file is read only when it is embedded), else of its row (a decoded image)."""
    if data is None:
        path = _cell_source(cell)[1]
        data = f"path\0{path}".encode() if path is not None else f"row\0{row}".encode()
    return hashlib.sha256(data).digest()


def _local_file(cell) -> str | None:
    """The path of the local file an undecoded image cell points to; None when it holds its bytes or no path."""
    data, path = _cell_source(cell)
    return path if data is None and path is not None and "://" not in path else None


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """``(the bytes of the image file at path, None)``, or ``(None, why it cannot be read)``."""
    if not os.path.isfile(path):
        return None, f"points to {path}, which does not exist"
    try:
        with open(path, "rb") as file:
            return file.read(), None
    except OSError as error:
        return None, f"points to {path}, which cannot be read ({error.strerror or error})"


def _data_problem(data: bytes, where: str) -> str | None:
    """Why encoded image bytes cannot be decoded (``where``: the file they come from, for the message), or None."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.verify()
        if image_format == "PNG" or (image_format == "JPEG" and data.rstrip(b"\0").endswith(b"\xff\xd9")):
            return None
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        return _decoding_problem(error, where)
    return None


def _decoding_problem(error: Exception, where: str = "") -> str:
    reason = str(error) or type(error).__name__
    if "truncated" in reason.lower():
        return f"holds a truncated image file{where}"
    return f"holds data that is not a readable image{where}: {reason}"


def _cell_source(cell) -> tuple[bytes | None, str | None]:
    """(encoded bytes, path) of an undecoded image cell."""
    if isinstance(cell, dict):
        return cell.get("bytes") or None, cell.get("path") or None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    if isinstance(cell, (str, os.PathLike)):
        return None, os.fspath(cell)
    return None, None


def open_image(cell, feature=None) -> PIL.Image.Image:
    """An image cell decoded as ``datasets`` decodes it (EXIF orientation applied, ``feature``'s mode when it is a
    ``datasets.Image`` with one): a PIL image, a ``{"bytes", "path"}`` dict, a path, encoded bytes, or an array of
    pixels."""
    import datasets

    if isinstance(cell, PIL.Image.Image):
        return cell
    if isinstance(cell, np.ndarray):
        return PIL.Image.fromarray(cell)
    data, path = _cell_source(cell)
    if data is None and path is None:
        raise ValueError(f"expected an image, a path or encoded bytes, got a {type(cell).__name__}")
    decoder = datasets.Image(mode=feature.mode if isinstance(feature, datasets.Image) else None)
    return decoder.decode_example({"bytes": data, "path": path})


def decode_rgb(cell, feature=None) -> tuple[PIL.Image.Image | None, str | None]:
    """``(RGB image, None)`` for a decodable image cell, else ``(None, why not)``: how a row is read when it is
    embedded (see :func:`open_image` and :func:`to_rgb`)."""
    if _is_empty(cell):
        return None, "has no image"
    try:
        return to_rgb(open_image(cell, feature)), None
    except FileNotFoundError as error:
        return None, f"points to {error.filename or _cell_source(cell)[1]}, which does not exist"
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        path = _cell_source(cell)[1]
        return None, _decoding_problem(error, f" ({path})" if path else "")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB: the one conversion that distilling and evaluating share.

    - Transparency (RGBA, LA, PA, premultiplied modes, a palette with a transparent colour) is composited on
      white, as icons and emoji are meant to be seen.
    - 16-bit greyscale (``I;16`` and its byte orders) maps 0..65535 onto 0..255.
    - 32-bit integer (``I``) and float (``F``) greyscale map the range their values fit in onto 0..255: [0, 1]
      for floats, else 8, 16 or 31 bits. Negative values and NaN become black.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return PIL.Image.fromarray(_to_8_bit(np.asarray(image), image.mode)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale values of a 16-bit, 32-bit or float image as uint8 (see :func:`to_rgb`)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    peak = float(values.max(initial=0.0))
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and peak <= 1.0:
        top = 1.0
    else:  # the bit depth the values fit in
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0**31 - 1
    return np.floor(np.minimum(values, top) * (255.0 / top)).astype(np.uint8)


def encode_png(image: PIL.Image.Image) -> bytes:
    """The PNG bytes of an image: what the distilled set, the run folder and the cards store."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
