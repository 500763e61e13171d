import dataclasses
import itertools

import numpy as np
import pytest

from hf_pds import Prototypes, extract_prototypes
from hf_pds.kmeans import kmeans
from hf_pds.prototypes import count_table, match_clusters, pair_cosine, pairs_after_pruning, prune_pairs

DIM = 16


@pytest.fixture(params=["sklearn", "fast", "faiss", "torch"])
def backend(request):
    return request.param


def planted_concepts(
    n_concepts=5, images_per_concept=(6, 9, 7, 8, 10), captions_per_image=3, seed=0, mislabeled=0, aligned=True
):
    """Images and captions of well-separated concepts, rows shuffled.

    Image and text centres of a concept point roughly the same way (a matched pair has a high cosine);
    ``mislabeled`` extra pairs give an image a caption of another concept (a low cosine). With
    ``aligned=False`` the text centres are drawn independently of the image centres.
    """
    rng = np.random.default_rng(seed)
    image_centres = rng.normal(size=(n_concepts, DIM)) * 10
    text_centres = image_centres + rng.normal(size=(n_concepts, DIM))
    if not aligned:
        text_centres = rng.normal(size=(n_concepts, DIM)) * 10
    image_concept = np.repeat(np.arange(n_concepts), images_per_concept[:n_concepts])
    rng.shuffle(image_concept)
    image_embeds = image_centres[image_concept] + rng.normal(scale=0.3, size=(len(image_concept), DIM))
    caption_image = np.repeat(np.arange(len(image_concept)), captions_per_image)
    caption_concept = image_concept[caption_image].copy()
    wrong = rng.choice(len(caption_image), size=mislabeled, replace=False)
    caption_concept[wrong] = (caption_concept[wrong] + 1 + rng.integers(n_concepts - 1, size=mislabeled)) % n_concepts
    order = rng.permutation(len(caption_image))
    caption_image, caption_concept = caption_image[order], caption_concept[order]
    text_embeds = text_centres[caption_concept] + rng.normal(scale=0.3, size=(len(caption_image), DIM))
    return {
        "image_embeds": image_embeds.astype(np.float32),
        "text_embeds": text_embeds.astype(np.float32),
        "caption_image": caption_image,
        "image_concept": image_concept,
        "caption_concept": caption_concept,
        "mislabeled": np.isin(np.arange(len(order)), np.flatnonzero(np.isin(order, wrong))),
    }


def concept_of_prototypes(data, protos):
    """The planted concept behind each prototype, found from its image prototype."""
    centres = np.stack(
        [data["image_embeds"][data["image_concept"] == c].mean(0) for c in range(data["image_concept"].max() + 1)]
    )
    return np.linalg.norm(protos.image_prototypes[:, None] - centres[None], axis=2).argmin(1)


@pytest.mark.parametrize("normalize", [False, True])
def test_planted_concepts_are_recovered_exactly(normalize):
    data = planted_concepts()
    protos = extract_prototypes(
        data["image_embeds"],
        data["text_embeds"],
        data["caption_image"],
        budget=5,
        prune_ratio=0.0,
        normalize=normalize,
    )
    assert isinstance(protos, Prototypes) and len(protos) == 5
    concepts = concept_of_prototypes(data, protos)
    assert sorted(concepts) == [0, 1, 2, 3, 4]
    pair_concept = data["image_concept"][data["caption_image"]]
    for k, concept in enumerate(concepts):
        in_concept = pair_concept == concept
        # Support is every pair of the concept, and the prototypes are exactly their raw means.
        assert protos.support[k] == in_concept.sum()
        np.testing.assert_allclose(
            protos.image_prototypes[k],
            data["image_embeds"][data["caption_image"][in_concept]].mean(0),
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            protos.text_prototypes[k], data["text_embeds"][in_concept].mean(0), rtol=1e-5, atol=1e-5
        )
        # The retrieved caption describes the same concept.
        assert data["caption_concept"][protos.caption_index[k]] == concept
    # The text cluster matched to each image cluster holds that concept's captions (ids differ per modality).
    assert len(set(protos.image_cluster)) == len(set(protos.text_cluster)) == 5


