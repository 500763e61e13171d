import logging

import numpy as np
import pytest
import torch

from helpers import mixed_dataset
from hf_pds.cache import EmbeddingCache
from hf_pds.embedding import ClipTowers, embed
from hf_pds.pairs import read_pairs as collect_captions
from hf_pds.pairs import to_rgb
from hf_pds.shards import finished_shards
from hf_pds.testing import tiny_pds_components


@pytest.fixture(scope="module")
def components():
    return tiny_pds_components(seed=0)


@pytest.fixture(scope="module")
def towers(components):
    return ClipTowers(
        components["image_encoder"],
        components["feature_extractor"],
        components["clip_text_encoder"],
        components["clip_tokenizer"],
    )


def embedded(towers, dataset, table=None, **kwargs):
    """The embeddings of ``dataset`` (without a cache unless given), in memory; the temporary shards removed."""
    table = collect_captions(dataset) if table is None else table
    with embed(dataset, table, "image", "caption", towers, "cpu", progress=False, **kwargs) as embeddings:
        return embeddings.store.arrays()


def count_calls(module) -> tuple[list[int], object]:
    """The batch size of each forward pass of ``module``, and the hook to remove."""
    seen = []
    return seen, module.register_forward_hook(lambda module, args, output: seen.append(len(output[0])))


def test_each_image_is_embedded_once_and_embeddings_are_raw(components, towers):
    dataset = mixed_dataset(7)
    table = collect_captions(dataset)
    seen, hook = count_calls(components["image_encoder"])
    try:
        embeddings = embedded(towers, dataset, batch_size=3, shard_size=4)
    finally:
        hook.remove()
    assert seen == [3, 1, 3]  # 7 images in shards of 4, batches of 3 from each shard's start
    assert embeddings.image_embeds.shape == (7, 32) and embeddings.image_embeds.dtype == np.float32
    assert embeddings.text_embeds.shape == (len(table.captions), 32) and embeddings.text_embeds.dtype == np.float32
    np.testing.assert_array_equal(embeddings.caption_image, table.caption_image)
    np.testing.assert_array_equal(embeddings.rows, table.rows)
    assert not np.allclose(np.linalg.norm(embeddings.text_embeds, axis=1), 1.0)
    # The raw projected embedding of one image, computed directly.
    pixels = components["feature_extractor"](images=[to_rgb(dataset[2]["image"])], return_tensors="pt").pixel_values
    with torch.no_grad():
        direct = components["image_encoder"](pixels).image_embeds[0].numpy()
    np.testing.assert_allclose(embeddings.image_embeds[2], direct, rtol=1e-5, atol=1e-6)
    # A caption's embedding does not depend on its batch.
    alone = embedded(towers, dataset.select([1]))
    np.testing.assert_array_equal(alone.text_embeds, embeddings.text_embeds[table.caption_image == 1])


def test_decoding_threads_give_the_same_embeddings_and_name_a_bad_row(towers):
    import datasets

    dataset = mixed_dataset(9)
    one = embedded(towers, dataset, batch_size=2, workers=1)
    three = embedded(towers, dataset, batch_size=2, workers=3)
    np.testing.assert_array_equal(one.image_embeds, three.image_embeds)
    cells = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    cells[6] = {"bytes": b"GIF89a but nothing else", "path": None}
    broken = datasets.Dataset.from_dict(
        {"image": cells, "caption": list(dataset["caption"])}, features=dataset.features
    )
    table = collect_captions(broken, check_images=False)  # what the cheap check would let through
    with pytest.raises(ValueError, match="Row 6: column 'image' holds data that is not a readable image"):
        embedded(towers, broken, table, batch_size=2, workers=3)


def test_a_killed_embedding_resumes_without_embedding_finished_shards_again(components, towers, tmp_path):
    dataset = mixed_dataset(8)
    cache = EmbeddingCache(tmp_path)
    settings = {"batch_size": 2, "shard_size": 2, "cache": cache}  # 4 shards of one batch of images each
    calls, counter = count_calls(components["image_encoder"])

    def killed_in_shard_2(module, args, output):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed while embedding shard 2")

    killer = components["image_encoder"].register_forward_hook(killed_in_shard_2)
    try:
        with pytest.raises(KeyboardInterrupt):
            embedded(towers, dataset, **settings)
    finally:
        killer.remove()
    (staging,) = tmp_path.iterdir()
    assert staging.name.endswith(".partial") and sorted(finished_shards(staging)) == [0, 1]
    captions, text_counter = count_calls(components["clip_text_encoder"])
    try:
        calls.clear()
        resumed = embedded(towers, dataset, **settings)
    finally:
        counter.remove()
        text_counter.remove()
    table = collect_captions(dataset)
    assert calls == [2, 2]  # shards 2 and 3 only
    assert sum(captions) == int(np.sum(table.caption_image >= 4))  # the captions of images 4 to 7 only
    assert [path.name for path in tmp_path.iterdir()] == [staging.name.removesuffix(".partial")]
    whole = embedded(towers, dataset, batch_size=2, shard_size=2)
    for name in ("image_embeds", "text_embeds", "caption_image", "rows"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))


def test_a_truncated_shard_is_found_on_open_and_the_entry_recomputed(components, towers, tmp_path, caplog):
    dataset = mixed_dataset(6)
    settings = {"batch_size": 2, "shard_size": 2, "cache": EmbeddingCache(tmp_path)}
    expected = embedded(towers, dataset, **settings)
    (entry,) = tmp_path.iterdir()
    embeds = entry / "shard-00001" / "text_embeds.npy"
    embeds.write_bytes(embeds.read_bytes()[:-4])
    calls, hook = count_calls(components["image_encoder"])
    try:
        with caplog.at_level(logging.WARNING, logger="hf_pds.cache"):
            again = embedded(towers, dataset, **settings)
        assert "shard-00001: text_embeds.npy holds" in caplog.text and "recomputing" in caplog.text
        assert calls == [2, 2, 2]
        np.testing.assert_array_equal(again.text_embeds, expected.text_embeds)
        calls.clear()
        embedded(towers, dataset, **settings)  # the entry was written again, whole: now it is used
        assert calls == []
    finally:
        hook.remove()


def test_a_float16_store_holds_the_rounded_embeddings(towers, tmp_path):
    dataset = mixed_dataset(5)
    full = embedded(towers, dataset, shard_size=2)
    with embed(
        dataset, collect_captions(dataset), "image", "caption", towers, "cpu", progress=False, dtype="float16",
        shard_size=2, cache=EmbeddingCache(tmp_path),
    ) as half:  # fmt: skip
        assert half.store.dtype == "float16" and half.scratch is None
        np.testing.assert_array_equal(half.text_embeds, full.text_embeds.astype(np.float16))
        np.testing.assert_array_equal(half.image_embeds, full.image_embeds.astype(np.float16))


def test_uncached_shards_live_in_a_temporary_folder_until_closed(towers):
    dataset = mixed_dataset(3)
    with embed(dataset, collect_captions(dataset), "image", "caption", towers, "cpu", progress=False) as embeddings:
        folder = embeddings.store.folder
        assert folder.is_dir() and embeddings.store.n_images == 3
    assert not folder.parent.exists()
