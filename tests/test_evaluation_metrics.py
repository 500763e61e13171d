"""Retrieval metrics (known answers, ties, several texts per image, chunking) and the coreset baselines'
defining properties, on plain arrays."""

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from hf_pds.evaluation import retrieval_metrics, retrieval_metrics_from_features, select_coreset
from hf_pds.evaluation.coreset import (
    coverage_radius,
    herding_selection,
    k_center_selection,
    nearest_distinct_rows,
    pds_select,
    pick_captions,
)

# 3 images x 5 texts; texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2.
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.5, 0.2, 0.0],
        [0.3, 0.8, 0.6, 0.1, 0.7],
        [0.2, 0.7, 0.4, 0.9, 0.3],
    ]
)
TEXT_IMAGE = np.array([0, 0, 1, 2, 2])


def reference_ranks(similarity, text_image):
    """Ranks by sorting, as BLIP's itm_eval computes them (valid when there are no ties)."""
    text_ranks = []
    for text in range(similarity.shape[1]):
        order = np.argsort(-similarity[:, text])
        text_ranks.append(int(np.flatnonzero(order == text_image[text])[0]))
    image_ranks = []
    for image in range(similarity.shape[0]):
        order = np.argsort(-similarity[image])
        image_ranks.append(min(int(np.flatnonzero(order == text)[0]) for text in np.flatnonzero(text_image == image)))
    return np.array(text_ranks), np.array(image_ranks)


def test_known_ranks_with_several_texts_per_image():
    # Text ranks (wrong images scoring >= the right one): 0, 2, 0, 0, 1.
    # Image ranks (other images' texts scoring >= the image's best text): 0, 2, 0.
    metrics = retrieval_metrics(SIMILARITY, TEXT_IMAGE, ks=(1, 2, 3))
    assert metrics["ir1"] == pytest.approx(60.0)
    assert metrics["ir2"] == pytest.approx(80.0)
    assert metrics["ir3"] == pytest.approx(100.0)
    assert metrics["tr1"] == pytest.approx(200 / 3)
    assert metrics["tr2"] == pytest.approx(200 / 3)
    assert metrics["tr3"] == pytest.approx(100.0)
    six = [60, 80, 100, 200 / 3, 200 / 3, 100]
    assert metrics["mean"] == pytest.approx(np.mean(six))
    assert metrics["rsum"] == pytest.approx(np.sum(six))
    default = retrieval_metrics(SIMILARITY, TEXT_IMAGE)
    assert set(default) == {"ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "mean", "rsum"}
    assert default["ir5"] == default["tr10"] == 100.0


def test_an_image_is_found_by_its_best_text_and_its_own_texts_do_not_count_against_it():
    # Image 0's texts score 0.9 and 0.8; a wrong text at 0.85 sits between them: still rank 0.
    similarity = np.array([[0.9, 0.8, 0.85], [0.1, 0.2, 0.95]])
    metrics = retrieval_metrics(similarity, np.array([0, 0, 1]), ks=(1,))
    assert metrics["tr1"] == 100.0
    # Text 1 (0.8 for its image) loses to nothing: image 1 scores 0.2 for it.
    assert metrics["ir1"] == 100.0


def test_ties_count_against_the_right_answer():
    # A constant similarity: every right answer is tied with all wrong ones.
    n_images, per_image = 4, 2
    text_image = np.repeat(np.arange(n_images), per_image)
    metrics = retrieval_metrics(np.ones((n_images, n_images * per_image)), text_image, ks=(1, 3, 4, 6, 7))
    # Text -> image: 3 wrong images tie with the right one, so the rank is 3.
    assert [metrics[f"ir{k}"] for k in (1, 3, 4)] == [0.0, 0.0, 100.0]
    # Image -> text: 6 wrong texts tie with the image's best text, so the rank is 6.
    assert [metrics[f"tr{k}"] for k in (1, 6, 7)] == [0.0, 0.0, 100.0]
    # One tie between the right image and a wrong one is enough to miss R@1.
    similarity = np.array([[0.5, 0.1], [0.5, 0.9]])
    assert retrieval_metrics(similarity, np.array([0, 1]), ks=(1,))["ir1"] == 50.0


def test_matches_sorting_without_ties_and_chunking_changes_nothing():
    rng = np.random.default_rng(0)
    n_images, n_texts = 40, 170
    text_image = np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_texts - n_images)])
    similarity = rng.normal(size=(n_images, n_texts))
    text_ranks, image_ranks = reference_ranks(similarity, text_image)
    expected = {f"ir{k}": 100 * np.mean(text_ranks < k) for k in (1, 5, 10)}
    expected.update({f"tr{k}": 100 * np.mean(image_ranks < k) for k in (1, 5, 10)})
    whole = retrieval_metrics(similarity, text_image, chunk_size=10_000)
    for key, value in expected.items():
        assert whole[key] == pytest.approx(value)
    for chunk_size in (1, 7, 64):
        assert retrieval_metrics(similarity, text_image, chunk_size=chunk_size) == whole