def test_caption_is_the_one_closest_to_the_text_prototype():
    # Text centres unrelated to image centres: the caption must come from the text side.
    data = planted_concepts(aligned=False, seed=2)
    protos = extract_prototypes(
        data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5, prune_ratio=0.0
    )
    unit = data["text_embeds"] / np.linalg.norm(data["text_embeds"], axis=1, keepdims=True)
    for k in range(5):
        cosine = unit @ (protos.text_prototypes[k] / np.linalg.norm(protos.text_prototypes[k]))
        assert protos.caption_index[k] == int(np.argmax(cosine))
    assert sorted(data["caption_concept"][protos.caption_index]) == [0, 1, 2, 3, 4]


def test_pruning_drops_mislabeled_pairs_before_clustering(backend):
    data = planted_concepts(mislabeled=12)
    n_pairs = len(data["caption_image"])
    prune_ratio = 12 / n_pairs + 1e-9
    protos = extract_prototypes(
        data["image_embeds"],
        data["text_embeds"],
        data["caption_image"],
        budget=5,
        prune_ratio=prune_ratio,
        kmeans_backend=backend,
    )
    assert protos.n_pruned == 12 and protos.n_pairs == n_pairs
    concepts = concept_of_prototypes(data, protos)
    pair_concept = data["image_concept"][data["caption_image"]]
    clean = ~data["mislabeled"]
    for k, concept in enumerate(concepts):
        # Exactly the clean pairs of the concept: the 12 mislabeled ones were pruned.
        assert protos.support[k] == (clean & (pair_concept == concept)).sum()
        np.testing.assert_allclose(
            protos.text_prototypes[k],
            data["text_embeds"][clean & (pair_concept == concept)].mean(0),
            rtol=1e-5,
            atol=1e-5,
        )


def test_prune_pairs_removes_lowest_cosine_first():
    cosine = np.array([0.9, -0.2, 0.5, 0.1, 0.7, 0.1, 0.3, 0.8, 0.0, 0.6])
    assert prune_pairs(cosine, 0.0).tolist() == list(range(10))
    assert prune_pairs(cosine, 0.2).tolist() == [0, 2, 3, 4, 5, 6, 7, 9]
    # int(10 * 0.35) = 3 pairs dropped: -0.2, 0.0 and the first of the tied 0.1s.
    assert prune_pairs(cosine, 0.35).tolist() == [0, 2, 4, 5, 6, 7, 9]


def test_pair_cosine_is_scale_invariant():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    expected = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(pair_cosine(a * 7.0, b * 0.1), expected, rtol=1e-6)


def test_matching_maximises_total_overlap():
    table = np.array(
        [
            [5, 9, 0, 1],
            [8, 7, 2, 0],
            [0, 3, 6, 4],
            [1, 0, 5, 2],
        ]
    )
    rows, cols = match_clusters(table)
    best = max(sum(table[i, p[i]] for i in range(4)) for p in itertools.permutations(range(4)))
    assert table[rows, cols].sum() == best == 9 + 8 + 4 + 5
    assert sorted(rows) == sorted(cols) == [0, 1, 2, 3]


def test_count_table_counts_pairs():
    table = count_table(np.array([0, 0, 1, 2, 2, 2]), np.array([1, 1, 0, 2, 0, 2]), 3)
    assert table.tolist() == [[0, 2, 0], [1, 0, 0], [1, 0, 2]]


