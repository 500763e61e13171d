"""The k-means engines of the prototype stage: sklearn's MiniBatchKMeans (the reference call), ``fast`` (the same,
seeded faster), faiss (weighted Lloyd iterations) and torch (the faiss algorithm on any torch device), with what
they share: the backend choice, the device check, the k-means++ seeding, the rescaling of extreme points, the split
of empty clusters, and the nearest-centre assignment in blocks.

It imports nothing of the package; torch, faiss and scikit-learn are imported inside the functions that need them.
"""

from __future__ import annotations

import warnings

import numpy as np

# The reference settings of scikit-learn's MiniBatchKMeans (PDS and LoRS code).
KMEANS_BATCH_SIZE = 10_000
KMEANS_N_INIT = 20
# faiss: Lloyd iterations over every point (no subsampling), faiss's default iteration count.
FAISS_N_ITER = 20
KMEANS_BACKENDS = ("sklearn", "fast", "faiss", "torch")
# Backends that take per-point weights: an image is clustered once, weighted by its kept captions.
WEIGHTED_BACKENDS = ("faiss", "torch")
# Rows per block where a full [n, d] temporary would be large.
CHUNK = 65_536
# At most this many entries in one block's [rows, K] float32 distances (64 MiB), in every assignment to centres.
DISTANCE_BLOCK_ELEMENTS = 2**24
# k-means trained on a sample: at most this many points per centre (faiss's own default cap,
# max_points_per_centroid=256, beyond which it subsamples).
SAMPLE_PER_CENTRE = 256
# torch backend on a CPU: rows are converted to float64 and summed this many entries at a time (8 MiB), so that
# the copy stays in cache: converting a whole block is ten times slower, because of fresh pages.
TORCH_ACCUMULATE_ELEMENTS = 2**20
# Points whose largest absolute value lies outside this range are rescaled by a power of two before k-means:
# beyond it, float32 squared norms overflow (or underflow) for real embedding widths.
SAFE_RANGE = (2.0**-20, 2.0**20)
# faiss's relative perturbation of the two halves of a split cluster (faiss/Clustering.cpp, split_clusters).
SPLIT_EPS = 1 / 1024
# The precision every backend clusters in.
FLOAT32 = np.finfo(np.float32)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def check_device(device):
    """``device`` as a ``torch.device`` (None stays None); ``ValueError`` naming it when it is not a device.

    Accepts None, a string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, or a ``torch.device``. torch is
    imported only when a device is given. Whether the device is present is checked later, by
    :func:`torch_device`, when the torch backend is about to use it."""
    if device is None:
        return None
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"device={device!r} needs torch: pip install torch.") from error
    expected = "device must be None, a device string such as 'cpu' or 'cuda:0', or a torch.device"
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"{expected}; got {device!r} ({type(device).__name__}).")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"{expected}; got {device!r}: {error}") from None


def torch_device(device=None):
    """The ``torch.device`` the torch backend runs on (None: the CPU), after checking that torch can put a
    tensor there; ``ValueError`` naming the device otherwise (e.g. ``"cuda"`` on a machine without CUDA)."""
    import torch

    device = check_device(device) or torch.device("cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device={str(device)!r} cannot be used by the torch k-means backend: {error}") from None
    return device


def resolve_kmeans_backend(backend: str | None = None, device=None) -> str:
    """``sklearn``, ``fast``, ``faiss`` or ``torch``; None / ``"auto"``: ``torch`` when ``device`` is a CUDA
    device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``), else ``faiss`` when it is installed, else
    ``fast`` (docs/performance.md has the measurements behind this order).

    ``device`` (None, a string or a ``torch.device``) is checked here: ``ValueError`` when it names no device.
    Only the torch backend runs on it."""
    device = check_device(device)
    if backend in (None, "auto"):
        if device is not None and device.type == "cuda":
            return "torch"
        return "faiss" if faiss_available() else "fast"
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"kmeans_backend must be one of {KMEANS_BACKENDS} or 'auto', got {backend!r}.")
    if backend == "faiss" and not faiss_available():
        raise ImportError("kmeans_backend='faiss' needs faiss: pip install 'hf-pds[faiss]' (faiss-cpu or faiss-gpu).")
    if backend == "torch" and not torch_available():
        raise ImportError("kmeans_backend='torch' needs torch: pip install torch.")
    return backend


