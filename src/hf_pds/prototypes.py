"""Steps 2-6 of PDS on plain arrays: prune pairs, cluster each modality, match clusters, build prototypes.

Nothing here touches a model. torch is imported only by the optional ``"torch"`` k-means backend (and to read
a ``device`` argument), inside the functions that need it. The unit of the method is the *pair* (image,
caption): an image with five captions makes five pairs, each carrying the image's embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import BinaryIO, Protocol

import numpy as np

from .distributed import SINGLE_PROCESS, all_gather, all_reduce_sum, broadcast
from .kmeans import (
    CHUNK,
    FLOAT32,
    SAMPLE_PER_CENTRE,
    WEIGHTED_BACKENDS,
    block_rows,
    kmeans,
    nearest_centres,
    resolve_kmeans_backend,
    scale_exponent,
    torch_device,
)

logger = logging.getLogger(__name__)


@dataclass
class Prototypes:
    """Matched image/text prototypes, sorted by ``similarity`` (descending).

    Attributes:
        image_prototypes: ``[M, d_image]`` mean raw image embedding of each matched cluster pair.
        text_prototypes: ``[M, d_text]`` mean raw text embedding of the same pairs.
        caption_index: ``[M]`` row into ``text_embeds`` of the training caption closest (cosine) to each
            text prototype.
        image_cluster: ``[M]`` image k-means cluster of each prototype.
        text_cluster: ``[M]`` text k-means cluster matched to it.
        support: ``[M]`` number of kept pairs in both clusters (0 when the prototype fell back to the
            k-means centres).
        similarity: ``[M]`` cosine between image and text prototype; empty when the two embeddings have
            different widths (encoders of two spaces), and the prototypes are then sorted by ``support``.
        n_pairs: pairs before pruning.
        n_pruned: pairs dropped by pruning.
    """

    image_prototypes: np.ndarray
    text_prototypes: np.ndarray
    caption_index: np.ndarray
    image_cluster: np.ndarray
    text_cluster: np.ndarray
    support: np.ndarray
    similarity: np.ndarray
    n_pairs: int = 0
    n_pruned: int = 0
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.caption_index)

    def save(self, file: str | os.PathLike | BinaryIO) -> None:
        """Write every field into one ``.npz`` (a path or a binary file object); :meth:`load` gives them all back,
        so that no field is lost on the way (a resumed run reads its prototypes so)."""
        arrays = {item.name: getattr(self, item.name) for item in fields(self)}
        scalars = {name: arrays.pop(name) for name in list(arrays) if not isinstance(arrays[name], np.ndarray)}
        np.savez(file, **arrays, scalars=np.asarray(json.dumps(scalars)))

    @classmethod
    def load(cls, file: str | os.PathLike | BinaryIO) -> Prototypes:
        """The prototypes that :meth:`save` wrote."""
        with np.load(file, allow_pickle=False) as stored:
            values = {name: stored[name] for name in stored.files if name != "scalars"}
            values.update(json.loads(str(stored["scalars"])))
        return cls(**values)


def pairs_after_pruning(n_pairs: int, prune_ratio: float) -> int:
    """How many pairs survive pruning: the reference drops ``int(n_pairs * prune_ratio)``."""
    return n_pairs - int(n_pairs * prune_ratio)


def check_budget(
    budget: int,
    n_pairs: int | None = None,
    prune_ratio: float = 0.0,
    n_images: int | None = None,
    n_rows: int | None = None,
) -> int:
    """``budget`` as an int; ``ValueError`` unless ``budget`` prototypes can be drawn from ``n_pairs`` pairs of
    ``n_images`` distinct images (held by ``n_rows`` rows, when the message should say so) after pruning
    ``prune_ratio`` of them.

    With ``n_pairs=None`` (a stream not read yet) only the budget and the ratio themselves are checked. Numpy
    integers count as integers; booleans do not.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}.")
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}.")
    check_prune_ratio(prune_ratio)
    if n_pairs is not None:
        kept = pairs_after_pruning(n_pairs, prune_ratio)
        if budget > kept:
            raise ValueError(
                f"budget={budget} is larger than the {kept} pairs left after pruning "
                f"{n_pairs - kept} of {n_pairs} pairs (prune_ratio={prune_ratio}); "
                "lower the budget or the prune_ratio."
            )
    if n_images is not None and budget > n_images:
        held = f" (held by {n_rows} rows: identical images count once)" if n_rows not in (None, n_images) else ""
        raise ValueError(
            f"budget={budget} is larger than the {n_images} distinct images{held}; "
            "k-means cannot make more image clusters than there are distinct images."
        )
    return int(budget)


def check_prune_ratio(prune_ratio: float) -> float:
    """``prune_ratio`` as a float; ``ValueError`` unless it is a number in [0, 1)."""
    if (
        isinstance(prune_ratio, bool)
        or not isinstance(prune_ratio, (int, float, np.integer, np.floating))
        or not 0.0 <= prune_ratio < 1.0
    ):
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}.")
    return float(prune_ratio)


