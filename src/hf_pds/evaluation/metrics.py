"""Image-text retrieval metrics with the semantics of BLIP's ``itm_eval`` (numpy only).

Text to image (IR@K): a text is found when its image ranks within the first K images.
Image to text (TR@K): an image is found when ANY of its texts ranks within the first K texts.

Ranks are computed without sorting, so ties are well defined: the rank of the right answer is the number of
WRONG candidates that score greater than or equal to it (for TR, to the best-scoring of the image's texts).
A tie therefore always counts against the right answer, and a constant similarity matrix scores 0 at every
K up to the number of wrong candidates. Everything works on blocks of rows or columns, so a 5k x 25k
evaluation never holds more than ``chunk_size`` rows or columns of temporaries, and
:func:`retrieval_metrics_from_features` never holds the full similarity matrix at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Rows (TR) or columns (IR) of the similarity matrix handled at once.
DEFAULT_CHUNK_SIZE = 1024


def _check_text_image(text_image: np.ndarray, n_images: int, n_texts: int) -> np.ndarray:
    text_image = np.asarray(text_image)
    if text_image.ndim != 1 or len(text_image) != n_texts:
        raise ValueError(f"text_image must have one entry per text ({n_texts} texts), got shape {text_image.shape}.")
    if not np.issubdtype(text_image.dtype, np.integer):
        raise ValueError(f"text_image must hold integer image rows, got dtype {text_image.dtype}.")
    bad = (text_image < 0) | (text_image >= n_images)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"text_image[{first}] = {int(text_image[first])} is not an image row (valid: 0..{n_images - 1}); "
            f"{int(bad.sum())} entries are out of range."
        )
    without_text = np.flatnonzero(np.bincount(text_image, minlength=n_images) == 0)
    if len(without_text):
        raise ValueError(
            f"{len(without_text)} image(s) have no text, first rows: {without_text[:5].tolist()}; "
            "image-to-text recall needs at least one text per image."
        )
    return text_image.astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}.")
    return ks


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    return int(chunk_size)


def text_to_image_ranks(
    column_block: Callable[[int, int], np.ndarray], text_image: np.ndarray, chunk_size: int
) -> np.ndarray:
    """Rank of each text's image: the number of other images scoring >= it.

    ``column_block(start, stop)`` returns the similarity columns ``[:, start:stop]`` (``[n_images, c]``).
    """
    ranks = np.empty(len(text_image), dtype=np.int64)
    for start in range(0, len(text_image), chunk_size):
        stop = min(start + chunk_size, len(text_image))
        block = column_block(start, stop)
        right = block[text_image[start:stop], np.arange(stop - start)]
        # The right image itself is counted by ">=", hence the -1.
        ranks[start:stop] = (block >= right[None, :]).sum(axis=0) - 1
    return ranks


def image_to_text_ranks(
    row_block: Callable[[int, int], np.ndarray], text_image: np.ndarray, n_images: int, chunk_size: int
) -> np.ndarray:
    """Rank of each image's best text: the number of OTHER images' texts scoring >= that best text.

    ``row_block(start, stop)`` returns the similarity rows ``[start:stop, :]`` (``[c, n_texts]``).
    """
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        block = row_block(start, stop)
        own = text_image[None, :] == np.arange(start, stop)[:, None]
        best = np.where(own, block, -np.inf).max(axis=1)
        ranks[start:stop] = ((block >= best[:, None]) & ~own).sum(axis=1)
    return ranks


def recalls_from_ranks(
    text_ranks: np.ndarray, image_ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Percent recalls ``ir{k}`` (from text-to-image ranks), ``tr{k}`` (from image-to-text ranks), their
    ``mean`` and their sum ``rsum``. A rank r is a hit at K when r < K (rank 0 is the top)."""
    ks = _check_ks(ks)
    metrics = {f"ir{k}": 100.0 * float(np.mean(text_ranks < k)) for k in ks}
    metrics.update({f"tr{k}": 100.0 * float(np.mean(image_ranks < k)) for k in ks})
    values = list(metrics.values())
    metrics["mean"] = float(np.mean(values))
    metrics["rsum"] = float(np.sum(values))
    return metrics


