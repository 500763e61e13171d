"""Coreset baselines on plain arrays: which real images (and captions) to keep for a budget.

* ``random``: ``budget`` distinct images drawn uniformly (seeded).
* ``herding``: greedy herding (Welling 2009, as in iCaRL): each step adds the image that brings the running
  mean of the selection closest to the mean of all images.
* ``k-center``: greedy farthest-first traversal (Sener and Savarese 2018): each step adds the image farthest
  from its nearest selected image, which keeps the coverage radius within twice the optimum.
* ``kmeans-nearest``: k-means with K = ``budget`` on the image features (one row per distinct image; no pruning,
  no text clusters, no matching), and the real image nearest each centre: the simplest clustering baseline, the
  one PDS's cluster matching has to beat.
* ``pds-select``: the PDS prototypes (:func:`hf_pds.extract_prototypes`), with the real image nearest each
  image prototype instead of a synthetic image; needs no decoder.

As in the literature, a coreset of images becomes a set of pairs with one caption per selected image
(:func:`pick_captions`). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..prototypes import Prototypes, check_budget, extract_prototypes

METHODS = ("random", "herding", "k-center", "pds-select", "kmeans-nearest")


def _check_features(image_embeds: np.ndarray) -> np.ndarray:
    image_embeds = np.asarray(image_embeds)
    if image_embeds.ndim != 2:
        raise ValueError(f"image_embeds must be a 2-d array [n_images, dim], got shape {image_embeds.shape}.")
    if not np.issubdtype(image_embeds.dtype, np.number):
        raise ValueError(f"image_embeds must be numeric, got dtype {image_embeds.dtype}.")
    if not np.isfinite(image_embeds).all():
        raise ValueError("image_embeds hold NaN or inf values.")
    return image_embeds.astype(np.float64, copy=False)


def _check_budget(budget: int, n_images: int) -> int:
    budget = check_budget(budget)
    if budget > n_images:
        raise ValueError(f"budget={budget} is larger than the {n_images} images to select from.")
    return budget


def random_selection(n_images: int, budget: int, seed: int = 0) -> np.ndarray:
    """``budget`` distinct rows of ``range(n_images)`` drawn uniformly with ``np.random.default_rng(seed)``."""
    budget = _check_budget(budget, n_images)
    return np.random.default_rng(seed).choice(n_images, size=budget, replace=False).astype(np.int64)


def herding_selection(image_embeds: np.ndarray, budget: int) -> np.ndarray:
    """Greedy herding: step t adds the unselected row that makes the mean of the t selected rows closest
    (Euclidean) to the mean of all rows. Deterministic; ties go to the lowest row."""
    points = _check_features(image_embeds)
    budget = _check_budget(budget, len(points))
    target = points.mean(axis=0)
    selected = np.empty(budget, dtype=np.int64)
    available = np.ones(len(points), dtype=bool)
    running_sum = np.zeros(points.shape[1])
    for step in range(budget):
        candidate_means = (running_sum[None, :] + points) / (step + 1)
        distance = ((candidate_means - target[None, :]) ** 2).sum(axis=1)
        distance[~available] = np.inf
        chosen = int(np.argmin(distance))
        selected[step] = chosen
        available[chosen] = False
        running_sum += points[chosen]
    return selected


def k_center_selection(image_embeds: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """Greedy k-center (farthest-first traversal) from a first row drawn with ``seed``: step t adds the row
    farthest (Euclidean) from its nearest selected row. Ties go to the lowest row."""
    points = _check_features(image_embeds)
    budget = _check_budget(budget, len(points))
    first = int(np.random.default_rng(seed).integers(len(points)))
    selected = np.empty(budget, dtype=np.int64)
    selected[0] = first
    nearest = ((points - points[first]) ** 2).sum(axis=1)
    for step in range(1, budget):
        chosen = int(np.argmax(nearest))
        if nearest[chosen] <= 0:
            # Every remaining row duplicates a selected one: fill up with the unselected rows in order.
            rest = np.setdiff1d(np.arange(len(points)), selected[:step], assume_unique=True)
            selected[step:] = rest[: budget - step]
            break
        selected[step] = chosen
        nearest = np.minimum(nearest, ((points - points[chosen]) ** 2).sum(axis=1))
    return selected


def coverage_radius(image_embeds: np.ndarray, selected: np.ndarray) -> float:
    """The largest Euclidean distance from any row to its nearest selected row (what k-center minimises)."""
    points = _check_features(image_embeds)
    centres = points[np.asarray(selected)]
    squared = ((points**2).sum(axis=1)[:, None] - 2.0 * points @ centres.T + (centres**2).sum(axis=1)[None, :]).min(
        axis=1
    )
    return float(np.sqrt(max(float(squared.max()), 0.0)))


def nearest_distinct_rows(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each query row in order, the nearest (Euclidean) candidate row not taken by an earlier query.

    Raises ``ValueError`` when there are more queries than candidates.
    """
    queries = np.asarray(queries, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries and candidates must be 2-d arrays of one width, got shapes {queries.shape} and "
            f"{candidates.shape}."
        )
    if len(queries) > len(candidates):
        raise ValueError(f"{len(queries)} queries cannot each get a distinct row of {len(candidates)} candidates.")
    distance = (queries**2).sum(axis=1)[:, None] - 2.0 * queries @ candidates.T + (candidates**2).sum(axis=1)[None, :]
    taken = np.zeros(len(candidates), dtype=bool)
    rows = np.empty(len(queries), dtype=np.int64)
    for index in range(len(queries)):
        row_distance = np.where(taken, np.inf, distance[index])
        rows[index] = int(np.argmin(row_distance))
        taken[rows[index]] = True
    return rows


