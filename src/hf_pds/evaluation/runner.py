"""Turn a method and a budget into training pairs, and train the students on them.

A :class:`TrainingPool` is the real training split as features: one row per distinct image, one per caption,
and the image row of each caption. A method makes ``budget`` training pairs out of it:

* ``full``: every (image, caption) pair of the pool;
* ``random`` / ``herding`` / ``k-center`` / ``kmeans-nearest``: the coreset's images, one caption each (drawn
  with the seed);
* ``pds-select``: for each PDS prototype, the real image nearest the image prototype, paired with the text
  prototype (the paper's student consumes the text prototype) or, with ``text_source="caption"``, with the
  retrieved caption's features;
* ``pds-oracle``: the PDS prototypes themselves, image prototype as the image features and text prototype as the
  text, as if a perfect decoder had synthesised an image whose features are the image prototype: the ceiling of
  PDS with ideal synthesis. It selects no image rows (:func:`method_selection` refuses it; :func:`oracle_pairs`
  makes its pairs), so it needs frozen image features in the space the prototypes were extracted in, and cannot
  train a backbone on images (``hf-pds evaluate --baseline`` does not offer it).

Each run seed drives both the selection and the student, so the spread over seeds covers both (for the
coresets, most of the noise comes from which pairs are drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .coreset import METHODS, pds_select, pick_captions, select_coreset
from .student import RetrievalSplit, StudentConfig, train_student

FULL = "full"
CAPTION = "caption"
TEXT_SOURCES = ("prototype", CAPTION)
# Methods whose pairs are features, not rows of the pool: run by method_pairs / run_method / run_grid only.
ORACLE = "pds-oracle"
FEATURE_METHODS = (ORACLE,)
# What one extraction of the PDS prototypes can train on: see pds_variant_pairs.
PDS_VARIANTS = ("pds-select", f"pds-select+{CAPTION}", ORACLE)


@dataclass
class TrainingPool:
    """The training split as features.

    Attributes:
        image_features: ``[n_images, d_image]``, one row per distinct image.
        text_features: ``[n_captions, d_text]``, one row per caption.
        caption_image: ``[n_captions]`` image row of each caption.
    """

    image_features: np.ndarray
    text_features: np.ndarray
    caption_image: np.ndarray

    def __post_init__(self) -> None:
        self.image_features = np.asarray(self.image_features, dtype=np.float32)
        self.text_features = np.asarray(self.text_features, dtype=np.float32)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if self.image_features.ndim != 2 or self.text_features.ndim != 2:
            raise ValueError(
                f"image_features and text_features must be 2-d, got shapes {self.image_features.shape} and "
                f"{self.text_features.shape}."
            )
        if self.caption_image.shape != (len(self.text_features),):
            raise ValueError(
                f"caption_image must have one entry per caption ({len(self.text_features)}), got shape "
                f"{self.caption_image.shape}."
            )
        if len(self.caption_image) and (self.caption_image.min() < 0 or self.caption_image.max() >= len(self)):
            raise ValueError(f"caption_image holds rows outside 0..{len(self) - 1}.")

    def __len__(self) -> int:
        return len(self.image_features)


def method_selection(
    method: str,
    pool: TrainingPool,
    budget: int | None,
    seed: int = 0,
    prune_ratio: float = 0.0,
    text_source: str = "prototype",
) -> tuple[np.ndarray, np.ndarray]:
    """The training pairs of a method as ``(image rows [n] into the pool, text features [n, d_text])``.

    Args:
        method: ``"full"`` or one of :data:`hf_pds.evaluation.coreset.METHODS`.
        pool: the training split.
        budget: number of pairs (ignored by ``full``).
        seed: seed of the selection and of the caption draw.
        prune_ratio: PDS pruning ratio (``pds-select``; 0 when the two encoders have different widths).
        text_source: ``pds-select`` only: ``"prototype"`` (the text prototype) or ``"caption"`` (the features of
            the caption retrieved for it).
    """
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {text_source!r}; choose one of {', '.join(TEXT_SOURCES)}.")
    if method == FULL:
        return pool.caption_image, pool.text_features
    if method in FEATURE_METHODS:
        raise ValueError(
            f"method {method!r} trains on PDS prototypes, not on images of the pool: it selects no image rows. "
            "Use method_pairs (frozen image features) instead."
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join((FULL, *METHODS))}.")
    if budget is None:
        raise ValueError(f"method {method!r} needs a budget.")
    if method == "pds-select":
        selection = pds_select(
            pool.image_features, pool.text_features, pool.caption_image, budget, seed=seed, prune_ratio=prune_ratio
        )
        prototypes = selection.prototypes
        texts = (
            prototypes.text_prototypes if text_source == "prototype" else pool.text_features[prototypes.caption_index]
        )
        return selection.rows, np.asarray(texts, dtype=np.float32)
    rows = select_coreset(method, pool.image_features, budget, seed=seed)
    return rows, pool.text_features[pick_captions(rows, pool.caption_image, seed=seed)]


def pds_variant_pairs(
    pool: TrainingPool,
    budget: int | None,
    seed: int = 0,
    prune_ratio: float = 0.0,
    variants: Sequence[str] = PDS_VARIANTS,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The training pairs ``(images [budget, d_image], texts [budget, d_text])`` of PDS variants, all from one
    :func:`~hf_pds.evaluation.coreset.pds_select` call (k-means runs once):

    * ``pds-select``: the real image nearest each image prototype, with the text prototype (as
      :func:`method_pairs` gives with ``text_source="prototype"``);
    * ``pds-select+caption``: the same images, with the caption retrieved for each text prototype
      (``text_source="caption"``);
    * ``pds-oracle``: the image prototypes themselves, with the text prototypes (:func:`oracle_pairs`).

    Returns ``{variant: (images, texts)}`` in the order of ``variants``.
    """
    unknown = [variant for variant in variants if variant not in PDS_VARIANTS]
    if unknown:
        raise ValueError(f"unknown PDS variant {unknown[0]!r}; choose from {', '.join(PDS_VARIANTS)}.")
    if budget is None:
        raise ValueError("the PDS variants need a budget.")
    selection = pds_select(
        pool.image_features, pool.text_features, pool.caption_image, budget, seed=seed, prune_ratio=prune_ratio
    )
    prototypes = selection.prototypes
    text_prototypes = np.asarray(prototypes.text_prototypes, dtype=np.float32)
    pairs = {}
    for variant in variants:
        if variant == ORACLE:
            pairs[variant] = (np.asarray(prototypes.image_prototypes, dtype=np.float32), text_prototypes)
        elif variant == "pds-select":
            pairs[variant] = (pool.image_features[selection.rows], text_prototypes)
        else:
            pairs[variant] = (pool.image_features[selection.rows], pool.text_features[prototypes.caption_index])
    return pairs