def test_features_path_equals_the_matrix_path():
    rng = np.random.default_rng(1)
    # Small integers: the dot products are exact, so the two paths must agree to the bit, ties included.
    images = rng.integers(-3, 4, size=(30, 6)).astype(np.float32)
    texts = rng.integers(-3, 4, size=(90, 6)).astype(np.float32)
    text_image = np.concatenate([np.arange(30), rng.integers(0, 30, 60)])
    expected = retrieval_metrics(images @ texts.T, text_image)
    for chunk_size in (4, 1000):
        got = retrieval_metrics_from_features(images, texts, text_image, normalize=False, chunk_size=chunk_size)
        assert got == expected


def test_five_thousand_by_twenty_five_thousand_in_bounded_memory():
    rng = np.random.default_rng(2)
    n_images, per_image, dim = 5000, 5, 32
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    # Each text is its image plus a little noise: every text ranks its own image first and vice versa.
    text_image = np.repeat(np.arange(n_images), per_image)
    texts = images[text_image] + 0.05 * rng.normal(size=(n_images * per_image, dim)).astype(np.float32)
    tracemalloc.start()
    metrics = retrieval_metrics_from_features(images, texts, text_image, chunk_size=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert metrics["ir1"] == metrics["tr1"] == 100.0
    full_matrix = n_images * n_images * per_image * 4  # 500 MB as float32
    assert peak < full_matrix / 4, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("similarity", "text_image", "message"),
    [
        (np.zeros(5), np.zeros(5, int), "2-d"),
        (np.zeros((2, 3)), np.array([0, 1]), "one entry per text"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), "not an image row"),
        (np.zeros((3, 3)), np.array([0, 1, 1]), "have no text"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
        (np.array([[np.nan, 0], [0, 0]]), np.array([0, 1]), "NaN"),
    ],
)
def test_invalid_inputs_are_named(similarity, text_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(similarity, text_image)


def test_importing_the_evaluation_package_stays_light():
    code = (
        "import sys, hf_pds.evaluation as e; e.retrieval_metrics; e.select_coreset; "
        "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'sentence_transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Coresets ---------------------------------------------------------------------------------------------------


def clustered(n_per_cluster=60, n_clusters=8, dim=6, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per_cluster)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


@pytest.mark.parametrize("method", ["random", "herding", "k-center", "pds-select"])
def test_every_method_returns_distinct_rows_deterministically(method):
    points, labels = clustered()
    texts = np.eye(8)[labels] + 0.01 * np.random.default_rng(1).normal(size=(len(labels), 8))
    kwargs = {"text_embeds": texts, "caption_image": np.arange(len(points))} if method == "pds-select" else {}
    rows = select_coreset(method, points, 8, seed=3, **kwargs)
    assert rows.dtype == np.int64 and rows.shape == (8,)
    assert len(set(rows.tolist())) == 8 and rows.min() >= 0 and rows.max() < len(points)
    assert np.array_equal(rows, select_coreset(method, points, 8, seed=3, **kwargs))


def test_coreset_errors_name_the_problem():
    points, _ = clustered()
    with pytest.raises(ValueError, match=r"unknown coreset method 'kmeans'.*random, herding, k-center, pds-select"):
        select_coreset("kmeans", points, 5)
    with pytest.raises(ValueError, match="budget=1000 is larger than the 480 images"):
        select_coreset("random", points, 1000)
    with pytest.raises(ValueError, match="pds-select needs text_embeds and caption_image"):
        select_coreset("pds-select", points, 5)
    with pytest.raises(ValueError, match="2-d"):
        select_coreset("herding", points[0], 5)


def test_random_differs_between_seeds():
    points, _ = clustered()
    assert not np.array_equal(
        select_coreset("random", points, 10, seed=0), select_coreset("random", points, 10, seed=1)
    )


def test_k_center_covers_at_least_as_well_as_random():
    points, _ = clustered(n_clusters=12, seed=4)
    for seed in range(5):
        k_center = coverage_radius(points, k_center_selection(points, 12, seed=seed))
        random = coverage_radius(points, select_coreset("random", points, 12, seed=seed))
        assert k_center <= random
    # With one centre per well-separated cluster, farthest-first hits every cluster.
    _, labels = clustered(n_clusters=12, seed=4)
    assert len(set(labels[k_center_selection(points, 12, seed=0)])) == 12


def test_herding_running_mean_approaches_the_data_mean_faster_than_random():
    rng = np.random.default_rng(5)
    points = rng.normal(size=(400, 10)) * np.linspace(0.5, 3.0, 10)
    target = points.mean(axis=0)
    budget = 40

    def running_error(rows):
        means = np.cumsum(points[rows], axis=0) / np.arange(1, len(rows) + 1)[:, None]
        return np.linalg.norm(means - target, axis=1)

    herding = running_error(herding_selection(points, budget))
    random = np.mean([running_error(select_coreset("random", points, budget, seed=seed)) for seed in range(20)], 0)
    assert np.all(herding < random)
    assert herding[-1] < 0.2 * random[-1]


def test_nearest_distinct_rows_gives_a_taken_row_to_the_next_query_as_its_second_nearest():
    candidates = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    queries = np.array([[0.1, 0.0], [0.0, 0.1], [4.0, 4.0]])
    assert nearest_distinct_rows(queries, candidates).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="4 queries cannot each get a distinct row of 3"):
        nearest_distinct_rows(np.zeros((4, 2)), candidates)


def test_pds_select_returns_the_real_images_nearest_the_image_prototypes():
    points, labels = clustered(n_per_cluster=30, n_clusters=6, dim=5, seed=7)
    rng = np.random.default_rng(8)
    # Three captions per image, in a text space of another width (12-d), sharing the cluster structure.
    caption_image = np.repeat(np.arange(len(points)), 3)
    text_centres = rng.normal(scale=3.0, size=(6, 12))
    texts = text_centres[labels[caption_image]] + 0.2 * rng.normal(size=(len(caption_image), 12))
    selection = pds_select(points, texts, caption_image, budget=6, seed=0)
    rows, prototypes = selection.rows, selection.prototypes
    assert len(set(rows.tolist())) == 6
    # Two spaces: no similarity, prototypes ordered by support.
    assert prototypes.similarity.size == 0
    assert np.all(np.diff(prototypes.support) <= 0)
    distances = ((prototypes.image_prototypes[:, None, :] - points[None]) ** 2).sum(-1)
    assert np.array_equal(rows, distances.argmin(axis=1))
    # One real image per planted cluster.
    assert sorted(labels[rows].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="shared embedding space"):
        pds_select(points, texts, caption_image, budget=6, prune_ratio=0.2)


def test_pick_captions_takes_one_caption_of_each_selected_image():
    caption_image = np.array([2, 0, 1, 0, 2, 2, 1])
    rows = np.array([2, 0])
    drawn = {tuple(pick_captions(rows, caption_image, seed=seed).tolist()) for seed in range(30)}
    for picked in drawn:
        assert caption_image[list(picked)].tolist() == [2, 0]
    assert len(drawn) > 1
    with pytest.raises(ValueError, match="have no caption"):
        pick_captions(np.array([3]), caption_image)