def empty_intersection_data():
    """Three images (A, B, C) with two captions each; the captions of A and B share one text cluster X,
    C's two captions are alone in clusters Y and Z. Whatever the matching, A or B gets a text cluster it
    shares no pair with."""
    axes = np.eye(DIM, dtype=np.float32) * 10
    image_embeds = axes[[0, 1, 2]]
    text_embeds = np.stack([axes[3], axes[3] + 0.01, axes[3] + 0.02, axes[3] + 0.03, axes[4], axes[5]])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    return image_embeds, text_embeds, caption_image


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", ["sklearn", "fast"])
def test_empty_intersection_falls_back_to_cluster_centres(normalize, backend):
    image_embeds, text_embeds, caption_image = empty_intersection_data()
    protos = extract_prototypes(
        image_embeds,
        text_embeds,
        caption_image,
        budget=3,
        prune_ratio=0.0,
        normalize=normalize,
        seed=42,
        kmeans_backend=backend,
    )
    assert np.isfinite(protos.image_prototypes).all() and np.isfinite(protos.text_prototypes).all()
    assert np.isfinite(protos.similarity).all()
    assert sorted(protos.support.tolist()) == [0, 1, 2]
    empty = int(np.flatnonzero(protos.support == 0)[0])
    if normalize:
        # Centres of normalised points are not raw: the fallback is the raw mean of each cluster's members,
        # here image A or B alone and caption Y or Z alone.
        image_centres, text_centres = image_embeds[:2], text_embeds[4:]
    else:
        # The k-means centres themselves (MiniBatchKMeans' running estimates), as in the reference.
        image_centres = kmeans(image_embeds[caption_image], 3, 42, backend)[1]
        text_centres = kmeans(text_embeds, 3, 42, backend)[1]
    assert any(np.allclose(protos.image_prototypes[empty], row, atol=1e-5) for row in image_centres)
    assert any(np.allclose(protos.text_prototypes[empty], row, atol=1e-5) for row in text_centres)


def test_prototypes_are_sorted_by_similarity():
    data = planted_concepts(seed=3)
    protos = extract_prototypes(data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5)
    assert np.all(np.diff(protos.similarity) <= 0)
    np.testing.assert_allclose(
        protos.similarity, pair_cosine(protos.image_prototypes, protos.text_prototypes), rtol=1e-5
    )


def test_same_seed_same_prototypes(backend):
    data = planted_concepts(n_concepts=5, seed=4, mislabeled=5)
    args = (data["image_embeds"], data["text_embeds"], data["caption_image"])
    first = extract_prototypes(*args, budget=12, seed=7, kmeans_backend=backend)
    second = extract_prototypes(*args, budget=12, seed=7, kmeans_backend=backend)
    arrays = [item.name for item in dataclasses.fields(first) if isinstance(getattr(first, item.name), np.ndarray)]
    assert len(arrays) == 7
    for name in arrays:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(budget=0), "budget must be at least 1"),
        (lambda d: d.update(budget=2.5), "budget must be an integer"),
        (lambda d: d.update(budget=97), "budget=97 is larger than the 96 pairs left after pruning 24 of 120"),
        (lambda d: d.update(text_embeds=d["text_embeds"][:, :8]), "widths 16 and 8"),
        (lambda d: d.update(caption_image=d["caption_image"][:-1]), "one entry per row of text_embeds"),
        (lambda d: d["caption_image"].__setitem__(3, 40), r"caption_image\[3\] = 40 is not a row"),
        (lambda d: d["caption_image"].__setitem__(5, -1), r"caption_image\[5\] = -1"),
        (
            lambda d: d["image_embeds"].__setitem__((2, 4), np.nan),
            "image_embeds has NaN or inf values in 1 row",
        ),
        (lambda d: d["text_embeds"].__setitem__((9, 0), np.inf), r"first rows: \[9\]"),
        (lambda d: d.update(image_embeds=d["image_embeds"][0]), "must be a 2-d array"),
        (lambda d: d.update(prune_ratio=1.0), "prune_ratio must be in"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    data = planted_concepts()
    kwargs = {
        "image_embeds": data["image_embeds"],
        "text_embeds": data["text_embeds"],
        "caption_image": data["caption_image"],
        "budget": 5,
        "prune_ratio": 0.2,
    }
    change(kwargs)
    with pytest.raises(ValueError, match=message):
        extract_prototypes(**kwargs)


def test_budget_above_distinct_images_is_refused():
    # 3 images with many captions: 30 pairs, but k-means cannot make 4 image clusters from 3 images.
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="budget=4 is larger than the 3 distinct images"):
        extract_prototypes(rng.normal(size=(3, 8)), rng.normal(size=(30, 8)), np.repeat(np.arange(3), 10), budget=4)


