"""The prototype stage in passes over shards (``extract_prototypes_sharded``) against the in-memory one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_pds.distributed import SINGLE_PROCESS
from hf_pds.prototypes import (
    _kept_pairs,
    _Layout,
    _sortable,
    extract_prototypes,
    extract_prototypes_sharded,
    prune_pairs,
)
from hf_pds.shards import PairShard, ShardRef

DIM = 16


def planted(n_images=240, captions_per_image=3, n_concepts=12, seed=0, wrong=0.1, text_dim=DIM):
    """Images of ``n_concepts`` separated concepts and their captions, grouped by image (as shards hold them);
    a fraction ``wrong`` of captions describe another concept (low cosine: what pruning drops)."""
    rng = np.random.default_rng(seed)
    image_centres = rng.normal(size=(n_concepts, DIM)) * 4
    text_centres = image_centres + rng.normal(size=(n_concepts, DIM))
    if text_dim != DIM:
        text_centres = rng.normal(size=(n_concepts, text_dim)) * 4
    concept = rng.integers(0, n_concepts, n_images)
    caption_image = np.repeat(np.arange(n_images), captions_per_image)
    caption_concept = concept[caption_image].copy()
    mislabeled = rng.random(len(caption_image)) < wrong
    caption_concept[mislabeled] = rng.integers(0, n_concepts, int(mislabeled.sum()))
    return {
        "image_embeds": (image_centres[concept] + rng.normal(size=(n_images, DIM))).astype(np.float32),
        "text_embeds": (text_centres[caption_concept] + rng.normal(size=(len(caption_image), text_dim))).astype(
            np.float32
        ),
        "caption_image": caption_image,
    }


def cut(data, image_counts, folder=None, dtype=None):
    """``ShardRef``s of runs of ``image_counts`` images with their captions: in memory, or as ``.npy`` files in
    ``folder`` read memory-mapped (``dtype``: stored so, e.g. float16)."""
    images, texts, caption_image = data["image_embeds"], data["text_embeds"], data["caption_image"]
    assert sum(image_counts) == len(images)
    refs, first = [], 0
    for index, count in enumerate(image_counts):
        start, stop = np.searchsorted(caption_image, [first, first + count])
        arrays = {
            "image_embeds": images[first : first + count],
            "text_embeds": texts[start:stop],
            "caption_image": caption_image[start:stop] - first,
        }
        if dtype is not None:
            arrays = {name: value.astype(dtype) if value.dtype.kind == "f" else value for name, value in arrays.items()}
        if folder is None:
            load = lambda arrays=arrays: PairShard(**arrays)  # noqa: E731
        else:
            for name, value in arrays.items():
                np.save(folder / f"{index}-{name}.npy", value)

            def load(index=index, names=tuple(arrays)):
                return PairShard(**{name: np.load(folder / f"{index}-{name}.npy", mmap_mode="r") for name in names})

        refs.append(ShardRef(index, count, int(stop - start), f"part-{index}", load))
        first += count
    return refs


def assert_same(one, other, rtol=0.0):
    for name in ("caption_index", "image_cluster", "text_cluster", "support"):
        np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)
    for name in ("image_prototypes", "text_prototypes", "similarity"):
        np.testing.assert_allclose(getattr(one, name), getattr(other, name), rtol=rtol, atol=0, err_msg=name)
    assert (one.n_pairs, one.n_pruned, one.settings) == (other.n_pairs, other.n_pruned, other.settings)


@pytest.mark.parametrize("normalize", [False, True])
def test_sharded_matches_the_in_memory_faiss_path_when_the_sample_holds_every_pair(normalize):
    data = planted()
    memory = extract_prototypes(**data, budget=12, kmeans_backend="faiss", normalize=normalize)
    sharded = extract_prototypes_sharded(
        cut(data, [50, 100, 30, 60]), budget=12, kmeans_backend="faiss", normalize=normalize
    )
    assert sharded.settings == {**memory.settings, "engine": "sharded", "sample_size": 576}
    assert (sharded.n_pairs, sharded.n_pruned) == (memory.n_pairs, memory.n_pruned) == (720, 144)
    assert abs(int(sharded.support.sum()) - int(memory.support.sum())) <= 0.02 * memory.support.sum()
    # The same points reach k-means: the caption of each prototype is the in-memory one.
    np.testing.assert_array_equal(np.sort(sharded.caption_index), np.sort(memory.caption_index))


def test_memory_mapped_float32_shards_and_any_cut_give_the_same_prototypes(tmp_path):
    data = planted()
    reference = extract_prototypes_sharded(cut(data, [240]), budget=10, sample_per_centre=20)
    assert reference.settings["sample_size"] == 200  # a sample of the 576 kept pairs, drawn by global kept rank
    assert_same(
        extract_prototypes_sharded(cut(data, [7, 113, 1, 119], tmp_path), budget=10, sample_per_centre=20), reference
    )
    assert_same(extract_prototypes_sharded(cut(data, [100, 140])[::-1], budget=10, sample_per_centre=20), reference)


def test_float16_shards_are_read_in_float32_blocks(tmp_path):
    data = planted()
    half = {name: value.astype(np.float16) if value.dtype == np.float32 else value for name, value in data.items()}
    memory = extract_prototypes(**half, budget=12, kmeans_backend="faiss")
    sharded = extract_prototypes_sharded(
        cut(data, [120, 120], tmp_path, dtype=np.float16), budget=12, kmeans_backend="faiss"
    )
    assert abs(int(sharded.support.sum()) - int(memory.support.sum())) <= 0.02 * memory.support.sum()
    np.testing.assert_array_equal(np.sort(sharded.caption_index), np.sort(memory.caption_index))


def test_a_sample_still_finds_the_planted_concepts():
    data = planted(n_images=600, n_concepts=10, seed=3)
    memory = extract_prototypes(**data, budget=10, kmeans_backend="faiss")
    sampled = extract_prototypes_sharded(cut(data, [200, 200, 200]), budget=10, sample_per_centre=8)
    assert sampled.settings["sample_size"] == 80
    assert abs(int(sampled.support.sum()) - int(memory.support.sum())) <= 0.02 * memory.support.sum()


@pytest.mark.parametrize("prune_ratio", [0.0, 0.1, 0.37, 0.5, 0.99])
def test_the_threshold_keeps_exactly_the_pairs_prune_pairs_keeps_ties_included(prune_ratio):
    rng = np.random.default_rng(1)
    cosine = rng.choice(np.float32([-0.5, -0.0, 0.0, 0.25, 0.25, 0.7]), size=500)  # many ties, and -0.0 = 0.0
    sizes = [1, 120, 0, 200, 179]
    refs = [ShardRef(index, size, size, f"part-{index}", None) for index, size in enumerate(sizes)]
    layout = _Layout.of(refs[::-1], SINGLE_PROCESS)  # given in any order, read in index order
    kept = _kept_pairs(_sortable(cosine), layout, int(len(cosine) * prune_ratio), SINGLE_PROCESS)
    np.testing.assert_array_equal(np.flatnonzero(kept), prune_pairs(cosine, prune_ratio))


def test_sortable_keys_keep_the_order_of_cosines():
    cosine = np.float32([-1.0, -0.3, -1e-30, -0.0, 0.0, 1e-38, 0.2, 1.0, -np.finfo(np.float32).tiny])
    keys = _sortable(cosine)
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.argsort(cosine, kind="stable"))
    assert keys[3] == keys[4]


def test_pairs_tied_at_the_threshold_are_pruned_by_global_position():
    data = planted(n_images=120, captions_per_image=2, seed=5)
    data["text_embeds"][1::2] = data["text_embeds"][0::2]  # the two captions of an image: one caption, twice
    data["image_embeds"][60:] = data["image_embeds"][:60]  # and each image twice: every cosine four times
    memory = extract_prototypes(**data, budget=8, prune_ratio=0.3, kmeans_backend="faiss")
    sharded = extract_prototypes_sharded(cut(data, [61, 20, 39]), budget=8, prune_ratio=0.3, kmeans_backend="faiss")
    assert sharded.n_pruned == memory.n_pruned == 72
    np.testing.assert_array_equal(sharded.support, memory.support)
    np.testing.assert_array_equal(sharded.caption_index, memory.caption_index)
    np.testing.assert_allclose(sharded.image_prototypes, memory.image_prototypes, rtol=1e-6)


def test_encoders_of_two_widths_sort_by_support():
    data = planted(text_dim=24)
    memory = extract_prototypes(**data, budget=12, prune_ratio=0.0, kmeans_backend="faiss")
    sharded = extract_prototypes_sharded(cut(data, [100, 140]), budget=12, prune_ratio=0.0)
    assert len(sharded.similarity) == 0 and (np.diff(sharded.support) <= 0).all()
    assert sharded.text_prototypes.shape == (12, 24)
    assert abs(int(sharded.support.sum()) - int(memory.support.sum())) <= 0.02 * memory.support.sum()
    with pytest.raises(ValueError, match="widths 16 and 24: pruning compares images with captions"):
        extract_prototypes_sharded(cut(data, [100, 140]), budget=12, prune_ratio=0.2)


@pytest.mark.parametrize("modality", ["image_embeds", "text_embeds"])
def test_a_nan_row_is_named_by_shard_and_row(modality):
    data = planted()
    data[modality] = data[modality].copy()
    row, first_row = (77, 50) if modality == "image_embeds" else (3 * 77 + 1, 150)  # part-1 starts at image 50
    data[modality][row, 5] = np.nan
    message = rf"{modality} of shard 'part-1' has NaN or inf values in 1 row\(s\), first rows: \[{row - first_row}\]"
    with pytest.raises(ValueError, match=message):
        extract_prototypes_sharded(cut(data, [50, 100, 90]), budget=5)


def test_bad_shards_are_refused_by_name():
    data = planted()
    refs = cut(data, [100, 140])
    narrow = ShardRef(
        1,
        140,
        420,
        "narrow",
        lambda: PairShard(data["image_embeds"][100:, :8], data["text_embeds"][300:], data["caption_image"][300:] - 100),
    )
    with pytest.raises(ValueError, match="shard 'narrow' has 8-d image and 16-d text embeddings, shard 'part-0' 16-d"):
        extract_prototypes_sharded([refs[0], narrow], budget=5)
    shifted = ShardRef(
        1,
        140,
        420,
        "shifted",
        lambda: PairShard(data["image_embeds"][100:], data["text_embeds"][300:], data["caption_image"][300:]),
    )
    with pytest.raises(
        ValueError,
        match=r"caption_image\[120\] of shard 'shifted' is 140, not a row of its image_embeds \(valid: 0..139\); 300 ",
    ):
        extract_prototypes_sharded([refs[0], shifted], budget=5)
    with pytest.raises(
        ValueError, match="shard 'part-1' holds 140 images and 420 pairs, its reference says 140 and 400"
    ):
        extract_prototypes_sharded([refs[0], ShardRef(1, 140, 400, "part-1", refs[1].load)], budget=5)
    with pytest.raises(ValueError, match="shard indices repeat"):
        extract_prototypes_sharded([refs[0], refs[0]], budget=5)
    with pytest.raises(ValueError, match="budget=800 is larger than the 576 pairs left after pruning"):
        extract_prototypes_sharded(refs, budget=800)
    with pytest.raises(ValueError, match="budget=300 is larger than the 240 distinct images"):
        extract_prototypes_sharded(refs, budget=300)
    with pytest.raises(ValueError, match="sample_per_centre must be a positive integer, got 0"):
        extract_prototypes_sharded(refs, budget=5, sample_per_centre=0)


TWO_PROCESSES = """
import sys
import numpy as np
import torch.distributed
from hf_pds.distributed import process_share, process_state
from hf_pds.prototypes import extract_prototypes_sharded
sys.path.insert(0, {tests!r})
from test_prototypes_sharded import cut, planted

