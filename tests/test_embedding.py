import numpy as np
import pytest
import torch

from helpers import mixed_dataset
from hf_pds.embedding import ClipTowers, embed_pairs
from hf_pds.pairs import read_pairs as collect_captions
from hf_pds.pairs import to_rgb
from hf_pds.testing import tiny_pds_components


@pytest.fixture(scope="module")
def components():
    return tiny_pds_components(seed=0)


def embed(components, dataset, **kwargs):
    towers = ClipTowers(
        components["image_encoder"],
        components["feature_extractor"],
        components["clip_text_encoder"],
        components["clip_tokenizer"],
    )
    return embed_pairs(dataset, collect_captions(dataset), "image", towers, "cpu", progress=False, **kwargs)


def test_each_image_is_embedded_once_and_embeddings_are_raw(components):
    dataset = mixed_dataset(7)
    table = collect_captions(dataset)
    seen = []
    hook = components["image_encoder"].register_forward_hook(lambda module, args, kwargs: seen.append(len(args[0])))
    try:
        embeddings = embed(components, dataset, batch_size=3)
    finally:
        hook.remove()
    assert seen == [3, 3, 1]  # 7 images in batches of 3, however many captions each has
    assert embeddings.image_embeds.shape == (7, 32) and embeddings.image_embeds.dtype == np.float32
    assert embeddings.text_embeds.shape == (len(table.captions), 32) and embeddings.text_embeds.dtype == np.float32
    assert not np.allclose(np.linalg.norm(embeddings.text_embeds, axis=1), 1.0)
    # The raw projected embedding of one image, computed directly.
    pixels = components["feature_extractor"](images=[to_rgb(dataset[2]["image"])], return_tensors="pt").pixel_values
    with torch.no_grad():
        direct = components["image_encoder"](pixels).image_embeds[0].numpy()
    np.testing.assert_allclose(embeddings.image_embeds[2], direct, rtol=1e-5, atol=1e-6)
    # A caption's embedding does not depend on its batch.
    alone = embed(components, dataset.select([1]))
    np.testing.assert_array_equal(alone.text_embeds, embeddings.text_embeds[table.caption_image == 1])


def test_decoding_threads_give_the_same_embeddings_and_name_a_bad_row(components):
    import datasets

    dataset = mixed_dataset(9)
    one = embed(components, dataset, batch_size=2, workers=1)
    three = embed(components, dataset, batch_size=2, workers=3)
    np.testing.assert_array_equal(one.image_embeds, three.image_embeds)
    cells = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    cells[6] = {"bytes": b"GIF89a but nothing else", "path": None}
    broken = datasets.Dataset.from_dict(
        {"image": cells, "caption": list(dataset["caption"])}, features=dataset.features
    )
    table = collect_captions(broken, check_images=False)  # what the cheap check would let through
    towers = ClipTowers(
        components["image_encoder"],
        components["feature_extractor"],
        components["clip_text_encoder"],
        components["clip_tokenizer"],
    )
    with pytest.raises(ValueError, match="Row 6: column 'image' holds data that is not a readable image"):
        embed_pairs(broken, table, "image", towers, "cpu", batch_size=2, progress=False, workers=3)