def test_identical_image_rows_count_as_one_image(backend):
    # 12 image rows holding 6 images twice (a stream of a dataset with repeated images gives such embeddings).
    data = planted_concepts(images_per_concept=(2, 1, 1, 1, 1), captions_per_image=2)
    image_embeds = np.concatenate([data["image_embeds"], data["image_embeds"]])
    caption_image = np.concatenate([data["caption_image"], data["caption_image"] + 6])
    text_embeds = np.concatenate([data["text_embeds"], data["text_embeds"]])
    arrays = {"image_embeds": image_embeds, "text_embeds": text_embeds, "caption_image": caption_image}
    for budget in (7, 12):
        with pytest.raises(
            ValueError, match=rf"budget={budget} is larger than the 6 distinct images \(held by 12 rows"
        ):
            extract_prototypes(**arrays, budget=budget, prune_ratio=0.0, kmeans_backend=backend)
    with pytest.raises(ValueError, match="budget=6 is larger than the 5 distinct images left after pruning"):
        extract_prototypes(**arrays, budget=6, prune_ratio=0.2, kmeans_backend=backend)
    protos = extract_prototypes(**arrays, budget=6, prune_ratio=0.0, kmeans_backend=backend)
    assert len(np.unique(protos.image_prototypes, axis=0)) == 6


@pytest.mark.parametrize(
    ("array", "scale", "rows", "message"),
    [
        ("image_embeds", 1e39, [3], "image_embeds row 3 has values of magnitude up to .*, beyond float32's largest"),
        ("text_embeds", 1e39, [0, 7], "text_embeds row 0 .* beyond float32's largest value .*; 2 row\\(s\\) do so"),
        ("image_embeds", 1e-200, slice(None), "image_embeds row 0 has values of magnitude up to .*e-199, all below"),
        ("text_embeds", 1e-200, [5], "text_embeds row 5 .* below float32's smallest normal value"),
    ],
)
def test_float64_embeddings_beyond_float32_are_refused(backend, array, scale, rows, message):
    data = planted_concepts()
    arrays = {name: data[name].astype(np.float64) for name in ("image_embeds", "text_embeds")}
    arrays[array][rows] *= scale
    with pytest.raises(ValueError, match=message):
        extract_prototypes(**arrays, caption_image=data["caption_image"], budget=5, kmeans_backend=backend)


def test_budget_above_images_left_after_pruning_is_refused():
    # 4 images; the two captions of image 3 are its only pairs and both have the lowest cosine.
    image_embeds = np.eye(4, 8, dtype=np.float32)
    text_embeds = np.concatenate([np.repeat(image_embeds[:3], 4, axis=0), -image_embeds[[3, 3]]])
    caption_image = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3, 3])
    with pytest.raises(ValueError, match="budget=4 is larger than the 3 distinct images left after pruning"):
        extract_prototypes(image_embeds, text_embeds, caption_image, budget=4, prune_ratio=0.15)


def test_k_means_counts_an_image_once_per_caption(monkeypatch, backend):
    """sklearn and fast cluster one row per pair, as the reference; faiss and torch weight each image by its pairs."""
    import hf_pds.prototypes as module

    seen = []
    real_kmeans = module.kmeans

    def recording_kmeans(points, n_clusters, seed, used_backend="sklearn", weights=None, **options):
        seen.append((points.copy(), weights))
        return real_kmeans(points, n_clusters, seed, used_backend, weights, **options)

    monkeypatch.setattr(module, "kmeans", recording_kmeans)
    data = planted_concepts(captions_per_image=2)
    extract_prototypes(
        data["image_embeds"],
        data["text_embeds"],
        data["caption_image"],
        budget=5,
        prune_ratio=0.0,
        kmeans_backend=backend,
    )
    (image_points, image_weights), (text_points, text_weights) = seen
    if backend in ("faiss", "torch"):
        np.testing.assert_array_equal(image_points, data["image_embeds"])
        np.testing.assert_array_equal(image_weights, np.full(len(data["image_embeds"]), 2))
    else:
        np.testing.assert_array_equal(image_points, data["image_embeds"][data["caption_image"]])
        assert image_weights is None
    np.testing.assert_array_equal(text_points, data["text_embeds"])
    assert text_weights is None


