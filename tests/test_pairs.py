"""The pair structure: columns, captions, image checks before any model runs, and the one image conversion."""

import io
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest

from helpers import mixed_dataset, repaint, write_image_files
from hf_pds.pairs import image_problem, read_pairs, to_rgb
from hf_pds.pairs import read_pairs as collect_captions


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


def encoded(image: PIL.Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


RED = PIL.Image.new("RGB", (24, 16), (200, 30, 30))


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ({"bytes": b"not an image at all", "path": None}, "holds data that is not a readable image"),
        ({"bytes": encoded(RED, "JPEG")[:-200], "path": None}, "holds a truncated image file"),
        ({"bytes": encoded(RED, "PNG")[:-30], "path": None}, "holds a truncated image file"),
        ({"bytes": encoded(RED, "PNG")[:-5], "path": None}, "not a readable image: broken PNG file"),
        ({"bytes": encoded(RED, "WEBP")[:-20], "path": None}, "holds data that is not a readable image"),
        ({"bytes": None, "path": "/nonexistent/x.png"}, "points to /nonexistent/x.png, which does not exist"),
        ({"bytes": None, "path": None}, "has no image"),
        (None, "has no image"),
        (3, "holds a int, expected an image, a path or encoded bytes"),
    ],
)
def test_an_undecodable_image_is_named_with_its_reason(cell, problem):
    assert problem in image_problem(cell)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_readable_image_has_no_problem(image_format, tmp_path):
    data = encoded(RED, image_format)
    assert image_problem({"bytes": data, "path": None}) is None
    (tmp_path / f"red.{image_format.lower()}").write_bytes(data)
    assert image_problem(str(tmp_path / f"red.{image_format.lower()}")) is None
    assert image_problem(RED) is None


def with_image_cell(dataset, row, cell):
    cells = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    cells[row] = cell
    columns = {"image": cells, "caption": list(dataset["caption"])}
    return datasets.Dataset.from_dict(columns, features=dataset.features)


def test_read_pairs_names_the_row_column_and_reason_of_an_undecodable_image():
    broken = with_image_cell(mixed_dataset(6), 4, {"bytes": encoded(RED, "JPEG")[:-200], "path": None})
    with pytest.raises(ValueError, match=r"Row 4: column 'image' holds a truncated image file\. 1 row\(s\) of 6"):
        read_pairs(broken)


def test_skipping_an_undecodable_image_warns_with_the_reason(caplog):
    broken = with_image_cell(mixed_dataset(6), 2, {"bytes": b"garbage", "path": None})
    with caplog.at_level(logging.WARNING):
        table = read_pairs(broken, skip_invalid_rows=True)
    assert table.rows.tolist() == [0, 1, 3, 4, 5] and table.skipped_rows == [2]
    assert "Skipping 1 of 6 rows" in caplog.text and "row 2, column 'image' holds data that is not" in caplog.text


def test_an_image_column_of_the_wrong_type_is_refused():
    numbers = datasets.Dataset.from_dict({"image": [1, 2, 3], "caption": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"image_column='image' holds int64 values; expected images"):
        read_pairs(numbers)


def test_paths_and_bytes_columns_are_images(tmp_path):
    RED.save(tmp_path / "red.png")
    paths = datasets.Dataset.from_dict({"image": [str(tmp_path / "red.png")] * 2, "caption": ["a", "b"]})
    assert read_pairs(paths).rows.tolist() == [0, 1]
    missing = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "red.png"), str(tmp_path / "gone.png")], "caption": ["a", "b"]}
    )
    with pytest.raises(ValueError, match=r"Row 1: column 'image' points to .*gone\.png, which does not exist"):
        read_pairs(missing)


def test_the_pairs_of_image_paths_carry_a_digest_of_the_files_content(tmp_path):
    table = write_image_files(tmp_path / "images", n_images=3)
    source = datasets.load_dataset("csv", data_files=str(table), split="train")
    before = read_pairs(source).image_files
    assert before is not None and read_pairs(source).image_files == before
    repaint(tmp_path / "images" / "1.png")  # same path, size and modification time; other pixels
    assert read_pairs(source, check_images=False).image_files not in (None, before)
    assert read_pairs(mixed_dataset(3)).image_files is None  # the bytes are in the table: its fingerprint covers them


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 4), 30000, dtype=np.uint16), 116),  # 16-bit: 0..65535 onto 0..255
        (np.full((4, 4), 30000, dtype=np.int32), 116),  # 32-bit holding 16-bit values
        (np.full((4, 4), 200, dtype=np.int32), 200),  # 32-bit holding 8-bit values
        (np.full((4, 4), 0.5, dtype=np.float32), 127),  # float in [0, 1]
        (np.full((4, 4), np.nan, dtype=np.float32), 0),
    ],
)
def test_high_bit_depth_and_float_images_keep_their_grey_level(array, expected):
    assert to_rgb(PIL.Image.fromarray(array)).getpixel((0, 0)) == (expected,) * 3


def test_a_distilled_image_and_an_evaluated_image_of_the_same_source_agree():
    """The pixels CLIP sees when distilling and those the student's backbone sees when evaluating, from the same
    16-bit, 32-bit and float cells, are the same."""
    import torch

    from hf_pds.embedding import _pixel_batches
    from hf_pds.evaluation.encoders import _resized_batch

    side = 8
    sources = [
        np.full((side, side), 30000, dtype=np.uint16),
        np.full((side, side), 30000, dtype=np.int32),
        np.linspace(0, 1, side * side, dtype=np.float32).reshape(side, side),
    ]
    cells = [{"bytes": encoded(PIL.Image.fromarray(array), "TIFF"), "path": None} for array in sources]
    dataset = datasets.Dataset.from_dict(
        {"image": cells, "caption": ["a"] * 3},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    distilled = []  # what the CLIP feature extractor is given when distilling

    def pixels(images):
        distilled.extend(images)
        return torch.zeros(len(images))

    list(_pixel_batches(dataset, "image", [[0, 1, 2]], SimpleNamespace(pixels=pixels), 1))
    evaluated = _resized_batch(list(dataset.cast_column("image", datasets.Image(decode=False))["image"]), side)
    for image, pixels in zip(distilled, evaluated, strict=True):
        np.testing.assert_array_equal(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0, pixels)
    assert [image.getpixel((0, 0))[0] for image in distilled[:2]] == [116, 116]
    assert distilled[2].getpixel((side - 1, side - 1))[0] == 255
