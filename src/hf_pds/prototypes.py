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
from dataclasses import dataclass, field, fields
from typing import BinaryIO

import numpy as np

from .kmeans import CHUNK, FLOAT32, WEIGHTED_BACKENDS, kmeans, resolve_kmeans_backend, torch_device

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
    if embeds.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [rows, dim], got shape {embeds.shape}.")
    if embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {embeds.shape}).")
    if not np.issubdtype(embeds.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {embeds.dtype}.")
    # In chunks: a memory-mapped matrix is read, not materialised.
    finite = np.concatenate(
        [np.isfinite(embeds[start : start + CHUNK]).all(axis=1) for start in range(0, len(embeds), CHUNK)]
    )
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{name} has NaN or inf values in {len(rows)} row(s), first rows: {rows[:5].tolist()}.")
    if np.issubdtype(embeds.dtype, np.floating) and np.finfo(embeds.dtype).max > FLOAT32.max:
        _check_float32_range(name, embeds)
    return embeds.astype(np.float32, copy=False)


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
    (``image_rows`` None: row ``i`` with row ``i``)."""
    image_unit = _l2_normalize(np.asarray(image_embeds, dtype=np.float32))
    cosine = np.empty(len(text_embeds), dtype=np.float32)
    for start in range(0, len(text_embeds), CHUNK):
        stop = start + CHUNK
        images = image_unit[start:stop] if image_rows is None else image_unit[image_rows[start:stop]]
        cosine[start:stop] = np.einsum("nd,nd->n", images, _l2_normalize(text_embeds[start:stop]))
    return cosine


def prune_pairs(cosine: np.ndarray, prune_ratio: float) -> np.ndarray:
    """Indices (ascending) of the pairs kept after dropping the ``prune_ratio`` lowest-cosine pairs.

    Ties are broken by position, so the result is deterministic.
    """
    n_drop = int(len(cosine) * prune_ratio)
    order = np.argsort(cosine, kind="stable")
    return np.sort(order[n_drop:])


def count_table(image_labels: np.ndarray, text_labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``C[i, j]`` = number of pairs in image cluster ``i`` and text cluster ``j``."""
    table = np.zeros((n_clusters, n_clusters), dtype=np.int64)
    np.add.at(table, (image_labels, text_labels), 1)
    return table


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
    counts = np.bincount(labels, minlength=n_clusters)
    means = fallback.astype(np.float64, copy=True)
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means.astype(np.float32)


def nearest_by_cosine(queries: np.ndarray, candidates: np.ndarray, chunk_size: int = 65_536) -> np.ndarray:
    """For each query row, the index of the candidate row with the highest cosine similarity."""
    queries = _l2_normalize(queries)
    best_index = np.zeros(len(queries), dtype=np.int64)
    best_score = np.full(len(queries), -np.inf, dtype=np.float32)
    for start in range(0, len(candidates), chunk_size):
        scores = queries @ _l2_normalize(candidates[start : start + chunk_size]).T
        chunk_best = scores.argmax(axis=1)
        chunk_score = scores[np.arange(len(queries)), chunk_best]
        better = chunk_score > best_score
        best_index[better] = chunk_best[better] + start
        best_score[better] = chunk_score[better]
    return best_index


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
    shared_space = image_embeds.shape[1] == text_embeds.shape[1]
    if not shared_space and prune_ratio > 0:
        raise ValueError(
            f"image_embeds and text_embeds have widths {image_embeds.shape[1]} and {text_embeds.shape[1]}: "
            "pruning compares images with captions, so it needs one shared embedding space. "
            "Use one CLIP model for both, or prune_ratio=0 for encoders of different spaces."
        )
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
    n_kept = len(np.unique(image_identity[np.searchsorted(used_images, distinct_images)]))
    if budget > n_kept:
        raise ValueError(
            f"budget={budget} is larger than the {n_kept} distinct images left after pruning; k-means cannot make "
            "more image clusters than there are distinct images: lower the budget or the prune_ratio."
        )

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
    fallbacks = int((support == 0).sum())
    if fallbacks:
        logger.warning(
            "%d of %d prototypes fell back to the k-means centres: no kept pair lies in both of their matched "
            "clusters. Many identical images or captions do this; such prototypes represent no real pair.",
            fallbacks,
            budget,
        )
    if shared_space:
        similarity = pair_cosine(image_prototypes, text_prototypes)
        order = np.argsort(-similarity, kind="stable")
    else:
        # Encoders of two spaces have no image-text cosine: order by support, leave similarity empty.
        similarity = np.empty(0, dtype=np.float32)
        order = np.argsort(-support, kind="stable")

    # 6. Caption of each text prototype: the closest training caption (all captions, pruned or not).
    caption_index = nearest_by_cosine(text_prototypes[order], text_embeds)

    return Prototypes(
        image_prototypes=image_prototypes[order],
        text_prototypes=text_prototypes[order],
        caption_index=caption_index,
        image_cluster=image_cluster[order].astype(np.int64),
        text_cluster=text_cluster[order].astype(np.int64),
        support=support[order].astype(np.int64),
        similarity=similarity[order] if shared_space else similarity,
        n_pairs=n_pairs,
        n_pruned=n_pairs - len(kept),
        settings={
            "budget": int(budget),
            "prune_ratio": float(prune_ratio),
            "normalize": bool(normalize),
            "seed": int(seed),
            "kmeans_backend": backend,
        },
    )
