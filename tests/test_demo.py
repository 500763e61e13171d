"""The digits demo's recipe: real frozen encoders from PyPI packages and the nearest real image to each image
prototype give one row per digit, each image a real scan of its caption's digit."""

from types import SimpleNamespace

import numpy as np
import pytest

from hf_pds import extract_prototypes
from hf_pds.evaluation.coreset import nearest_distinct_rows
from hf_pds.testing import DIGITS_DEMO_SETTINGS, digits_dataset, digits_demo_encoders


@pytest.fixture(scope="module")
def demo():
    """The demo's dataset and its features, as a user computes them."""
    dataset = digits_dataset()
    encoders = digits_demo_encoders()
    captions = [caption for captions in dataset["caption"] for caption in captions]
    return SimpleNamespace(
        labels=np.asarray(dataset["label"]),
        captions=captions,
        image_embeds=encoders.encode_images(dataset["image"]),
        text_embeds=encoders.encode_texts(captions),
        caption_image=np.repeat(np.arange(dataset.num_rows), [len(row) for row in dataset["caption"]]),
    )


def test_the_encoders_return_raw_float32_features_one_row_per_input(demo):
    assert demo.image_embeds.shape == (len(demo.labels), 1280) and demo.image_embeds.dtype == np.float32
    assert demo.text_embeds.shape == (len(demo.captions), 384) and demo.text_embeds.dtype == np.float32
    # Repeated captions get the same features; different captions get different ones.
    first = {caption: row for row, caption in enumerate(demo.captions)}
    assert np.allclose(demo.text_embeds, demo.text_embeds[[first[caption] for caption in demo.captions]])
    assert len(np.unique(demo.text_embeds.round(5), axis=0)) == len(first) == 30


def test_the_demo_gives_one_real_image_of_each_digit_with_its_caption(demo):
    prototypes = extract_prototypes(demo.image_embeds, demo.text_embeds, demo.caption_image, **DIGITS_DEMO_SETTINGS)
    assert len(prototypes) == DIGITS_DEMO_SETTINGS["budget"] == 10

    # The caption retrieved for each text prototype names one digit: the label of the image it was written for.
    caption_digits = demo.labels[demo.caption_image[prototypes.caption_index]]
    assert sorted(caption_digits.tolist()) == list(range(10))
    # The select decoder's image: the real scan nearest each image prototype, a scan of its caption's digit.
    rows = nearest_distinct_rows(prototypes.image_prototypes, demo.image_embeds)
    assert demo.labels[rows].tolist() == caption_digits.tolist()
    # Two spaces, no image-text cosine: the prototypes are sorted by support, and every one stands for real pairs.
    assert prototypes.similarity.size == 0
    assert np.all(np.diff(prototypes.support) <= 0) and prototypes.support.min() > 0


def test_an_unknown_efficientnet_feature_is_refused_by_name():
    from hf_pds.evaluation.encoders import EfficientNetLite0

    with pytest.raises(ValueError, match=r"feature must be one of \['logits', 'pooled'\], got 'penultimate'"):
        EfficientNetLite0(feature="penultimate")