def retrieval_metrics(
    similarity: np.ndarray,
    text_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@K of image-text retrieval from a similarity matrix (BLIP ``itm_eval`` semantics).

    Args:
        similarity: ``[n_images, n_texts]`` scores, higher = closer (a numpy array, or anything
            ``np.asarray`` accepts, e.g. a CPU torch tensor).
        text_image: ``[n_texts]`` integer row of each text's image. Every image needs at least one text.
        ks: the cut-offs K.
        chunk_size: rows / columns processed at once; bounds the temporaries, not the result.

    Returns:
        Percentages ``ir1, ir5, ir10`` (text -> image), ``tr1, tr5, tr10`` (image -> text, an image counts
        as found when any of its texts ranks within K), ``mean`` (of the six) and ``rsum`` (their sum).
        Ties count against the right answer.

    Raises:
        ValueError: a similarity that is not 2-d or holds NaN, a ``text_image`` of the wrong length, out of
            range, or leaving an image without text; bad ``ks`` or ``chunk_size``.
    """
    similarity = np.asarray(similarity)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be a 2-d array [n_images, n_texts], got shape {similarity.shape}.")
    if not np.issubdtype(similarity.dtype, np.number):
        raise ValueError(f"similarity must be numeric, got dtype {similarity.dtype}.")
    if np.isnan(similarity).any():
        raise ValueError("similarity holds NaN values; ranks of NaN scores are undefined.")
    n_images, n_texts = similarity.shape
    text_image = _check_text_image(text_image, n_images, n_texts)
    chunk_size = _check_chunk_size(chunk_size)
    ks = _check_ks(ks)
    text_ranks = text_to_image_ranks(lambda a, b: similarity[:, a:b], text_image, chunk_size)
    image_ranks = image_to_text_ranks(lambda a, b: similarity[a:b], text_image, n_images, chunk_size)
    return recalls_from_ranks(text_ranks, image_ranks, ks)


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)


def retrieval_metrics_from_features(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_image: np.ndarray,
    normalize: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of the dot products (cosines with ``normalize=True``) of two feature sets,
    computed block by block: the ``[n_images, n_texts]`` matrix is never held in memory.

    Args:
        image_features: ``[n_images, d]``.
        text_features: ``[n_texts, d]``.
        text_image: ``[n_texts]`` integer row of each text's image.
        normalize: L2-normalise both sides first (cosine similarity).
        ks: the cut-offs K.
        chunk_size: rows / columns of the similarity computed at once.
    """
    image_features = np.asarray(image_features, dtype=np.float32)
    text_features = np.asarray(text_features, dtype=np.float32)
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"image_features and text_features must be 2-d, got shapes {image_features.shape} and "
            f"{text_features.shape}."
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features have width {image_features.shape[1]} and text_features {text_features.shape[1]}: "
            "retrieval needs one shared space."
        )
    if not (np.isfinite(image_features).all() and np.isfinite(text_features).all()):
        raise ValueError("image_features or text_features hold NaN or inf values.")
    text_image = _check_text_image(text_image, len(image_features), len(text_features))
    chunk_size = _check_chunk_size(chunk_size)
    ks = _check_ks(ks)
    if normalize:
        image_features, text_features = _l2_normalize(image_features), _l2_normalize(text_features)
    text_ranks = text_to_image_ranks(lambda a, b: image_features @ text_features[a:b].T, text_image, chunk_size)
    image_ranks = image_to_text_ranks(
        lambda a, b: image_features[a:b] @ text_features.T, text_image, len(image_features), chunk_size
    )
    return recalls_from_ranks(text_ranks, image_ranks, ks)