def test_prototypes_average_over_pairs_not_images(backend):
    # Concept images with 1 to 5 captions: the image prototype weighs each image by its caption count.
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(2, DIM)) * 10
    image_embeds = np.concatenate([centres[0] + rng.normal(size=(4, DIM)), centres[1] + rng.normal(size=(4, DIM))])
    counts = np.array([1, 2, 3, 5, 5, 3, 2, 1])
    caption_image = np.repeat(np.arange(8), counts)
    text_embeds = centres[caption_image // 4] + rng.normal(scale=0.1, size=(len(caption_image), DIM))
    protos = extract_prototypes(
        image_embeds, text_embeds, caption_image, budget=2, prune_ratio=0.0, kmeans_backend=backend
    )
    for k in range(2):
        concept = int(np.argmin(np.linalg.norm(centres - protos.image_prototypes[k], axis=1)))
        members = np.arange(4 * concept, 4 * concept + 4)
        expected = np.average(image_embeds[members], axis=0, weights=counts[members])
        np.testing.assert_allclose(protos.image_prototypes[k], expected, rtol=1e-5, atol=1e-5)
        assert protos.support[k] == counts[members].sum() == 11


def test_encoders_of_different_widths_need_no_pruning_and_sort_by_support(backend):
    data = planted_concepts()
    projection = np.random.default_rng(9).normal(size=(DIM, 6))
    text_embeds = data["text_embeds"] @ projection  # another space, 6-d
    protos = extract_prototypes(
        data["image_embeds"], text_embeds, data["caption_image"], budget=5, prune_ratio=0.0, kmeans_backend=backend
    )
    assert protos.text_prototypes.shape == (5, 6) and protos.image_prototypes.shape == (5, DIM)
    assert protos.similarity.shape == (0,)
    assert protos.support.tolist() == sorted(protos.support.tolist(), reverse=True)
    assert sorted(protos.support.tolist()) == sorted((np.bincount(data["image_concept"]) * 3).tolist())
    concepts = concept_of_prototypes(data, protos)
    assert [data["caption_concept"][index] for index in protos.caption_index] == concepts.tolist()
    with pytest.raises(ValueError, match="pruning compares images with captions"):
        extract_prototypes(data["image_embeds"], text_embeds, data["caption_image"], budget=5, prune_ratio=0.2)


def test_faiss_weights_an_image_by_its_pairs():
    """A weighted image pulls its centre as its repeated rows would: centres are weighted means."""
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.normal(size=(5, 4)), 100 + rng.normal(size=(6, 4))]).astype(np.float32)
    weights = np.array([10, 1, 1, 1, 1, 1, 2, 3, 1, 1, 7], dtype=np.float32)
    labels, centres = kmeans(points, 2, seed=0, backend="faiss", weights=weights)
    assert sorted(np.bincount(labels).tolist()) == [5, 6]
    for label in range(2):
        members = labels == label
        np.testing.assert_allclose(
            centres[label], np.average(points[members], axis=0, weights=weights[members]), rtol=1e-4, atol=1e-4
        )
        assert not np.allclose(centres[label], points[members].mean(axis=0), atol=1e-2)


def test_backend_choice_is_checked(monkeypatch):
    data = planted_concepts()
    with pytest.raises(ValueError, match="kmeans_backend must be one of"):
        extract_prototypes(
            data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5, kmeans_backend="x"
        )
    import hf_pds.kmeans as module

    assert module.resolve_kmeans_backend("auto") == "faiss"  # installed in the test environment
    monkeypatch.setattr(module, "faiss_available", lambda: False)
    assert module.resolve_kmeans_backend(None) == "fast"
    with pytest.raises(ImportError, match=r"pip install 'hf-pds\[faiss\]'"):
        module.resolve_kmeans_backend("faiss")


def test_memory_mapped_embeddings_give_the_same_prototypes(tmp_path, backend):
    data = planted_concepts(mislabeled=6)
    np.save(tmp_path / "images.npy", data["image_embeds"])
    np.save(tmp_path / "texts.npy", data["text_embeds"])
    mapped = extract_prototypes(
        np.load(tmp_path / "images.npy", mmap_mode="r"),
        np.load(tmp_path / "texts.npy", mmap_mode="r"),
        data["caption_image"],
        budget=5,
        kmeans_backend=backend,
    )
    loaded = extract_prototypes(
        data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5, kmeans_backend=backend
    )
    np.testing.assert_array_equal(mapped.image_prototypes, loaded.image_prototypes)
    np.testing.assert_array_equal(mapped.caption_index, loaded.caption_index)