state = process_state()
refs = cut(planted(n_images=300, seed=7), [40, 70, 10, 90, 50, 40])
results = {{}}
for name, mine, options in (
    ("sampled", [refs[i] for i in process_share(len(refs), state)], {{"sample_per_centre": 30}}),
    ("interleaved", refs[state.process_index :: state.num_processes], {{"normalize": True}}),
):
    protos = extract_prototypes_sharded(mine, budget=12, state=state, **options)
    for field in ("caption_index", "image_cluster", "text_cluster", "support", "image_prototypes",
                  "text_prototypes", "similarity"):
        results[name + "-" + field] = getattr(protos, field)
    results[name + "-n_pruned"] = protos.n_pruned
if state.is_main_process:
    np.savez(sys.argv[1], **results)
torch.distributed.destroy_process_group()
"""


def test_two_processes_give_the_prototypes_of_one(tmp_path):
    refs = cut(planted(n_images=300, seed=7), [40, 70, 10, 90, 50, 40])
    one = {
        "sampled": extract_prototypes_sharded(refs, budget=12, sample_per_centre=30),
        "interleaved": extract_prototypes_sharded(refs, budget=12, normalize=True),
    }
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES.format(tests=str(Path(__file__).parent)))
    temporary = tmp_path / "torchrun-tmp"  # torchrun leaves its log folders in the temporary directory
    temporary.mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*command, str(script), str(tmp_path / "two.npz")], capture_output=True, text=True, timeout=300, env=environment
    )
    assert run.returncode == 0, run.stdout + run.stderr
    two = np.load(tmp_path / "two.npz")
    for name, protos in one.items():
        assert int(two[f"{name}-n_pruned"]) == protos.n_pruned
        for field in ("caption_index", "image_cluster", "text_cluster", "support"):
            np.testing.assert_array_equal(two[f"{name}-{field}"], getattr(protos, field), err_msg=f"{name} {field}")
        for field in ("image_prototypes", "text_prototypes", "similarity"):
            np.testing.assert_allclose(
                two[f"{name}-{field}"], getattr(protos, field), rtol=1e-6, err_msg=f"{name} {field}"
            )
