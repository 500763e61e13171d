"""The dataset card of a distilled set: YAML for the Hub, provenance, settings, preview and statistics."""

import datasets
import numpy as np
import PIL.Image
import pytest
from huggingface_hub import DatasetCard

import hf_pds
from hf_pds.card import card_license, preview_grid


def test_card_yaml_has_what_the_hub_needs(saved, distilled):
    card = DatasetCard.load(saved / "README.md")
    data = card.data.to_dict()
    assert data["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    assert {"dataset-distillation", "synthetic", "pds"} <= set(data["tags"])
    assert data["task_categories"] == ["image-to-text", "text-to-image"]
    assert data["source_datasets"] and data["size_categories"] == ["n<1K"]
    assert data["license"] == "other" and data["pretty_name"]
    body = card.text
    # Provenance and every hyper-parameter of the run.
    assert distilled.provenance["source_fingerprint"] in body
    assert "hf_pds.testing.tiny_pds_pipeline(seed=0)" in body and "tiny random CLIP" in body
    assert f"hf-pds version | {hf_pds.__version__}" in body
    for key, value in distilled.settings.items():
        assert f"| `{key}` | `{value}` |" in body
    assert "source images / captions (pairs) | 12 / 30" in body
    assert "@inproceedings{choi2026pds" in body and "## Limitations" in body and "## Evaluate it" in body
    assert "license is unknown" in body  # the note that goes with "other"
    assert "![The first 5 pairs" in body and "(stats.png)" in body


def test_preview_shows_the_first_images_above_their_captions(saved, distilled):
    preview = PIL.Image.open(saved / "preview.png").convert("RGB")
    assert preview.size == (4 * 192, 2 * (192 + 58))  # 5 pairs: two rows of four cells
    first = distilled.dataset[0]["image"].convert("RGB").resize((184, 184), PIL.Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(preview.crop((4, 4, 188, 188))), np.asarray(first))
    caption_band = np.asarray(preview.crop((0, 192, 192, 250)).convert("L"))
    assert (caption_band < 100).sum() > 50  # text was drawn under the image
    empty_cell = np.asarray(preview.crop((2 * 192, 250, 3 * 192, 500)).convert("L"))
    assert (empty_cell == 255).all()  # cells past the last pair stay blank
    stats = PIL.Image.open(saved / "stats.png")
    assert stats.format == "PNG" and stats.size[0] > stats.size[1]


def test_preview_takes_at_most_sixteen_pairs():
    rows = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(20)], "caption": ["x"] * 20}
    )
    assert preview_grid(rows).size == (4 * 192, 4 * (192 + 58))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("CC-BY-4.0", ("cc-by-4.0", None)),
        ("Flickr terms of use", ("other", "Flickr terms of use")),
        (None, ("other", "unknown")),
    ],
)
def test_license_is_inherited_when_it_is_an_identifier(source, expected):
    license_id, note = card_license(source)
    assert license_id == expected[0]
    assert (note is None) if expected[1] is None else (expected[1] in note)


def test_the_card_shows_how_faithful_the_images_are(saved, distilled):
    card = (saved / "README.md").read_text()
    fidelity = np.asarray(distilled.dataset["fidelity"], dtype=np.float64)
    mean, p5 = round(float(fidelity.mean()), 3), round(float(np.percentile(fidelity, 5)), 3)
    assert f"| fidelity (image vs its image prototype) | {mean} | {p5} |" in card
    lowest = int(np.argmin(fidelity))
    assert f"| {lowest} | {round(float(fidelity[lowest]), 3)} | {distilled.dataset[lowest]['caption']} |" in card
    assert "`fidelity` | float | cosine of the image's CLIP embedding and its image prototype" in card
    plot = PIL.Image.open(saved / "fidelity.png")
    assert plot.format == "PNG" and plot.size[0] > plot.size[1]