def check_seed(seed: int) -> int:
    """``seed`` as an int; ``ValueError`` unless it is an integer in [0, 2**32) (k-means' ``random_state``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    return int(seed)


def _check_embeddings(name: str, embeds: np.ndarray) -> np.ndarray:
    embeds = np.asarray(embeds)
    check_rows(name, embeds)
    return embeds.astype(np.float32, copy=False)


def check_rows(name: str, embeds: np.ndarray) -> float:
    """Raise unless ``embeds`` is a non-empty numeric ``[rows, dim]`` matrix whose rows are finite and fit
    float32; the message names ``name`` and the first bad rows. Returns the largest absolute value."""
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [rows, dim], got shape {embeds.shape}.")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {embeds.shape}).")
    if not np.issubdtype(embeds.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {embeds.dtype}.")
    # In chunks: a memory-mapped matrix is read, not materialised.
    finite, largest = [], 0.0
    for start in range(0, len(embeds), CHUNK):
        block = embeds[start : start + CHUNK]
        finite.append(np.isfinite(block).all(axis=1))
        if finite[-1].all():
            largest = max(largest, float(max(block.max(), -block.min())))
    finite = np.concatenate(finite)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{name} has NaN or inf values in {len(rows)} row(s), first rows: {rows[:5].tolist()}.")
    if np.issubdtype(embeds.dtype, np.floating) and np.finfo(embeds.dtype).max > FLOAT32.max:
        _check_float32_range(name, embeds)
    return largest


def _check_float32_range(name: str, embeds: np.ndarray) -> None:
    """Raise unless every row of a float64 matrix keeps its values in float32, in which it is clustered: beyond
    float32's largest value a row becomes inf, and a row whose values all lie below its smallest normal value
    becomes zero (or keeps a few bits), which puts every such row in one cluster."""
    largest = np.concatenate(
        [
            np.maximum(np.abs(block.max(axis=1)), np.abs(block.min(axis=1)))
            for block in (embeds[start : start + CHUNK] for start in range(0, len(embeds), CHUNK))
        ]
    )
    for rows, what in (
        (np.flatnonzero(largest > FLOAT32.max), f"beyond float32's largest value ({FLOAT32.max:.3g})"),
        (
            np.flatnonzero((largest > 0) & (largest < FLOAT32.tiny)),
            f"all below float32's smallest normal value ({FLOAT32.tiny:.3g}), where they vanish",
        ),
    ):
        if len(rows):
            raise ValueError(
                f"{name} row {rows[0]} has values of magnitude up to {largest[rows[0]]:.3g}, {what}; "
                f"{len(rows)} row(s) do so (first rows: {rows[:5].tolist()}). Embeddings are clustered in float32: "
                "scale them all by one factor (k-means gives the same clusters)."
            )


def _identical_rows(embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows``, a number shared by exactly the rows of ``embeds`` that hold the same values (0, 1, ...
    in order of first appearance). Identical images have identical embeddings, and k-means cannot make two
    clusters of one point: the budget is checked against the distinct rows."""
    seen: dict[bytes, int] = {}
    identity = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), CHUNK):  # in blocks: a memory-mapped matrix is read, not materialised
        block = np.ascontiguousarray(embeds[rows[start : start + CHUNK]])
        for offset, values in enumerate(block):
            identity[start + offset] = seen.setdefault(hashlib.sha256(values).digest(), len(seen))
    return identity


def _l2_normalize(embeds: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero).

    Each row is first brought to a largest absolute value in [0.5, 1) by a power of two: that is exact in
    floating point (ordinary rows give bit-identical results), and the squared norm of a row of values
    around 1e30 (or 1e-30) no longer overflows (or underflows) float32."""
    embeds = np.asarray(embeds)
    if not np.issubdtype(embeds.dtype, np.floating):
        embeds = embeds.astype(np.float32)
    _, exponent = np.frexp(np.abs(embeds).max(axis=1, keepdims=True))
    scaled = np.ldexp(embeds, -exponent)
    norms = np.linalg.norm(scaled, axis=1, keepdims=True)
    return scaled / np.maximum(norms, np.finfo(np.float32).tiny)


def pair_cosine(image_embeds: np.ndarray, text_embeds: np.ndarray, image_rows: np.ndarray | None = None) -> np.ndarray:
    """Row-wise cosine similarity of ``image_embeds[image_rows]`` and ``text_embeds``, in blocks of rows
    (``image_rows`` None: row ``i`` with row ``i``). Images are taken in float32, texts in at least float32 (float16
    shards are converted a block at a time). Each value depends on its two rows only, not on the blocks."""
    cosine = np.empty(len(text_embeds), dtype=np.float32)
    for start in range(0, len(text_embeds), CHUNK):
        stop = start + CHUNK
        images = image_embeds[start:stop] if image_rows is None else image_embeds[image_rows[start:stop]]
        cosine[start:stop] = np.einsum(
            "nd,nd->n",
            _l2_normalize(np.asarray(images, dtype=np.float32)),
            _l2_normalize(_at_least_float32(text_embeds[start:stop])),
        )
    return cosine


def _at_least_float32(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return rows.astype(np.result_type(rows.dtype, np.float32), copy=False)


def prune_pairs(cosine: np.ndarray, prune_ratio: float) -> np.ndarray:
    """Indices (ascending) of the pairs kept after dropping the ``prune_ratio`` lowest-cosine pairs.

    Ties are broken by position, so the result is deterministic.
    """
    n_drop = int(len(cosine) * prune_ratio)
    order = np.argsort(cosine, kind="stable")
    return np.sort(order[n_drop:])


def count_table(image_labels: np.ndarray, text_labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``C[i, j]`` = number of pairs in image cluster ``i`` and text cluster ``j``."""
    cells = np.asarray(image_labels, dtype=np.int64) * n_clusters + np.asarray(text_labels, dtype=np.int64)
    return np.bincount(cells, minlength=n_clusters * n_clusters).reshape(n_clusters, n_clusters)


