"""The store format: shards written whole or not at all, cheap checks on every open, checksums on demand."""

import io
import json
import pickle

import numpy as np
import pytest

import hf_pds.shards as shards
from hf_pds.shards import (
    StoreArrays,
    finish_store,
    finished_shards,
    open_store,
    shard_spans,
    write_shard,
    write_store,
)


def planted(n_images: int = 7, dim: int = 6, seed: int = 0) -> StoreArrays:
    """``n_images`` images with 1 to 3 captions each, pairs in the order of their images."""
    rng = np.random.default_rng(seed)
    caption_image = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images))
    return StoreArrays(
        image_embeds=rng.normal(size=(n_images, dim)).astype(np.float32),
        text_embeds=rng.normal(size=(len(caption_image), dim + 2)).astype(np.float32),
        caption_image=caption_image,
        rows=np.arange(n_images) * 3 + 1,
    )


def test_a_store_holds_its_arrays_in_shards_of_whole_images(tmp_path):
    arrays = planted()
    store = write_store(tmp_path / "entry", arrays, shard_size=3, key="k")
    assert [path.name for path in tmp_path.iterdir()] == ["entry"]  # built beside, moved into place
    assert [(shard.n_images, shard.n_pairs) for shard in store.shards] == [
        (3, int(np.sum(arrays.caption_image < 3))),
        (3, int(np.sum((arrays.caption_image >= 3) & (arrays.caption_image < 6)))),
        (1, int(np.sum(arrays.caption_image == 6))),
    ]
    assert (store.n_images, store.n_pairs, store.image_dim, store.text_dim) == (7, len(arrays.caption_image), 6, 8)
    again = open_store(tmp_path / "entry", "k").arrays()
    for name in ("image_embeds", "text_embeds", "caption_image", "rows"):
        np.testing.assert_array_equal(getattr(again, name), getattr(arrays, name))
    shard = pickle.loads(pickle.dumps(store)).shards[1].load()  # a store travels between processes
    assert isinstance(shard.text_embeds, np.memmap)
    np.testing.assert_array_equal(shard.image_embeds, arrays.image_embeds[3:6])
    np.testing.assert_array_equal(shard.image_of_pairs() + 3, arrays.caption_image[arrays.caption_image // 3 == 1])
    with pytest.raises(ValueError, match="names another entry"):
        open_store(tmp_path / "entry", "other")


def test_a_float16_store_rounds_the_embeddings_and_halves_them(tmp_path):
    arrays = planted()
    full = write_store(tmp_path / "full", arrays, shard_size=4)
    half = write_store(tmp_path / "half", arrays, shard_size=4, dtype="float16")
    assert half.dtype == "float16" and half.arrays().text_embeds.dtype == np.float16
    np.testing.assert_array_equal(half.arrays().text_embeds, arrays.text_embeds.astype(np.float16))
    np.testing.assert_array_equal(half.arrays().caption_image, arrays.caption_image)
    embeds = "shard-00000/image_embeds.npy"
    sizes = [(tmp_path / name / embeds).stat().st_size for name in ("full", "half")]
    assert sizes[0] - sizes[1] == arrays.image_embeds[:4].nbytes // 2  # headers alike, half the data
    assert full.dtype == "float32"
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, not 'int8'"):
        write_store(tmp_path / "int8", arrays, dtype="int8")


def test_opening_checks_sizes_and_headers_and_verify_checks_the_content(tmp_path):
    write_store(tmp_path / "entry", planted(), shard_size=3)
    embeds = tmp_path / "entry" / "shard-00001" / "text_embeds.npy"
    original = embeds.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    embeds.write_bytes(bytes(damaged))
    store = open_store(tmp_path / "entry")  # the same size and header: opening reads no content
    with pytest.raises(ValueError, match=r"shard-00001/text_embeds\.npy does not match its SHA-256"):
        store.verify()
    embeds.write_bytes(original[:-4])
    with pytest.raises(ValueError, match=r"shard-00001: text_embeds\.npy holds .* bytes, its record says"):
        open_store(tmp_path / "entry")
    count, width = np.load(io.BytesIO(original)).shape
    np.save(embeds, np.zeros((width, count), np.float32))  # as many bytes, another shape: the header tells
    assert embeds.stat().st_size == len(original)
    with pytest.raises(ValueError, match=r"shard-00001: text_embeds\.npy holds <f4"):
        open_store(tmp_path / "entry")
    embeds.unlink()
    with pytest.raises(ValueError, match=r"shard-00001: text_embeds\.npy is missing"):
        open_store(tmp_path / "entry")
    (tmp_path / "entry" / "manifest.json").write_text(json.dumps({"key": "k", "sha256": {}}))  # format 1
    with pytest.raises(ValueError, match=r"is not a store of format 2"):
        open_store(tmp_path / "entry")
    (tmp_path / "entry" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"has no manifest\.json: it is not a finished store"):
        open_store(tmp_path / "entry")


def test_a_shard_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    arrays = planted(4)
    staging = tmp_path / "entry.partial"
    pairs = arrays.caption_image < 2
    write_shard(staging, 0, arrays.image_embeds[:2], arrays.text_embeds[pairs], arrays.caption_image[pairs], [0, 1])
    save = shards._save_npy

    def dies_on_text(path, array):  # killed in the middle of the shard
        if path.name == "text_embeds.npy":
            raise KeyboardInterrupt
        return save(path, array)

    monkeypatch.setattr(shards, "_save_npy", dies_on_text)
    with pytest.raises(KeyboardInterrupt):
        write_shard(
            staging, 1, arrays.image_embeds[2:], arrays.text_embeds[~pairs], arrays.caption_image[~pairs] - 2, [2, 3]
        )
    monkeypatch.undo()
    assert sorted(path.name for path in staging.iterdir()) == ["shard-00000"]
    assert list(finished_shards(staging)) == [0]
    with pytest.raises(ValueError, match=r"lacks shard\(s\) \[1\] of 2"):
        finish_store(staging, tmp_path / "entry", 2, dtype="float32", shard_size=2)
    (staging / "shard-00000" / "rows.npy").write_bytes(b"")  # a shard damaged on disk is not finished
    assert finished_shards(staging) == {}
    with pytest.raises(ValueError, match=r"Shard 3: caption_image must point at its 2 images"):
        write_shard(staging, 3, arrays.image_embeds[:2], arrays.text_embeds[:1], [2], [0, 1])


def test_shards_are_runs_of_images_with_all_their_pairs():
    assert shard_spans(np.array([0, 0, 1, 2, 2, 2, 3]), 4, 2) == [(0, 2, 0, 3), (2, 4, 3, 7)]
    assert shard_spans(np.array([0, 1, 1]), 2, 5) == [(0, 2, 0, 3)]
    with pytest.raises(ValueError, match=r"caption_image must be non-decreasing .* pair 2 is not"):
        shard_spans(np.array([0, 1, 0]), 2, 1)
    with pytest.raises(ValueError, match="shard_size must be at least 1 image, not 0"):
        shard_spans(np.array([0]), 1, 0)