def kmeans_nearest_selection(
    image_embeds: np.ndarray, budget: int, seed: int = 0, kmeans_backend: str | None = "sklearn"
) -> np.ndarray:
    """The real image nearest each k-means centre: k-means with K = ``budget`` on the rows of ``image_embeds``
    (each distinct image once), then :func:`nearest_distinct_rows` from the centres, so that two centres never
    pick the same image (a centre whose nearest image is taken gets the next nearest).

    k-means is the prototype engine's (:func:`hf_pds.kmeans.kmeans`) with ``seed`` as its random state;
    ``kmeans_backend`` is resolved as :func:`hf_pds.extract_prototypes` resolves it and defaults, as
    :func:`pds_select` does, to the reference's MiniBatchKMeans call. Returns ``[budget]`` int64 distinct rows,
    in the order of the centres.
    """
    from ..kmeans import kmeans, resolve_kmeans_backend

    points = _check_features(image_embeds)
    budget = _check_budget(budget, len(points))
    backend = resolve_kmeans_backend(kmeans_backend)
    _, centres = kmeans(points.astype(np.float32), budget, seed, backend)
    return nearest_distinct_rows(centres, points)


@dataclass
class PDSSelection:
    """What ``pds-select`` picks.

    Attributes:
        rows: ``[budget]`` distinct image rows, the real image nearest each image prototype, in prototype order.
        prototypes: the :class:`~hf_pds.Prototypes` behind them; ``prototypes.text_prototypes`` is the text
            side the paper's student trains on, ``prototypes.caption_index`` the retrieved captions.
    """

    rows: np.ndarray
    prototypes: Prototypes


def pds_select(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    caption_image: np.ndarray,
    budget: int,
    seed: int = 0,
    prune_ratio: float = 0.0,
    normalize: bool = False,
    kmeans_backend: str | None = "sklearn",
) -> PDSSelection:
    """PDS prototypes (steps 2-6) with the nearest real image (Euclidean, in the image space) standing in for
    each synthetic image; a prototype whose nearest image is taken by an earlier one gets the next nearest.

    ``prune_ratio`` must be 0 when the image and text embeddings have different widths (two encoders of two
    spaces): see :func:`hf_pds.extract_prototypes`. ``kmeans_backend`` defaults to the reference's
    MiniBatchKMeans call; ``"fast"`` seeds it faster (see :func:`hf_pds.kmeans.kmeans`).
    """
    points = _check_features(image_embeds)
    prototypes = extract_prototypes(
        points.astype(np.float32),
        text_embeds,
        caption_image,
        budget=budget,
        prune_ratio=prune_ratio,
        normalize=normalize,
        seed=seed,
        kmeans_backend=kmeans_backend,
    )
    rows = nearest_distinct_rows(prototypes.image_prototypes, points)
    return PDSSelection(rows=rows, prototypes=prototypes)


def select_coreset(
    method: str,
    image_embeds: np.ndarray,
    budget: int,
    seed: int = 0,
    *,
    text_embeds: np.ndarray | None = None,
    caption_image: np.ndarray | None = None,
    prune_ratio: float = 0.0,
) -> np.ndarray:
    """Distinct image rows selected by a coreset ``method``.

    Args:
        method: ``"random"``, ``"herding"``, ``"k-center"``, ``"kmeans-nearest"`` or ``"pds-select"``.
        image_embeds: ``[n_images, d]`` image features, one row per distinct image.
        budget: how many images to select (``<= n_images``).
        seed: seed of the random draw (``random``), of the first centre (``k-center``), of k-means
            (``kmeans-nearest``, ``pds-select``); herding is deterministic and ignores it.
        text_embeds: ``[n_captions, d_text]`` caption features; ``pds-select`` only.
        caption_image: ``[n_captions]`` image row of each caption; ``pds-select`` only.
        prune_ratio: PDS pruning ratio; ``pds-select`` only (0 for encoders of different widths).

    Returns:
        ``[budget]`` int64 distinct rows into ``image_embeds``, in selection order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; choose one of {', '.join(METHODS)}.")
    points = _check_features(image_embeds)
    budget = _check_budget(budget, len(points))
    if method == "random":
        return random_selection(len(points), budget, seed)
    if method == "herding":
        return herding_selection(points, budget)
    if method == "k-center":
        return k_center_selection(points, budget, seed)
    if method == "kmeans-nearest":
        return kmeans_nearest_selection(points, budget, seed)
    if text_embeds is None or caption_image is None:
        raise ValueError("pds-select needs text_embeds and caption_image (the captions and their image rows).")
    return pds_select(points, text_embeds, caption_image, budget, seed=seed, prune_ratio=prune_ratio).rows


def pick_captions(rows: np.ndarray, caption_image: np.ndarray, seed: int = 0) -> np.ndarray:
    """One caption per selected image: for each row, a caption index drawn uniformly (seeded) among the
    captions whose ``caption_image`` is that row."""
    rows = np.asarray(rows, dtype=np.int64)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    order = np.argsort(caption_image, kind="stable")
    starts = np.searchsorted(caption_image[order], rows, side="left")
    stops = np.searchsorted(caption_image[order], rows, side="right")
    counts = stops - starts
    if (counts == 0).any():
        missing = rows[counts == 0]
        raise ValueError(f"{len(missing)} selected image(s) have no caption, first rows: {missing[:5].tolist()}.")
    offsets = np.floor(np.random.default_rng(seed).random(len(rows)) * counts).astype(np.int64)
    return order[starts + offsets]