def match_clusters(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of image to text clusters with the largest total overlap."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(-table)


def cluster_means(
    points: np.ndarray, labels: np.ndarray, n_clusters: int, fallback: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Mean of ``points[rows]`` (``points`` when ``rows`` is None) per label; a label with no member takes
    its row of ``fallback``. Repeated rows are summed through a sparse matrix, never materialised."""
    from scipy import sparse

    rows = np.arange(len(labels)) if rows is None else rows
    members = sparse.csr_matrix(
        (np.ones(len(labels), dtype=np.float64), (labels, rows)), shape=(n_clusters, len(points))
    )
    sums = members @ np.asarray(points, dtype=np.float64)
    return _means(sums, np.bincount(labels, minlength=n_clusters), fallback)


def nearest_by_cosine(queries: np.ndarray, candidates: np.ndarray, chunk_size: int = 65_536) -> np.ndarray:
    """For each query row, the index of the candidate row with the highest cosine similarity (ties: the lowest
    index)."""
    return _best_by_cosine(_l2_normalize(queries), candidates, chunk_size)[0]


def _best_by_cosine(unit_queries: np.ndarray, candidates: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of the best candidate row of each unit query row, read ``chunk_size`` rows at a time (in
    float32); ties go to the lowest index."""
    best_index = np.zeros(len(unit_queries), dtype=np.int64)
    best_score = np.full(len(unit_queries), -np.inf, dtype=np.float32)
    for start in range(0, len(candidates), chunk_size):
        chunk = np.asarray(candidates[start : start + chunk_size], dtype=np.float32)
        scores = unit_queries @ _l2_normalize(chunk).T
        chunk_best = scores.argmax(axis=1)
        chunk_score = scores[np.arange(len(unit_queries)), chunk_best]
        better = chunk_score > best_score
        best_index[better] = chunk_best[better] + start
        best_score[better] = chunk_score[better]
    return best_index, best_score


def _shared_space(image_dim: int, text_dim: int, prune_ratio: float) -> bool:
    """Whether image and text embeddings share one space (equal widths); ``ValueError`` when they do not and
    pruning, which compares them, is asked for."""
    if image_dim != text_dim and prune_ratio > 0:
        raise ValueError(
            f"image_embeds and text_embeds have widths {image_dim} and {text_dim}: "
            "pruning compares images with captions, so it needs one shared embedding space. "
            "Use one CLIP model for both, or prune_ratio=0 for encoders of different spaces."
        )
    return image_dim == text_dim


def _check_kept_images(budget: int, n_kept_images: int) -> None:
    if budget > n_kept_images:
        raise ValueError(
            f"budget={budget} is larger than the {n_kept_images} distinct images left after pruning; k-means cannot "
            "make more image clusters than there are distinct images: lower the budget or the prune_ratio."
        )


def _order(
    image_prototypes: np.ndarray, text_prototypes: np.ndarray, support: np.ndarray, shared_space: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted similarity) of the prototypes: by image-text cosine, highest first; encoders of two spaces
    have no such cosine, so by support, and the similarity is empty. Warns when prototypes fell back to the
    k-means centres."""
    fallbacks = int((support == 0).sum())
    if fallbacks:
        logger.warning(
            "%d of %d prototypes fell back to the k-means centres: no kept pair lies in both of their matched "
            "clusters. Many identical images or captions do this; such prototypes represent no real pair.",
            fallbacks,
            len(support),
        )
    if not shared_space:
        return np.argsort(-support, kind="stable"), np.empty(0, dtype=np.float32)
    similarity = pair_cosine(image_prototypes, text_prototypes)
    order = np.argsort(-similarity, kind="stable")
    return order, similarity[order]


def extract_prototypes(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    caption_image: np.ndarray,
    budget: int,
    prune_ratio: float = 0.2,
    normalize: bool = False,
    seed: int = 42,
    kmeans_backend: str | None = "auto",
    device=None,
) -> Prototypes:
    """Extract ``budget`` matched image/text prototypes (PDS steps 2-6).

    Args:
        image_embeds: ``[n_images, d]`` raw CLIP image embeddings, one row per distinct image.
        text_embeds: ``[n_captions, d]`` raw CLIP text embeddings, one row per caption (= per pair).
        caption_image: ``[n_captions]`` row of ``image_embeds`` that each caption describes.
        budget: number of prototypes K (the k-means K of both modalities).
        prune_ratio: fraction of pairs with the lowest image-text cosine dropped before clustering. Must be
            0 when the image and text embeddings have different widths (no shared space to compare them in).
        normalize: cluster L2-normalised embeddings (prototypes stay means of raw embeddings).
        seed: ``random_state`` of both k-means runs.
        kmeans_backend: ``"sklearn"`` (the reference's MiniBatchKMeans call, over repeated image rows),
            ``"fast"`` (the same MiniBatchKMeans, seeded by hf-pds's faster k-means++), ``"faiss"`` (Lloyd
            iterations, each distinct image weighted by its kept captions), ``"torch"`` (the faiss algorithm
            written with torch, on ``device``), or ``"auto"`` / None: torch when ``device`` is a CUDA device,
            else faiss when it is installed, else ``fast``. See :func:`kmeans` and docs/performance.md.
        device: where the torch backend runs: None (the CPU), a string such as ``"cuda"`` or ``"cuda:1"``, or
            a ``torch.device``. The other backends ignore it; ``"auto"`` reads it.

    Returns:
        :class:`Prototypes` sorted by image-text cosine, highest first (by support when the two embeddings
        live in different spaces).

    The unit is the pair: an image with five kept captions weighs as much as five pairs, as in the
    reference (which repeats its row five times; the faiss and torch backends weight it instead). The embedding
    matrices may be memory-mapped: they are read in blocks, and only the kept rows are copied.

    Raises:
        ValueError: an input is unusable, and the message names it: NaN or inf values, float64 values that float32
            (in which every backend clusters) cannot hold, or a budget above the pairs or the distinct images
            (identical rows of ``image_embeds`` count once) left after pruning.
    """
    # 1. Check inputs.
    prune_ratio = check_prune_ratio(prune_ratio)
    image_embeds = _check_embeddings("image_embeds", image_embeds)
    text_embeds = _check_embeddings("text_embeds", text_embeds)
    caption_image = np.asarray(caption_image)
    if caption_image.ndim != 1 or len(caption_image) != len(text_embeds):
        raise ValueError(
            f"caption_image must have one entry per row of text_embeds ({len(text_embeds)}), "
            f"got shape {caption_image.shape}."
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image must hold integer row indices, got dtype {caption_image.dtype}.")
    out_of_range = (caption_image < 0) | (caption_image >= len(image_embeds))
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"caption_image[{row}] = {int(caption_image[row])} is not a row of image_embeds "
            f"(valid: 0..{len(image_embeds) - 1}); {int(out_of_range.sum())} entries are out of range."
        )
    shared_space = _shared_space(image_embeds.shape[1], text_embeds.shape[1], prune_ratio)
    n_pairs = len(text_embeds)
    used_images = np.unique(caption_image)
    image_identity = _identical_rows(image_embeds, used_images)
    budget = check_budget(budget, n_pairs, prune_ratio, n_images=int(image_identity.max()) + 1, n_rows=len(used_images))
    seed = check_seed(seed)
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be True or False, got {normalize!r}.")

    # 2. Prune the least similar pairs.
    backend = resolve_kmeans_backend(kmeans_backend, device)
    # Only the torch backend is given a device (checked now, before the work starts).
    options = {"device": torch_device(device)} if backend == "torch" else {}
    if prune_ratio > 0:
        kept = prune_pairs(pair_cosine(image_embeds, text_embeds, image_rows=caption_image), prune_ratio)
    else:
        kept = np.arange(n_pairs)
    kept_images = caption_image[kept]
    distinct_images, image_of_pair, pairs_per_image = np.unique(kept_images, return_inverse=True, return_counts=True)
    _check_kept_images(budget, len(np.unique(image_identity[np.searchsorted(used_images, distinct_images)])))

    # 3. Cluster each modality over the kept pairs.
    if backend not in WEIGHTED_BACKENDS:
        image_points = image_embeds[kept_images]  # one row per pair, as the reference
        image_labels, image_centres = kmeans(
            _l2_normalize(image_points) if normalize else image_points, budget, seed, backend
        )
    else:
        image_points = image_embeds[distinct_images]
        distinct_labels, image_centres = kmeans(
            _l2_normalize(image_points) if normalize else image_points,
            budget,
            seed,
            backend,
            pairs_per_image,
            **options,
        )
        image_labels = distinct_labels[image_of_pair]
    del image_points
    raw_texts = text_embeds[kept]
    text_labels, text_centres = kmeans(
        _l2_normalize(raw_texts) if normalize else raw_texts, budget, seed, backend, **options
    )
    if normalize:
        # Centres of normalised points are not in the raw space: use raw member means instead.
        image_centres = cluster_means(image_embeds, image_labels, budget, image_centres, rows=kept_images)
        text_centres = cluster_means(raw_texts, text_labels, budget, text_centres)

    # 4. Match image clusters to text clusters by overlap.
    table = count_table(image_labels, text_labels, budget)
    image_cluster, text_cluster = match_clusters(table)

    # 5. Prototypes: raw means over the pairs in both clusters, or the k-means centres when none are.
    matched_cell = np.full((budget, budget), -1, dtype=np.int64)
    matched_cell[image_cluster, text_cluster] = np.arange(budget)
    prototype_of_pair = matched_cell[image_labels, text_labels]
    in_prototype = prototype_of_pair >= 0
    image_prototypes = cluster_means(
        image_embeds,
        prototype_of_pair[in_prototype],
        budget,
        image_centres[image_cluster],
        rows=kept_images[in_prototype],
    )
    text_prototypes = cluster_means(
        raw_texts[in_prototype], prototype_of_pair[in_prototype], budget, text_centres[text_cluster]
    )
    support = table[image_cluster, text_cluster]
    order, similarity = _order(image_prototypes, text_prototypes, support, shared_space)

    # 6. Caption of each text prototype: the closest training caption (all captions, pruned or not).
    caption_index = nearest_by_cosine(text_prototypes[order], text_embeds)

    return _sorted(
        order,
        similarity,
        caption_index,
        (image_prototypes, text_prototypes, image_cluster, text_cluster, support),
        (n_pairs, len(kept)),
        _settings(budget, prune_ratio, normalize, seed, backend),
    )


def _sorted(order, similarity, caption_index, arrays: tuple, sizes: tuple[int, int], settings: dict) -> Prototypes:
    """The :class:`Prototypes` of both stages: ``arrays`` (image and text prototypes, their clusters, their support)
    put in ``order``; ``sizes`` is (pairs, kept pairs); ``settings`` is :func:`_settings`'s."""
    image_prototypes, text_prototypes, image_cluster, text_cluster, support = arrays
    return Prototypes(
        image_prototypes=image_prototypes[order],
        text_prototypes=text_prototypes[order],
        caption_index=caption_index,
        image_cluster=image_cluster[order].astype(np.int64),
        text_cluster=text_cluster[order].astype(np.int64),
        support=support[order].astype(np.int64),
        similarity=similarity,
        n_pairs=sizes[0],
        n_pruned=sizes[0] - sizes[1],
        settings=settings,
    )


def _settings(budget, prune_ratio, normalize, seed, backend: str, **extra) -> dict:
    """The run's arguments as :attr:`Prototypes.settings` records them (plain Python types), then ``extra``."""
    return {
        "budget": int(budget),
        "prune_ratio": float(prune_ratio),
        "normalize": bool(normalize),
        "seed": int(seed),
        "kmeans_backend": backend,
        **extra,
    }


class ShardLike(Protocol):
    """What :func:`extract_prototypes_sharded` reads of a shard (:class:`hf_pds.shards.ShardRef` is one):
    ``load()`` gives a :class:`hf_pds.shards.PairShard`: ``image_embeds`` ``[n_images, d]``, ``text_embeds``
    ``[n_pairs, d_text]``, ``caption_image`` ``[n_pairs]`` (None: pair ``i`` is image ``i``) and
    ``image_of_pairs()``."""

    index: int
    n_images: int
    n_pairs: int
    name: str

    def load(self): ...


# Float64 sums are accumulated this many entries of a block at a time (32 MiB).
SUM_BLOCK_ELEMENTS = 2**22


def extract_prototypes_sharded(
    shards: Sequence[ShardLike],
    budget: int,
    prune_ratio: float = 0.2,
    normalize: bool = False,
    seed: int = 42,
    kmeans_backend: str | None = "auto",
    device=None,
    *,
    sample_per_centre: int = SAMPLE_PER_CENTRE,
    state=SINGLE_PROCESS,
    progress: bool = False,
) -> Prototypes:
    """:func:`extract_prototypes` in passes over shards, in memory O(K·d + one shard + a few bytes per pair), on
    one process or several.

    ``shards`` are this process's shards; every process of ``state`` calls this with its own (together: every
    shard once; no shared file system is needed) and gets the same :class:`Prototypes`. Pairs are numbered
    globally shard after shard in ``index`` order (``caption_index`` is such a number). Each pass loads a shard,
    uses it and drops it before the next: only per-pair labels (and, until pruning, cosines) are kept.

    1. Check every shard (widths, finite rows named by shard and row, ``caption_image`` in range) and take the
       pair cosines. Pruning keeps exactly :func:`prune_pairs`'s set (the ``int(n_pairs * prune_ratio)`` lowest
       cosines dropped, ties by global position): a bisection over the float32 order finds the threshold, with
       only counts crossing processes, and ties at it are dropped by global position.
    2. Train the K centres of each modality with :func:`~hf_pds.kmeans.kmeans` on a seeded sample of
       ``min(kept pairs, sample_per_centre * budget)`` kept pairs, drawn by global kept rank (the same sample
       on any number of processes) and gathered in global order: their texts, and their images, each
       distinct image once weighted by its sampled pairs (the faiss and torch backends) or repeated per pair
       (sklearn, fast). The main process trains and broadcasts the centres. The default cap, 256 points per
       centre, is faiss's own (``max_points_per_centroid``); when the sample holds every kept pair, k-means sees
       exactly what :func:`extract_prototypes` gives it.
    3. Assign every kept image and text row to its nearest centre (one float32 matrix product per block); the
       K x K count table is summed over processes, then matched.
    4. Raw means over each matched intersection: float64 sums and counts, summed over processes; an empty
       intersection falls back to the centres, as in :func:`extract_prototypes`.
    5. The caption of each text prototype: the nearest by cosine among all pairs (pruned ones too), the best of
       each shard, then of each process (ties: the lowest global index).

    The budget is checked against pairs and against images with at least one (kept) pair; identical image rows
    are not looked for here (a streaming pass cannot hash every row cheaply), so they count as distinct images.

    With several processes the labels, clusters, support and ``caption_index`` are those of one process, and
    the prototypes agree to float32 rounding of their float64 sums, which are added in another order.

    Args:
        shards: this process's shards (:class:`ShardLike`).
        sample_per_centre: points per centre in k-means' training sample.
        state: the process state (``hf_pds.distributed.process_state()``); one process by default.
        progress: tqdm bars, one per pass, on the main process.
        The other arguments are :func:`extract_prototypes`'s.

    Returns:
        :class:`Prototypes`, as :func:`extract_prototypes` returns them; ``settings`` adds ``"engine":
        "sharded"`` and ``"sample_size"``.

    Raises:
        ValueError: as :func:`extract_prototypes`, naming the shard (and row) at fault; also a shard given twice.
    """
    prune_ratio = check_prune_ratio(prune_ratio)
    seed = check_seed(seed)
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be True or False, got {normalize!r}.")
    if (
        isinstance(sample_per_centre, bool)
        or not isinstance(sample_per_centre, (int, np.integer))
        or sample_per_centre < 1
    ):
        raise ValueError(f"sample_per_centre must be a positive integer, got {sample_per_centre!r}.")
    backend = resolve_kmeans_backend(kmeans_backend, device)
    options = {"device": torch_device(device)} if backend == "torch" else {}
    layout = _Layout.of(shards, state)
    budget = check_budget(budget, layout.n_pairs, prune_ratio)
    label_dtype = np.int16 if budget <= np.iinfo(np.int16).max else np.int32
    show = progress and state.is_main_process

    # 1. Check every shard, take the cosines, prune.
    keys, first = _check_shards(layout, prune_ratio > 0, show, state)
    image_dim, text_dim = first.image_dim, first.text_dim
    shared_space = _shared_space(image_dim, text_dim, prune_ratio)
    check_budget(budget, layout.n_pairs, prune_ratio, n_images=first.used_images)
    n_drop = int(layout.n_pairs * prune_ratio)
    kept = _kept_pairs(keys, layout, n_drop, state)
    del keys

    # 2. Train the centres on a sample of the kept pairs.
    kept_offsets, n_kept = _offsets({ref.index: int(kept[piece].sum()) for ref, piece in layout.mine()}, state)
    sample_size = min(n_kept, sample_per_centre * budget)
    ranks = (
        np.arange(n_kept)
        if sample_size == n_kept
        else np.sort(np.random.default_rng(seed).choice(n_kept, size=sample_size, replace=False))
    )
    weighted = backend in WEIGHTED_BACKENDS
    pieces, images = [], np.zeros(2, dtype=np.int64)  # images with a kept pair, images in the sample
    for ref, piece in _each(layout, "sample", show):
        part, kept_images = _sample_of_shard(ref, kept[piece], ranks, kept_offsets[ref.index], weighted)
        pieces.append((ref.index, part))
        images += (kept_images, part[3])
    kept_images, sampled_images = all_reduce_sum(images, state).tolist()
    _check_kept_images(budget, kept_images)
    if sampled_images < budget:
        raise ValueError(
            f"budget={budget} is larger than the {sampled_images} distinct images of k-means' sample of "
            f"{sample_size} pairs; raise sample_per_centre ({sample_per_centre}) or lower the budget."
        )
    gathered = all_gather(pieces, state)
    del pieces
    centres = None
    if state.is_main_process:  # one process trains: no thread nondeterminism between processes
        sample_images, sample_weights, sample_texts = _join_sample(gathered, normalize)
        del gathered
        image_centres = kmeans(sample_images, budget, seed, backend, sample_weights, **options)[1]
        text_centres = kmeans(sample_texts, budget, seed, backend, **options)[1]
        centres = (image_centres, text_centres)
        del sample_images, sample_texts
    image_centres, text_centres = broadcast(centres, state)
    exponents = (0, 0) if normalize else (scale_exponent(first.image_largest), scale_exponent(first.text_largest))

    # 3. Assign every kept pair to its two nearest centres; count and match.
    image_labels = np.full(len(kept), -1, dtype=label_dtype)
    text_labels = np.full(len(kept), -1, dtype=label_dtype)
    table = np.zeros((budget, budget), dtype=np.int64)
    raw = _Sums(budget, image_dim, text_dim)  # with normalize: the raw centres of the clusters
    for ref, piece in _each(layout, "assign", show):
        image_labels[piece], text_labels[piece] = _assign_shard(
            ref, kept[piece], image_centres, text_centres, normalize, exponents, raw if normalize else None
        )
        table += count_table(image_labels[piece][kept[piece]], text_labels[piece][kept[piece]], budget)
    del kept
    table = all_reduce_sum(table, state)
    image_cluster, text_cluster = match_clusters(table)
    if normalize:
        raw = raw.reduced(state)
        image_centres = raw.means("image", image_centres)
        text_centres = raw.means("text", text_centres)

    # 4. Raw means over each matched intersection.
    matched_cell = np.full((budget, budget), -1, dtype=np.int64)
    matched_cell[image_cluster, text_cluster] = np.arange(budget)
    sums = _Sums(budget, image_dim, text_dim)
    for ref, piece in _each(layout, "means", show):
        _add_intersections(ref, image_labels[piece], text_labels[piece], matched_cell, sums)
    del image_labels, text_labels
    sums = sums.reduced(state)
    image_prototypes = sums.means("image", image_centres[image_cluster])
    text_prototypes = sums.means("text", text_centres[text_cluster])
    support = table[image_cluster, text_cluster]
    order, similarity = _order(image_prototypes, text_prototypes, support, shared_space)

    # 5. Caption of each text prototype: the nearest caption of all pairs, best of each shard, then of all.
    queries = _l2_normalize(text_prototypes[order])
    best = [_best_of_shard(ref, queries, layout.pair_offset[ref.index]) for ref, _ in _each(layout, "captions", show)]
    caption_index = _best_of(all_gather(best, state))

    return _sorted(
        order,
        similarity,
        caption_index,
        (image_prototypes, text_prototypes, image_cluster, text_cluster, support),
        (layout.n_pairs, n_kept),
        _settings(budget, prune_ratio, normalize, seed, backend, engine="sharded", sample_size=int(sample_size)),
    )


def _offsets(counts: dict[int, int], state) -> tuple[dict[int, int], int]:
    """For this process's ``counts`` (``{shard index: count}``), the number of items in the shards of lower
    index, over all processes; and the total. ``ValueError`` when two processes (or one) name a shard twice."""
    merged: dict[int, int] = {}
    for part in all_gather(counts, state):
        repeated = sorted(set(merged) & set(part))
        if repeated:
            raise ValueError(
                f"shard index {repeated[0]} is given to more than one process; every shard must be read by "
                "exactly one process."
            )
        merged.update(part)
    offsets, total = {}, 0
    for index in sorted(merged):
        offsets[index], total = total, total + merged[index]
    return {index: offsets[index] for index in counts}, total


@dataclass
class _Layout:
    """This process's shards in index order, where their pairs lie among this process's per-pair arrays
    (``pieces``) and among all pairs (``pair_offset``)."""

    refs: list
    pieces: list[slice]
    pair_offset: dict[int, int]
    n_pairs: int

    @classmethod
    def of(cls, shards: Sequence[ShardLike], state) -> _Layout:
        refs = sorted(shards, key=lambda ref: ref.index)
        if len({ref.index for ref in refs}) != len(refs):
            raise ValueError(f"shard indices repeat in {[ref.index for ref in refs]}: every shard must be read once.")
        pair_offset, n_pairs = _offsets({ref.index: int(ref.n_pairs) for ref in refs}, state)
        stops = np.cumsum([int(ref.n_pairs) for ref in refs], dtype=np.int64)
        pieces = [slice(int(stop) - int(ref.n_pairs), int(stop)) for ref, stop in zip(refs, stops, strict=True)]
        return cls(refs, pieces, pair_offset, n_pairs)

    @property
    def local_pairs(self) -> int:
        return self.pieces[-1].stop if self.pieces else 0

    def mine(self):
        return zip(self.refs, self.pieces, strict=True)


def _each(layout: _Layout, what: str, show: bool):
    """This process's (shard, its pairs) in index order, with a progress bar when ``show``."""
    if not show:
        return layout.mine()
    from tqdm.auto import tqdm

    return tqdm(layout.mine(), total=len(layout.refs), desc=f"prototypes: {what}", unit="shard")


@dataclass
class _FirstPass:
    """What the first pass learns over all processes: the widths, the images with at least one pair, and the
    largest absolute value of each modality."""

    image_dim: int
    text_dim: int
    used_images: int
    image_largest: float
    text_largest: float


def _check_shards(layout: _Layout, cosines: bool, show: bool, state) -> tuple[np.ndarray, _FirstPass]:
    """Pass 1: check every shard (see :func:`_check_shard`) and take the cosine keys of this process's pairs
    (empty without ``cosines``). A bad shard raises the same ``ValueError`` on every process (the first bad
    shard's), so that none waits for the others."""
    keys = np.empty(layout.local_pairs if cosines else 0, dtype=np.int32)
    error, widths, used, largest = None, None, 0, [0.0, 0.0]
    try:
        for ref, piece in _each(layout, "check", show):
            shard_widths, shard_used, shard_largest, shard_keys = _check_shard(ref, cosines)
            if widths is not None and shard_widths[1:] != widths[1:]:
                raise _width_error(widths, shard_widths)
            widths = widths or shard_widths
            used += shard_used
            largest = [max(pair) for pair in zip(largest, shard_largest, strict=True)]
            if shard_keys is not None:
                keys[piece] = shard_keys
    except ValueError as raised:
        error = str(raised)
    reports = all_gather((error, widths, used, largest), state)
    errors = [report[0] for report in reports if report[0] is not None]
    if errors:
        raise ValueError(errors[0])
    known = [report[1] for report in reports if report[1] is not None]
    for other in known[1:]:
        if other[1:] != known[0][1:]:
            raise _width_error(known[0], other)
    return keys, _FirstPass(
        image_dim=known[0][1],
        text_dim=known[0][2],
        used_images=sum(report[2] for report in reports),
        image_largest=max(report[3][0] for report in reports),
        text_largest=max(report[3][1] for report in reports),
    )


def _width_error(first: tuple, other: tuple) -> ValueError:
    return ValueError(
        f"shard {other[0]!r} has {other[1]}-d image and {other[2]}-d text embeddings, shard {first[0]!r} "
        f"{first[1]}-d and {first[2]}-d: every shard must have the same widths."
    )


def _check_shard(ref: ShardLike, cosines: bool) -> tuple[tuple, int, tuple[float, float], np.ndarray | None]:
    """Read one shard: ``ValueError`` naming it (and the row) unless its matrices are finite, fit float32 and
    have the sizes its reference gives, and ``caption_image`` holds rows of ``image_embeds``. Returns its
    (name, widths), its images with at least one pair, the largest absolute value of each modality, and the
    sortable keys of its pair cosines (when ``cosines``)."""
    shard = ref.load()
    name = ref.name
    image_embeds, text_embeds = np.asarray(shard.image_embeds), np.asarray(shard.text_embeds)
    largest = (
        check_rows(f"image_embeds of shard {name!r}", image_embeds),
        check_rows(f"text_embeds of shard {name!r}", text_embeds),
    )
    if (len(image_embeds), len(text_embeds)) != (ref.n_images, ref.n_pairs):
        raise ValueError(
            f"shard {name!r} holds {len(image_embeds)} images and {len(text_embeds)} pairs, its reference says "
            f"{ref.n_images} and {ref.n_pairs}."
        )
    caption_image = shard.caption_image
    if caption_image is None:
        if len(image_embeds) != len(text_embeds):
            raise ValueError(
                f"shard {name!r} has no caption_image (pair i is image i) but {len(image_embeds)} images and "
                f"{len(text_embeds)} pairs."
            )
        used = len(image_embeds)
    else:
        caption_image = np.asarray(caption_image)
        if caption_image.shape != (len(text_embeds),) or not np.issubdtype(caption_image.dtype, np.integer):
            raise ValueError(
                f"caption_image of shard {name!r} must hold one integer row per pair ({len(text_embeds)}), got "
                f"shape {caption_image.shape} and dtype {caption_image.dtype}."
            )
        out_of_range = (caption_image < 0) | (caption_image >= len(image_embeds))
        if out_of_range.any():
            row = int(np.flatnonzero(out_of_range)[0])
            raise ValueError(
                f"caption_image[{row}] of shard {name!r} is {int(caption_image[row])}, not a row of its "
                f"image_embeds (valid: 0..{len(image_embeds) - 1}); {int(out_of_range.sum())} entries are out of range."
            )
        used = len(np.unique(caption_image))
    # Widths that differ refuse pruning after this pass (see _shared_space), with the message of extract_prototypes.
    shared = image_embeds.shape[1] == text_embeds.shape[1]
    keys = _sortable(pair_cosine(image_embeds, text_embeds, caption_image)) if cosines and shared else None
    return (name, image_embeds.shape[1], text_embeds.shape[1]), used, largest, keys


def _sortable(cosine: np.ndarray) -> np.ndarray:
    """int32 keys in the order of float32 ``cosine`` (-0.0 and 0.0 equal, as in a sort): the bits of a
    non-negative float, the negated magnitude bits of a negative one."""
    bits = (cosine + np.float32(0.0)).view(np.int32)  # -0.0 + 0.0 is 0.0
    return np.where(bits < 0, -(bits & np.int32(0x7FFFFFFF)), bits)


def _kept_pairs(keys: np.ndarray, layout: _Layout, n_drop: int, state) -> np.ndarray:
    """Whether each of this process's pairs survives pruning: exactly :func:`prune_pairs`'s set over all pairs.

    The threshold is the smallest key with more than ``n_drop`` pairs at or below it, found by bisection over
    the int32 keys (at most 32 steps, each a count summed over processes). Pairs below it are dropped, pairs
    above it kept, and of the pairs at it the first ``n_drop - (pairs below)`` by global position are dropped."""
    if n_drop == 0:
        return np.ones(layout.local_pairs, dtype=bool)

    def count(selected: np.ndarray) -> int:
        return int(all_reduce_sum(np.array([np.count_nonzero(selected)], dtype=np.int64), state)[0])

    bounds = [pair for pair in all_gather((int(keys.min()), int(keys.max())) if len(keys) else None, state) if pair]
    low, high = min(pair[0] for pair in bounds), max(pair[1] for pair in bounds)
    while low < high:
        middle = (low + high) // 2
        if count(keys <= middle) > n_drop:
            high = middle
        else:
            low = middle + 1
    ties_dropped = n_drop - count(keys < low)
    tied = keys == low
    tie_offsets, _ = _offsets({ref.index: int(tied[piece].sum()) for ref, piece in layout.mine()}, state)
    kept = keys > low
    for ref, piece in layout.mine():
        rank = tie_offsets[ref.index] + np.cumsum(tied[piece]) - 1
        kept[piece] |= tied[piece] & (rank >= ties_dropped)
    return kept


def _join_sample(gathered: list, normalize: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """k-means' training points from every process's sample parts, in global pair order: the sampled pairs'
    images (distinct, with their sampled pairs as weights; or one row per pair and no weights) and texts,
    L2-normalised when ``normalize``."""
    parts = [part for _, part in sorted((piece for process in gathered for piece in process), key=lambda p: p[0])]
    images = np.concatenate([part[0] for part in parts])
    texts = np.concatenate([part[2] for part in parts])
    weights = None if parts[0][1] is None else np.concatenate([part[1] for part in parts])
    if normalize:
        images, texts = _l2_normalize(images), _l2_normalize(texts)
    return images, weights, texts


def _sample_of_shard(
    ref: ShardLike, kept: np.ndarray, ranks: np.ndarray, kept_offset: int, weighted: bool
) -> tuple[tuple, int]:
    """Pass 2 on one shard: its part of the sample (the kept pairs whose global kept rank is in ``ranks``) as
    (image rows, their weights or None, text rows, distinct images), in float32; and its images with a kept pair."""
    shard = ref.load()
    pairs = np.flatnonzero(kept)
    images_of = shard.image_of_pairs()[pairs]
    start, stop = np.searchsorted(ranks, [kept_offset, kept_offset + len(pairs)])
    chosen = ranks[start:stop] - kept_offset
    images = images_of[chosen]
    distinct, counts = np.unique(images, return_counts=True)
    rows, weights = (distinct, counts) if weighted else (images, None)
    part = (
        np.asarray(shard.image_embeds[rows], dtype=np.float32),
        weights,
        np.asarray(shard.text_embeds[pairs[chosen]], dtype=np.float32),
        len(distinct),
    )
    return part, len(np.unique(images_of))


def _assign(embeds: np.ndarray, rows: np.ndarray, centres: np.ndarray, normalize: bool, exponent: int) -> np.ndarray:
    """Nearest centre of each of ``embeds[rows]``, a block of rows at a time: each block is converted to float32
    (L2-normalised when ``normalize``, else divided by ``2**exponent`` as k-means divided its points), and its
    ``[rows, K]`` distances stay within ``DISTANCE_BLOCK_ELEMENTS``."""
    if exponent:
        centres = np.ldexp(centres, -exponent)
    centre_squared = np.einsum("kd,kd->k", centres, centres)
    labels = np.empty(len(rows), dtype=np.int64)
    step = block_rows(len(centres))
    for start in range(0, len(rows), step):
        block = np.asarray(embeds[rows[start : start + step]], dtype=np.float32)
        if normalize:
            block = _l2_normalize(block)
        elif exponent:
            block = np.ldexp(block, -exponent)
        labels[start : start + step] = nearest_centres(block, centres, centre_squared)
    return labels


class _Sums:
    """Float64 sums of raw image and text rows per label, with their counts (pairs), summed over processes."""

    def __init__(self, n_labels: int, image_dim: int, text_dim: int):
        self.sums = {"image": np.zeros((n_labels, image_dim)), "text": np.zeros((n_labels, text_dim))}
        self.counts = {"image": np.zeros(n_labels, dtype=np.int64), "text": np.zeros(n_labels, dtype=np.int64)}

    def add(
        self, modality: str, embeds: np.ndarray, rows: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
    ) -> None:
        """Add ``weights[i] * embeds[rows[i]]`` (weights: 1 when None) to label ``labels[i]``'s sum."""
        from scipy import sparse

        sums = self.sums[modality]
        weights = np.ones(len(rows), dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
        self.counts[modality] += np.bincount(labels, weights=weights, minlength=len(sums)).astype(np.int64)
        step = max(1, SUM_BLOCK_ELEMENTS // sums.shape[1])
        for start in range(0, len(rows), step):
            stop = min(start + step, len(rows))
            members = sparse.csr_matrix(
                (weights[start:stop].astype(np.float64), (labels[start:stop], np.arange(stop - start))),
                shape=(len(sums), stop - start),
            )
            sums += members @ np.asarray(embeds[rows[start:stop]], dtype=np.float64)

    def reduced(self, state) -> _Sums:
        for modality in self.sums:
            self.sums[modality] = all_reduce_sum(self.sums[modality], state)
            self.counts[modality] = all_reduce_sum(self.counts[modality], state)
        return self

    def means(self, modality: str, fallback: np.ndarray) -> np.ndarray:
        return _means(self.sums[modality], self.counts[modality], fallback)


def _means(sums: np.ndarray, counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``sums / counts`` per row as float32; a row with no member takes its row of ``fallback``."""
    means = fallback.astype(np.float64, copy=True)
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means.astype(np.float32)


def _assign_shard(
    ref: ShardLike,
    kept: np.ndarray,
    image_centres: np.ndarray,
    text_centres: np.ndarray,
    normalize: bool,
    exponents: tuple[int, int],
    raw: _Sums | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 3 on one shard: the image and text label of each of its pairs (-1 when pruned), each kept image row
    assigned once; with ``raw``, the raw rows are also summed per label (an image once per kept pair)."""
    shard = ref.load()
    pairs = np.flatnonzero(kept)
    used, image_of_pair, pairs_per_image = np.unique(
        shard.image_of_pairs()[pairs], return_inverse=True, return_counts=True
    )
    used_labels = _assign(shard.image_embeds, used, image_centres, normalize, exponents[0])
    text_labels = np.full(len(kept), -1, dtype=np.int64)
    text_labels[pairs] = _assign(shard.text_embeds, pairs, text_centres, normalize, exponents[1])
    image_labels = np.full(len(kept), -1, dtype=np.int64)
    image_labels[pairs] = used_labels[image_of_pair]
    if raw is not None:
        raw.add("image", shard.image_embeds, used, used_labels, pairs_per_image)
        raw.add("text", shard.text_embeds, pairs, text_labels[pairs])
    return image_labels, text_labels


def _add_intersections(
    ref: ShardLike, image_labels: np.ndarray, text_labels: np.ndarray, matched_cell: np.ndarray, sums: _Sums
) -> None:
    """Pass 4 on one shard: add the raw rows of every kept pair in a matched cell to its prototype's sums (an
    image row once, weighted by its pairs in the cell)."""
    shard = ref.load()
    pairs = np.flatnonzero(image_labels >= 0)
    prototype = matched_cell[image_labels[pairs], text_labels[pairs]]
    inside = prototype >= 0
    pairs, prototype = pairs[inside], prototype[inside]
    n_prototypes = len(matched_cell)
    cells, counts = np.unique(shard.image_of_pairs()[pairs] * n_prototypes + prototype, return_counts=True)
    sums.add("image", shard.image_embeds, cells // n_prototypes, cells % n_prototypes, counts)
    sums.add("text", shard.text_embeds, pairs, prototype)


def _best_of_shard(ref: ShardLike, unit_queries: np.ndarray, pair_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 5 on one shard: (global pair index, cosine) of the caption nearest each unit query (ties: the
    lowest index)."""
    index, score = _best_by_cosine(unit_queries, ref.load().text_embeds, block_rows(len(unit_queries)))
    return index + pair_offset, score


def _best_of(gathered: list) -> np.ndarray:
    """The global pair index of the best candidate of each query among every shard's (index, cosine) pair of
    arrays: the highest cosine, ties to the lowest index."""
    candidates = [candidate for process in gathered for candidate in process]
    index = np.stack([candidate[0] for candidate in candidates])
    score = np.stack([candidate[1] for candidate in candidates])
    best = np.lexsort((index, -score), axis=0)[0]
    return index[best, np.arange(index.shape[1])]