def test_fast_seeding_is_k_means_plus_plus():
    """Each seeding picks distinct points, spread over well-separated groups (one centre per group)."""
    from hf_pds.kmeans import kmeans_plusplus

    rng = np.random.default_rng(0)
    groups = rng.normal(size=(6, 8)) * 50
    points = (np.repeat(groups, 40, axis=0) + rng.normal(size=(240, 8))).astype(np.float32)
    centres = kmeans_plusplus(points, 6, np.random.default_rng(1))
    nearest_group = np.linalg.norm(centres[:, None] - groups[None], axis=2).argmin(axis=1)
    assert sorted(nearest_group.tolist()) == [0, 1, 2, 3, 4, 5]


def many_concepts(seed=0):
    """60 well-separated concepts, 3 to 6 images each, 5 captions per image, 60 mislabeled captions."""
    return planted_concepts(
        n_concepts=60, images_per_concept=(3, 4, 5, 6) * 15, captions_per_image=5, seed=seed, mislabeled=60
    )


@pytest.mark.parametrize("budget", [20, 60])
def test_torch_backend_matches_as_many_pairs_as_faiss(budget):
    data = many_concepts()
    args = (data["image_embeds"], data["text_embeds"], data["caption_image"])
    matched = {
        backend: int(extract_prototypes(*args, budget=budget, kmeans_backend=backend).support.sum())
        for backend in ("faiss", "torch")
    }
    kept = pairs_after_pruning(len(data["caption_image"]), 0.2)
    assert matched["faiss"] > 0.4 * kept
    assert abs(matched["torch"] - matched["faiss"]) <= 0.02 * matched["faiss"], matched


def test_torch_k_means_is_faiss_k_means_from_the_same_start():
    """Same initial centres, same weights: the same labels and, up to rounding, the same centres."""
    rng = np.random.default_rng(6)
    groups = rng.normal(size=(12, 8)) * 4
    points = (groups[rng.integers(0, 12, 600)] + rng.normal(size=(600, 8))).astype(np.float32)
    weights = rng.integers(1, 6, 600)
    init = points[rng.choice(600, 12, replace=False)]
    faiss_labels, faiss_centres = kmeans(points, 12, 0, "faiss", weights=weights, init=init)
    torch_labels, torch_centres = kmeans(points, 12, 0, "torch", weights=weights, init=init)
    np.testing.assert_array_equal(torch_labels, faiss_labels)
    np.testing.assert_allclose(torch_centres, faiss_centres, rtol=1e-5, atol=1e-5)
    for label in range(12):
        members = torch_labels == label
        np.testing.assert_allclose(
            torch_centres[label], np.average(points[members], axis=0, weights=weights[members]), rtol=1e-5, atol=1e-5
        )


def test_torch_k_means_in_small_blocks_gives_the_same_clusters(monkeypatch):
    """Distances and sums are computed a block of rows at a time: the block size changes no label."""
    import hf_pds.kmeans as module

    rng = np.random.default_rng(10)
    points = (rng.normal(size=(9, 6))[rng.integers(0, 9, 1001)] * 3 + rng.normal(size=(1001, 6))).astype(np.float32)
    weights = rng.integers(1, 4, 1001)
    whole = kmeans(points, 9, 0, "torch", weights=weights)
    monkeypatch.setattr(module, "DISTANCE_BLOCK_ELEMENTS", 9 * 100)  # blocks of 100 rows, the last one of 1
    monkeypatch.setattr(module, "TORCH_ACCUMULATE_ELEMENTS", 6 * 7)  # sums 7 rows at a time
    blocked = kmeans(points, 9, 0, "torch", weights=weights)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-6, atol=1e-6)


def test_torch_k_means_is_deterministic_given_the_seed():
    rng = np.random.default_rng(7)
    points = rng.normal(size=(500, 6)).astype(np.float32)
    weights = rng.integers(1, 4, 500)
    first = kmeans(points, 15, 3, "torch", weights=weights)
    second = kmeans(points, 15, 3, "torch", weights=weights)
    other = kmeans(points, 15, 4, "torch", weights=weights)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])  # the seed is used


