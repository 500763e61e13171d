import logging

import datasets
import numpy as np
import PIL.Image
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


def test_collect_captions_flattens_lists_and_strings():
    with_lists = collect_captions(mixed_dataset(4))
    assert with_lists.captions[:2] == ["a dog in picture 0", "picture 0 shows a dog"]
    assert with_lists.caption_image.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert with_lists.rows.tolist() == [0, 1, 2, 3]
    single = datasets.Dataset.from_dict(
        {"img": [PIL.Image.new("RGB", (4, 4))] * 3, "text": ["a", "b", "c"]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}),
    )
    table = collect_captions(single, "img", "text")
    assert table.captions == ["a", "b", "c"] and table.caption_image.tolist() == [0, 1, 2]


def with_cell(dataset, column, row, value):
    columns = {name: list(dataset[name]) for name in dataset.column_names}
    columns[column][row] = value
    return datasets.Dataset.from_dict(columns, features=dataset.features)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("caption", None, "Row 3: column 'caption' is None"),
        ("caption", [], "Row 3: column 'caption' is an empty list"),
        ("caption", ["ok", "  "], "Row 3: column 'caption' has an empty caption at position 1"),
        ("image", None, "Row 3: column 'image' has no image"),
    ],
)
def test_bad_rows_are_named(column, value, message):
    dataset = with_cell(mixed_dataset(6), column, 3, value)
    with pytest.raises(ValueError, match=message):
        collect_captions(dataset)


def test_bad_rows_can_be_skipped_with_a_warning(caplog):
    dataset = with_cell(with_cell(mixed_dataset(6), "caption", 1, None), "image", 4, None)
    with caplog.at_level(logging.WARNING, logger="hf_pds.embedding"):
        table = collect_captions(dataset, skip_invalid_rows=True)
    assert table.rows.tolist() == [0, 2, 3, 5]
    assert table.skipped_rows == [1, 4]
    assert "Skipping 2 of 6 rows" in caplog.text


def test_missing_columns_are_named():
    with pytest.raises(
        ValueError,
        match=r"caption_column='text' is not a column of the dataset; its columns are \['image', 'caption'\]",
    ):
        collect_captions(mixed_dataset(2), caption_column="text")


def test_string_captions_of_wrong_type_are_refused():
    dataset = datasets.Dataset.from_dict({"image": [PIL.Image.new("RGB", (4, 4))], "caption": [3]})
    with pytest.raises(ValueError, match="Row 0: column 'caption' is a int, expected a string or a list of strings"):
        collect_captions(dataset)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "F"])
def test_to_rgb_handles_every_mode(mode):
    image = (
        PIL.Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode)
        if mode != "I;16"
        else PIL.Image.new("I;16", (5, 3), 65535)
    )
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (5, 3)


def test_transparent_pixels_become_white_and_16_bit_white_stays_white():
    transparent = PIL.Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(PIL.Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(PIL.Image.new("I;16", (2, 2), 32896)).getpixel((0, 0)) == (128, 128, 128)


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