def kmeans_plusplus(
    points: np.ndarray, n_clusters: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """Greedy k-means++ seeding (``2 + log k`` candidates per centre, the best kept), as scikit-learn's,
    with the distances of each round computed as one matrix product. A point of weight w counts as w
    points."""
    n = len(points)
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    squared = np.einsum("nd,nd->n", points, points)
    first = int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum()))
    closest = np.maximum(squared + squared[first] - 2.0 * (points @ points[first]), 0.0)
    potential = float(weights @ closest)
    trials = 2 + int(np.log(n_clusters))
    chosen = [min(first, n - 1)]
    for _ in range(1, n_clusters):
        draws = rng.random(trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(weights * closest), draws), n - 1)
        distances = squared[candidates, None] + squared[None, :] - 2.0 * (points[candidates] @ points.T)
        candidate_closest = np.minimum(closest[None, :], np.maximum(distances, 0.0))
        potentials = candidate_closest @ weights
        best = int(np.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest, potential = candidate_closest[best], float(potentials[best])
    return points[chosen]


def _inertia(points: np.ndarray, centres: np.ndarray) -> float:
    distances = (
        np.einsum("nd,nd->n", points, points)[:, None]
        + np.einsum("kd,kd->k", centres, centres)[None, :]
        - 2.0 * (points @ centres.T)
    )
    return float(np.maximum(distances.min(axis=1), 0.0).sum())


def _scale_exponent(points: np.ndarray) -> int:
    """:func:`scale_exponent` of the largest absolute value of ``points`` (read in blocks)."""
    return scale_exponent(
        max((float(np.abs(points[start : start + CHUNK]).max()) for start in range(0, len(points), CHUNK)), default=0.0)
    )


def scale_exponent(largest: float) -> int:
    """0 when ``largest`` (the largest absolute value of some points) lies in ``SAFE_RANGE`` (or is 0); otherwise
    the power of two ``e`` such that the points divided by ``2**e`` have their largest absolute value in [0.5, 1)."""
    if largest == 0.0 or SAFE_RANGE[0] <= largest <= SAFE_RANGE[1]:
        return 0
    return int(np.frexp(largest)[1])


def kmeans(
    points: np.ndarray,
    n_clusters: int,
    seed: int,
    backend: str = "sklearn",
    weights: np.ndarray | None = None,
    *,
    device=None,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ``points``; returns (labels, centres).

    - ``sklearn``: the reference's ``MiniBatchKMeans(batch_size=10000, n_init=20)``, called as it is.
    - ``fast``: the same algorithm, seeded faster. Like MiniBatchKMeans, it draws ``n_init=20`` k-means++
      seedings, each from a random sample of 30000 points, and keeps the one with the lowest inertia on a
      validation sample. It then runs scikit-learn's mini-batch updates from that seeding. Only the seeding
      is hf-pds's own: one matrix product per round instead of scikit-learn's loops.
    - ``faiss``: a k-means++ seeding on a sample, then ``FAISS_N_ITER`` Lloyd iterations over every point.
      Optional per-point ``weights`` let an image weigh its number of pairs without repeating its row.
    - ``torch``: the faiss algorithm written with torch, on ``device`` (None: the CPU; ``"cuda"`` on a GPU).
      See :func:`_torch_kmeans`.

    ``weights`` (faiss and torch): a point of weight w counts as w points, in the seeding and in the centre
    means. ``init`` (faiss and torch): ``[n_clusters, d]`` initial centres instead of the k-means++ seeding.
    ``device`` is used by the torch backend only.

    Points whose largest absolute value lies outside ``SAFE_RANGE`` (2**-20 to 2**20) are divided by a power
    of two that brings it to about 1, and the centres are multiplied back: the scaling is exact in floating
    point, so the clustering is the one of the unscaled points, but float32 squared norms of values around
    1e30 no longer overflow (unscaled, faiss aborted the interpreter on them, and the sklearn and fast backends
    put every point in one cluster).
    """
    if weights is not None and backend not in WEIGHTED_BACKENDS:
        raise ValueError(f"The {backend} backend clusters repeated rows, not weighted ones.")
    if init is not None and backend not in WEIGHTED_BACKENDS:
        raise ValueError(f"init: the {backend} backend draws its own initial centres; only faiss and torch take init.")
    points = np.asarray(points)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(points),) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(
                f"weights must hold one finite, non-negative weight per point ({len(points)}), "
                f"got shape {weights.shape}."
            )
        if not weights.sum() > 0:
            raise ValueError("weights are all zero: at least one point must weigh something.")
    if init is not None:
        init = np.asarray(init, dtype=np.float32)
        if init.shape != (n_clusters, points.shape[1]):
            raise ValueError(f"init must have shape {(n_clusters, points.shape[1])}, got {init.shape}.")
    exponent = _scale_exponent(points)
    if exponent:
        points = np.ldexp(np.asarray(points, dtype=np.result_type(points.dtype, np.float32)), -exponent)
        init = None if init is None else np.ldexp(init, -exponent)
    labels, centres = _kmeans(points, n_clusters, seed, backend, weights, device, init)
    return labels, (np.ldexp(centres, exponent) if exponent else centres)


def _kmeans(
    points: np.ndarray,
    n_clusters: int,
    seed: int,
    backend: str,
    weights: np.ndarray | None,
    device,
    init: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    if backend == "sklearn":
        model = MiniBatchKMeans(
            n_clusters=n_clusters, batch_size=KMEANS_BATCH_SIZE, n_init=KMEANS_N_INIT, random_state=seed
        )
        labels = model.fit_predict(points)
        return labels.astype(np.int64), model.cluster_centers_.astype(np.float32)
    points = np.ascontiguousarray(points, dtype=np.float32)
    rng = np.random.default_rng(seed)
    sample_size = min(len(points), max(3 * KMEANS_BATCH_SIZE, 3 * n_clusters))
    if backend == "fast":
        validation = points[rng.integers(0, len(points), sample_size)]
        seedings = (
            kmeans_plusplus(points[rng.integers(0, len(points), sample_size)], n_clusters, rng)
            for _ in range(KMEANS_N_INIT)
        )
        initial = min(seedings, key=lambda centres: _inertia(validation, centres))
        model = MiniBatchKMeans(
            n_clusters=n_clusters, init=initial, n_init=1, batch_size=KMEANS_BATCH_SIZE, random_state=seed
        )
        labels = model.fit_predict(points)
        return labels.astype(np.int64), model.cluster_centers_.astype(np.float32)
    if backend == "torch":
        return _torch_kmeans(points, n_clusters, rng, sample_size, weights, device, init)
    import faiss

    weights = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    if init is None:
        sample = np.sort(rng.choice(len(points), size=sample_size, replace=False))
        init = kmeans_plusplus(points[sample], n_clusters, rng, None if weights is None else weights[sample])
    model = faiss.Kmeans(
        points.shape[1],
        n_clusters,
        niter=FAISS_N_ITER,
        seed=int(seed) % 2**31,
        max_points_per_centroid=len(points) + 1,  # use every point: no subsampling
        min_points_per_centroid=1,
        verbose=False,
    )
    model.train(points, weights=weights, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    _, labels = model.index.search(points, 1)
    return labels[:, 0].astype(np.int64), model.centroids.astype(np.float32)


def _torch_kmeans(
    points: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    sample_size: int,
    weights: np.ndarray | None,
    device,
    init: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The faiss backend's k-means with torch, on ``device``: same seeding, same iterations, same weights.

    1. Seeding (unless ``init`` is given): the faiss backend's random sample of ``sample_size`` points (the
       same rows for the same seed), then greedy k-means++ on it (:func:`_torch_kmeans_plusplus`, which
       consumes ``rng`` as :func:`kmeans_plusplus` does), weights honoured.
    2. ``FAISS_N_ITER`` Lloyd iterations over every point: assign each point to its nearest centre, then move
       each centre to the weighted mean of its points. A final assignment gives the labels, as the faiss
       backend's search after training. Like faiss (which stops once the objective no longer decreases), it
       stops early at a fixed point: when an iteration leaves every label as the previous one did (and no
       cluster was empty), further iterations would change nothing.
    3. Empty clusters, as faiss (``split_clusters`` in faiss/Clustering.cpp): the empty cluster takes a copy
       of a non-empty cluster's centre, drawn with probability proportional to its weight minus one (the
       heaviest cluster when none weighs more than one), and the two copies are pushed apart by a relative
       ``SPLIT_EPS`` (+ on even dimensions, - on odd ones, and the reverse); the drawn cluster's weight is
       then shared between the two. faiss draws with its own fixed-seed generator; here ``rng`` draws.

    Distances are ``||c||^2 - 2 x.c`` (``||x||^2`` changes no argmin), one matrix product per block of rows,
    in float32: at most ``DISTANCE_BLOCK_ELEMENTS`` entries of the ``[rows, K]`` distance block exist at once,
    never the whole ``[n, K]`` matrix. Centre sums and weights are accumulated with ``index_add_`` in
    float64 (float32 on MPS, which has no float64): a cluster can gather hundreds of thousands of weighted
    rows, whose float32 running sum would lose several bits, and float64 sums rounded once to float32 centres
    do not depend, in practice, on the order in which CUDA's atomic additions land. On a CPU the rows are
    converted to float64 ``TORCH_ACCUMULATE_ELEMENTS`` entries at a time, which keeps this as fast as a
    float32 sum.

    Deterministic for a given ``rng`` seed on one device (the CPU: bit for bit; CUDA: up to that summation
    order). Results differ slightly between devices, and from faiss, by rounding.
    """
    import torch

    device = torch_device(device)
    accumulate = torch.float32 if device.type == "mps" else torch.float64
    n, dim = points.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of points ({n}).")
    with warnings.catch_warnings():
        # Read-only arrays (memory maps) are never written through this tensor.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(points).to(device)
    if weights is None:
        w = torch.ones(n, dtype=accumulate, device=device)
    else:
        w = torch.from_numpy(np.asarray(weights, dtype=np.float64)).to(device=device, dtype=accumulate)
    if init is None:
        sample = torch.from_numpy(np.sort(rng.choice(n, size=sample_size, replace=False))).to(device)
        centres = _torch_kmeans_plusplus(x.index_select(0, sample), w.index_select(0, sample), n_clusters, rng)
    else:
        centres = torch.from_numpy(np.array(init, dtype=np.float32)).to(device)
    rows = block_rows(n_clusters)
    step = rows if device.type == "cuda" else max(1, TORCH_ACCUMULATE_ELEMENTS // dim)
    sign = torch.ones(dim, dtype=torch.float32, device=device)
    sign[1::2] = -1.0
    labels, previous = torch.empty(n, dtype=torch.int64, device=device), None
    for _ in range(FAISS_N_ITER):
        centre_squared = (centres * centres).sum(dim=1)
        sums = torch.zeros((n_clusters, dim), dtype=accumulate, device=device)
        mass = torch.zeros(n_clusters, dtype=accumulate, device=device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            labels[start:stop] = _nearest_centre(x[start:stop], centres, centre_squared)
            for part in range(start, stop, step):
                part_stop = min(part + step, stop)
                part_labels, part_weights = labels[part:part_stop], w[part:part_stop]
                mass.index_add_(0, part_labels, part_weights)
                source = x[part:part_stop].to(accumulate)
                sums.index_add_(0, part_labels, source if weights is None else source * part_weights[:, None])
        filled = mass > 0
        means = (sums / mass.clamp(min=np.finfo(np.float32).tiny)[:, None]).to(torch.float32)
        centres = torch.where(filled[:, None], means, centres)
        if not bool(filled.all()):
            centres = _split_empty_clusters(centres, mass.cpu().numpy(), sign, rng)
        elif previous is not None and torch.equal(labels, previous):
            # A fixed point: the same members give the same centres, and they the same labels.
            return labels.cpu().numpy().astype(np.int64), centres.cpu().numpy().astype(np.float32)
        previous = labels.clone()
    centre_squared = (centres * centres).sum(dim=1)
    labels = torch.cat(
        [_nearest_centre(x[start : start + rows], centres, centre_squared) for start in range(0, n, rows)]
    )
    return labels.cpu().numpy().astype(np.int64), centres.cpu().numpy().astype(np.float32)


def block_rows(n_clusters: int) -> int:
    """Rows per block of an assignment to ``n_clusters`` centres: its ``[rows, n_clusters]`` float32 distances
    hold at most ``DISTANCE_BLOCK_ELEMENTS`` entries (64 MiB)."""
    return max(1, min(CHUNK, DISTANCE_BLOCK_ELEMENTS // n_clusters))


def nearest_centres(points: np.ndarray, centres: np.ndarray, centre_squared: np.ndarray | None = None) -> np.ndarray:
    """Row of the nearest centre (squared Euclidean) of each of ``points`` (float32), as int64: the argmin of
    ``||c||^2 - 2 x.c`` (``||x||^2`` changes no argmin), one float32 matrix product; ties go to the lower centre.
    The caller bounds the rows (:func:`block_rows`); ``centre_squared`` saves recomputing ``||c||^2`` per block."""
    if centre_squared is None:
        centre_squared = np.einsum("kd,kd->k", centres, centres)
    distances = points @ centres.T
    distances *= -2.0
    distances += centre_squared
    return distances.argmin(axis=1)


def _nearest_centre(block, centres, centre_squared):
    """Row of the nearest centre of each row of ``block``: argmin of ``||c||^2 - 2 x.c`` (one matrix product)."""
    import torch

    return torch.addmm(centre_squared, block, centres.T, alpha=-2.0).argmin(dim=1)


def _split_empty_clusters(centres, mass: np.ndarray, sign, rng: np.random.Generator):
    """faiss's handling of empty clusters (see :func:`_torch_kmeans`): each empty one takes a slightly
    perturbed copy of a drawn non-empty cluster's centre."""
    centres = centres.clone()
    mass = np.asarray(mass, dtype=np.float64).copy()
    for empty in np.flatnonzero(mass == 0):
        spare = np.maximum(mass - 1.0, 0.0)
        split = int(rng.choice(len(mass), p=spare / spare.sum())) if spare.sum() > 0 else int(np.argmax(mass))
        centre = centres[split].clone()
        centres[empty] = centre * (1.0 + SPLIT_EPS * sign)
        centres[split] = centre * (1.0 - SPLIT_EPS * sign)
        mass[empty] = mass[split] / 2
        mass[split] -= mass[empty]
    return centres


def _torch_kmeans_plusplus(points, weights, n_clusters: int, rng: np.random.Generator):
    """:func:`kmeans_plusplus` on ``points`` (a torch tensor) where they lie: greedy k-means++ with
    ``2 + log k`` candidates per centre, a point of weight w counting as w points. It consumes ``rng`` as
    :func:`kmeans_plusplus` does (one draw, then ``2 + log k`` per centre), so that the same seed draws the
    same numbers; the centres picked are the same but for near-ties, which rounding can settle differently.
    Every intermediate stays on the device (no transfer to the host per centre)."""
    import torch

    m = len(points)
    dtype = weights.dtype
    squared = (points * points).sum(dim=1)
    trials = 2 + int(np.log(n_clusters))
    first_draw = rng.random()
    draws = torch.from_numpy(rng.random((n_clusters - 1, trials))).to(device=points.device, dtype=dtype)
    total = weights.sum()
    first = torch.searchsorted(torch.cumsum(weights, dim=0), (total * first_draw).view(1)).clamp_(max=m - 1)
    closest = (
        squared + squared.index_select(0, first) - 2.0 * (points @ points.index_select(0, first).T)[:, 0]
    ).clamp_(min=0.0)
    potential = weights @ closest.to(dtype)
    chosen = [first]
    for round_draws in draws:
        candidates = torch.searchsorted(
            torch.cumsum(weights * closest.to(dtype), dim=0), round_draws * potential
        ).clamp_(max=m - 1)
        distances = torch.addmm(
            squared.index_select(0, candidates)[:, None] + squared[None, :],
            points.index_select(0, candidates),
            points.T,
            alpha=-2.0,
        )
        candidate_closest = torch.minimum(closest[None, :], distances.clamp_(min=0.0))
        potentials = candidate_closest.to(dtype) @ weights
        best = potentials.argmin().view(1)
        chosen.append(candidates.index_select(0, best))
        closest = candidate_closest.index_select(0, best)[0]
        potential = potentials.index_select(0, best)[0]
    return points.index_select(0, torch.cat(chosen))