def test_torch_seeding_draws_as_the_numpy_seeding():
    """The torch k-means++ consumes the generator as kmeans_plusplus does: the same centres, weights honoured."""
    import torch

    from hf_pds.kmeans import _torch_kmeans_plusplus, kmeans_plusplus

    rng = np.random.default_rng(0)
    groups = rng.normal(size=(10, 8)) * 50
    points = (np.repeat(groups, 30, axis=0) + rng.normal(size=(300, 8))).astype(np.float32)
    weights = rng.integers(1, 5, 300).astype(np.float64)
    expected = kmeans_plusplus(points, 10, np.random.default_rng(1), weights)
    centres = _torch_kmeans_plusplus(torch.from_numpy(points), torch.from_numpy(weights), 10, np.random.default_rng(1))
    np.testing.assert_array_equal(centres.numpy(), expected)
    nearest_group = np.linalg.norm(expected[:, None] - groups[None], axis=2).argmin(axis=1)
    assert sorted(nearest_group.tolist()) == list(range(10))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_a_weight_counts_as_repeated_rows(backend):
    rng = np.random.default_rng(8)
    points = (rng.normal(size=(8, 5))[rng.integers(0, 8, 150)] * 3 + rng.normal(size=(150, 5))).astype(np.float32)
    weights = rng.integers(1, 4, 150)
    init = points[:8]
    labels, centres = kmeans(points, 8, 0, backend, weights=weights, init=init)
    repeated_labels, repeated_centres = kmeans(np.repeat(points, weights, axis=0), 8, 0, backend, init=init)
    np.testing.assert_array_equal(np.repeat(labels, weights), repeated_labels)
    np.testing.assert_allclose(centres, repeated_centres, rtol=1e-5, atol=1e-5)
    # The weights matter: unweighted, the centres are other means.
    assert not np.allclose(kmeans(points, 8, 0, backend, init=init)[1], centres, atol=1e-3)


def test_torch_k_means_refills_an_empty_cluster_by_splitting_one():
    """As faiss: a centre left without points takes a perturbed copy of another centre, which it then splits."""
    rng = np.random.default_rng(9)
    points = np.concatenate([5 + rng.normal(size=(40, 4)), -5 + rng.normal(size=(40, 4))]).astype(np.float32)
    init = np.array([[5.0] * 4, [-5.0] * 4, [1000.0] * 4], dtype=np.float32)  # the third centre gets no point
    for backend in ("faiss", "torch"):
        labels, centres = kmeans(points, 3, 0, backend, init=init)
        assert np.bincount(labels, minlength=3).min() > 0, backend
        for label in range(3):
            np.testing.assert_allclose(centres[label], points[labels == label].mean(0), rtol=1e-5, atol=1e-5)


def test_torch_backend_and_device_choice_are_checked(monkeypatch):
    import torch

    import hf_pds.kmeans as module

    assert module.resolve_kmeans_backend("auto", device="cuda") == "torch"
    assert module.resolve_kmeans_backend(None, device=torch.device("cuda", 1)) == "torch"
    assert module.resolve_kmeans_backend("auto", device="cpu") == module.resolve_kmeans_backend("auto") == "faiss"
    assert module.resolve_kmeans_backend("faiss", device="cuda") == "faiss"  # an explicit backend is kept
    assert module.resolve_kmeans_backend("torch") == "torch"
    monkeypatch.setattr(module, "faiss_available", lambda: False)
    assert module.resolve_kmeans_backend("auto", device=torch.device("cpu")) == "fast"
    with pytest.raises(ValueError, match=r"kmeans_backend must be one of \(.*'torch'\) or 'auto', got 'gpu'"):
        module.resolve_kmeans_backend("gpu")
    for device in ("gpu", "cuda:x", 3):
        with pytest.raises(ValueError, match=rf"device must be .* got {device!r}"):
            module.resolve_kmeans_backend("auto", device=device)
    data = planted_concepts()
    args = (data["image_embeds"], data["text_embeds"], data["caption_image"])
    with pytest.raises(ValueError, match="device must be"):
        extract_prototypes(*args, budget=5, kmeans_backend="torch", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' cannot be used by the torch k-means backend"):
            extract_prototypes(*args, budget=5, kmeans_backend="torch", device="cuda")
    protos = extract_prototypes(*args, budget=5, kmeans_backend="torch", device="cpu")
    assert protos.settings["kmeans_backend"] == "torch"


EXTREME_SCALES = (1e30, 1e-30)


def assert_same_prototypes_at_scale(scaled, protos, scale):
    np.testing.assert_array_equal(scaled.caption_index, protos.caption_index)
    np.testing.assert_array_equal(scaled.image_cluster, protos.image_cluster)
    np.testing.assert_array_equal(scaled.text_cluster, protos.text_cluster)
    np.testing.assert_array_equal(scaled.support, protos.support)
    np.testing.assert_allclose(scaled.similarity, protos.similarity, rtol=1e-5)
    assert np.isfinite(scaled.image_prototypes).all() and np.isfinite(scaled.text_prototypes).all()
    np.testing.assert_allclose(scaled.image_prototypes / scale, protos.image_prototypes, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scaled.text_prototypes / scale, protos.text_prototypes, rtol=1e-4, atol=1e-4)


def test_pair_cosine_of_extreme_rows_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 768)).astype(np.float32), rng.normal(size=(4, 768)).astype(np.float32)
    expected = pair_cosine(a, b)
    np.testing.assert_allclose(pair_cosine(a * np.float32(1e30), b * np.float32(1e-30)), expected, rtol=1e-5)