def oracle_pairs(
    pool: TrainingPool, budget: int | None, seed: int = 0, prune_ratio: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``pds-oracle``: ``(image prototypes [budget, d_image], text prototypes [budget, d_text])`` of
    :func:`~hf_pds.evaluation.coreset.pds_select` on the pool with the same seed and pruning, so the same
    prototypes as ``pds-select``'s. The image prototypes stand for the images a perfect decoder would synthesise:
    they are fed to the student as image features, which is only meaningful when the pool's image features are
    the student's own (frozen backbone features), as in the emoji benchmark."""
    if budget is None:
        raise ValueError(f"method {ORACLE!r} needs a budget.")
    return pds_variant_pairs(pool, budget, seed, prune_ratio, (ORACLE,))[ORACLE]


def method_pairs(
    method: str,
    pool: TrainingPool,
    budget: int | None,
    seed: int = 0,
    prune_ratio: float = 0.0,
    text_source: str = "prototype",
) -> tuple[np.ndarray, np.ndarray]:
    """The training pairs of a method as features ``(images [n, d_image], texts [n, d_text])``; arguments as
    :func:`method_selection`, and ``"pds-oracle"`` (:func:`oracle_pairs`; ``text_source`` does not apply: its
    text side is the text prototype)."""
    if method == ORACLE:
        if text_source not in TEXT_SOURCES:
            raise ValueError(f"unknown text source {text_source!r}; choose one of {', '.join(TEXT_SOURCES)}.")
        return oracle_pairs(pool, budget, seed, prune_ratio)
    rows, texts = method_selection(method, pool, budget, seed, prune_ratio, text_source)
    return pool.image_features[rows], texts


def run_method(
    method: str,
    budget: int | None,
    pool: TrainingPool,
    validation: RetrievalSplit,
    test: RetrievalSplit,
    config: StudentConfig | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    prune_ratio: float = 0.0,
    text_source: str = "prototype",
) -> list[dict]:
    """Select pairs and train one student per seed; returns one JSON-ready record per run:
    ``{"method", "budget", "pairs", "seed", "selected_epoch", "validation", "test", "test_selected", ...}``.

    With ``method="pds-select"`` and ``text_source="both"``, each seed's prototypes are computed once and two
    students are trained on them: one on the text prototypes (recorded as ``pds-select``) and one on the
    retrieved captions (recorded as ``pds-select+caption``). ``method="pds-oracle"`` trains on the prototypes
    themselves (:func:`oracle_pairs`), whatever ``text_source``.
    """
    if text_source not in (*TEXT_SOURCES, "both"):
        raise ValueError(f"unknown text source {text_source!r}; choose one of {', '.join((*TEXT_SOURCES, 'both'))}.")
    records = []
    for seed in seeds:
        if method == "pds-select" and text_source == "both":
            variants = pds_variant_pairs(pool, budget, seed, prune_ratio, PDS_VARIANTS[:2])
        else:
            source = "prototype" if text_source == "both" else text_source
            variants = {method: method_pairs(method, pool, budget, seed, prune_ratio, source)}
        for label, (images, texts) in variants.items():
            run = train_student(images, np.asarray(texts, dtype=np.float32), validation, test, config, seed=seed)
            records.append({"method": label, "budget": budget, "pairs": len(texts), **run.to_dict()})
    return records


def train_on_pairs(
    method: str,
    images: np.ndarray,
    texts: np.ndarray,
    validation: RetrievalSplit,
    test: RetrievalSplit,
    config: StudentConfig | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
) -> list[dict]:
    """Train one student per seed on given pairs (e.g. a distilled set); records as :func:`run_method`."""
    records = []
    for seed in seeds:
        run = train_student(images, texts, validation, test, config, seed=seed)
        records.append({"method": method, "budget": len(texts), "pairs": len(texts), **run.to_dict()})
    return records


def encode_split(
    dataset,
    image_encoder,
    text_encoder,
    image_column: str = "image",
    caption_column: str = "caption",
    cache_dir=None,
) -> TrainingPool:
    """Frozen features of a ``datasets.Dataset`` split (cached on disk, see :func:`encode_cached`): one image
    row per dataset row, one text row per caption. The rows are read and checked as the distillation reads them
    (:func:`hf_pds.pairs.read_pairs`): a bad row raises ``ValueError`` naming it."""
    from ..pairs import read_pairs, undecoded_cells
    from .encoders import encode_cached

    pairs = read_pairs(dataset, image_column, caption_column)
    image_features = encode_cached(image_encoder, list(undecoded_cells(dataset, image_column)), cache_dir)
    text_features = encode_cached(text_encoder, pairs.captions, cache_dir)
    return TrainingPool(image_features, text_features, pairs.caption_image)


def retrieval_split(pool: TrainingPool) -> RetrievalSplit:
    """An evaluation split from encoded features."""
    return RetrievalSplit(images=pool.image_features, texts=pool.text_features, text_image=pool.caption_image)


@contextmanager
def torch_threads(count: int | None):
    """Run the block with ``torch.set_num_threads(count)`` (``None``: leave the setting alone), then restore it.

    Small matrix products gain little from a second thread, and on a busy machine OpenMP threads that wait for
    each other can make a step several times slower: one thread per process is the fast and steady choice.
    """
    import torch

    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the thread count must be a positive integer, got {count!r}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# What each worker process of run_grid holds: set once by _init_worker, so that tasks carry only their names.
_WORKER: dict = {}


def _init_worker(pool, validation, test, config, prune_ratio, text_source) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    # One thread for torch, and for the BLAS / OpenMP pools of numpy and scikit-learn's k-means too.
    torch.set_num_threads(1)
    _WORKER["limits"] = threadpool_limits(1)
    _WORKER.update(
        pool=pool, validation=validation, test=test, config=config, prune_ratio=prune_ratio, text_source=text_source
    )


def _run_task(task: tuple[str, int | None, int]) -> list[dict]:
    method, budget, seed = task
    return run_method(
        method,
        budget,
        _WORKER["pool"],
        _WORKER["validation"],
        _WORKER["test"],
        _WORKER["config"],
        seeds=(seed,),
        prune_ratio=_WORKER["prune_ratio"],
        text_source=_WORKER["text_source"],
    )


def run_grid(
    tasks: Sequence[tuple[str, int | None, int]],
    pool: TrainingPool,
    validation: RetrievalSplit,
    test: RetrievalSplit,
    config: StudentConfig | None = None,
    prune_ratio: float = 0.0,
    text_source: str = "prototype",
    workers: int = 1,
    progress=None,
) -> list[dict]:
    """Run ``(method, budget, seed)`` tasks (see :func:`run_method`) and return their records in task order
    (two per ``pds-select`` task with ``text_source="both"``, one per other task).

    With ``workers > 1`` the tasks run in that many processes of one torch thread each; every task depends only
    on its own seed, so the records are the same for any number of workers. ``progress(done, total, record)``
    is called after each task.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    tasks = [(str(method), budget, int(seed)) for method, budget, seed in tasks]
    records: list[list[dict] | None] = [None] * len(tasks)
    done = 0
    if workers == 1:
        from threadpoolctl import threadpool_limits

        saved = dict(_WORKER)
        try:
            with torch_threads(1), threadpool_limits(1):
                _WORKER.update(
                    pool=pool,
                    validation=validation,
                    test=test,
                    config=config,
                    prune_ratio=prune_ratio,
                    text_source=text_source,
                )
                for index, task in enumerate(tasks):
                    records[index] = _run_task(task)
                    done += 1
                    if progress:
                        for record in records[index]:
                            progress(done, len(tasks), record)
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
        return [record for task_records in records for record in task_records]  # type: ignore[union-attr]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(pool, validation, test, config, prune_ratio, text_source),
    ) as executor:
        futures = {executor.submit(_run_task, task): index for index, task in enumerate(tasks)}
        for future in as_completed(futures):
            index = futures[future]
            records[index] = future.result()
            done += 1
            if progress:
                for record in records[index]:
                    progress(done, len(tasks), record)
    return [record for task_records in records for record in task_records]  # type: ignore[union-attr]