def test_torch_backend_clusters_extreme_embeddings_as_ordinary_ones():
    data = planted_concepts(mislabeled=6)
    protos = extract_prototypes(
        data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5, kmeans_backend="torch"
    )
    for scale in EXTREME_SCALES:
        scaled = extract_prototypes(
            data["image_embeds"] * np.float32(scale),
            data["text_embeds"] * np.float32(scale),
            data["caption_image"],
            budget=5,
            kmeans_backend="torch",
        )
        assert_same_prototypes_at_scale(scaled, protos, scale)


def test_faiss_backend_survives_extreme_embeddings(tmp_path):
    """faiss aborts the interpreter (a C++ assertion) on float32 overflow: run it in a process of its own."""
    import subprocess
    import sys

    data = planted_concepts(mislabeled=6)
    np.savez(tmp_path / "data.npz", **{key: data[key] for key in ("image_embeds", "text_embeds", "caption_image")})
    code = f"""
import numpy as np
from hf_pds import extract_prototypes
data = np.load({str(tmp_path / "data.npz")!r})
results = {{}}
for scale in (1.0,) + {EXTREME_SCALES!r}:
    protos = extract_prototypes(data["image_embeds"] * np.float32(scale), data["text_embeds"] * np.float32(scale),
                                data["caption_image"], budget=5, kmeans_backend="faiss")
    for name in ("caption_index", "image_cluster", "text_cluster", "support", "similarity", "image_prototypes",
                 "text_prototypes"):
        results[f"{{scale}}-{{name}}"] = getattr(protos, name)
np.savez({str(tmp_path / "out.npz")!r}, **results)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    names = (
        "caption_index",
        "image_cluster",
        "text_cluster",
        "support",
        "similarity",
        "image_prototypes",
        "text_prototypes",
    )
    protos = Prototypes(**{name: out[f"1.0-{name}"] for name in names})
    for scale in EXTREME_SCALES:
        assert_same_prototypes_at_scale(Prototypes(**{name: out[f"{scale}-{name}"] for name in names}), protos, scale)


def test_prototypes_save_and_load_every_field(tmp_path):
    data = planted_concepts(n_concepts=5, seed=4)
    protos = extract_prototypes(data["image_embeds"], data["text_embeds"], data["caption_image"], budget=5)
    protos.save(tmp_path / "prototypes.npz")
    loaded = Prototypes.load(tmp_path / "prototypes.npz")
    for item in dataclasses.fields(Prototypes):
        original, back = getattr(protos, item.name), getattr(loaded, item.name)
        if isinstance(original, np.ndarray):
            np.testing.assert_array_equal(original, back)
            assert original.dtype == back.dtype, item.name
        else:
            assert original == back, item.name
    assert loaded.settings["budget"] == 5 and loaded.n_pairs == protos.n_pairs > 0
