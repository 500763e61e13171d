"""The Karpathy-split dataset scripts (``dataset_scripts/flickr30k.py``, ``coco.py``) on a fabricated miniature
of the BLIP annotation format with tiny images of distinct sizes."""

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from huggingface_hub import DatasetCard

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "dataset_scripts"
KINDS = ("flickr30k", "coco")
FILES = {
    "flickr30k": {"train": "flickr30k_train.json", "validation": "flickr30k_val.json", "test": "flickr30k_test.json"},
    "coco": {
        "train": "coco_karpathy_train.json",
        "validation": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
}
# Image numbers per split; the first Flickr30k and COCO ones are real ids, the rest are made up.
NUMBERS = {"train": [1000092795, 10002456, 25, 9], "validation": [1007129816, 391895], "test": [42, 1007320043]}
# The order in which the train images' first captions appear in the train file.
FIRST_APPEARANCE = [2, 0, 3, 1]


@dataclass
class Source:
    """A fabricated source: annotation and image folders and the rows the scripts should make of them."""

    annotations: Path
    images: Path
    expected: dict  # split -> list of (image_id, captions, (width, height)), in row order
    relpaths: dict  # split -> relative image paths, in NUMBERS order


@pytest.fixture(scope="module")
def scripts():
    """The script modules, imported the way Python runs them: from their own folder."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return {kind: importlib.import_module(kind) for kind in KINDS}
    finally:
        sys.path.remove(str(SCRIPTS))


def relpath(kind: str, split: str, number: int) -> str:
    if kind == "flickr30k":
        return f"flickr30k-images/{number}.jpg"
    folder = "train2014" if split == "train" else "val2014"
    return f"{folder}/COCO_{folder}_{number:012d}.jpg"


def make_source(root: Path, kind: str) -> Source:
    """4 train images with 5 captions each as separate entries (interleaved), 2 val and 2 test images with a list
    of 5 captions each; every image has its own size."""
    annotations, images = root / "annotations", root / "images"
    annotations.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected, relpaths, count = {}, {}, 0
    for split, numbers in NUMBERS.items():
        relpaths[split] = [relpath(kind, split, number) for number in numbers]
        sizes = []
        for path in relpaths[split]:
            size = (9 + 4 * count, 6 + 3 * count)
            count += 1
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            (images / path).parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels).save(images / path)
            sizes.append(size)
        captions = [[f"{split} image {number}, caption {k}" for k in range(5)] for number in numbers]
        order = FIRST_APPEARANCE if split == "train" else range(len(numbers))
        expected[split] = [(str(numbers[i]), captions[i], sizes[i]) for i in order]
        if split == "train":
            # One entry per caption, round by round, each round in another image order.
            entries = []
            for k in range(5):
                for i in FIRST_APPEARANCE[k % 4 :] + FIRST_APPEARANCE[: k % 4]:
                    # BLIP's own train image_id is a string, "coco_<id>" for COCO, or an int: it is not used.
                    own_id = f"coco_{numbers[i]}" if kind == "coco" else (str(numbers[i]) if i % 2 else i)
                    entries.append({"image": relpaths[split][i], "caption": captions[i][k], "image_id": own_id})
        else:
            entries = [{"image": path, "caption": texts} for path, texts in zip(relpaths[split], captions, strict=True)]
        (annotations / FILES[kind][split]).write_text(json.dumps(entries), encoding="utf-8")
    return Source(annotations, images, expected, relpaths)


def load(folder: Path, **kwargs) -> datasets.DatasetDict | datasets.Dataset:
    """``load_dataset`` of a folder with a cache of its own: the datasets cache of a local folder whose card lists
    ``configs`` is keyed by the folder's name and card, not by its files, so same-named folders would collide."""
    return datasets.load_dataset(str(folder), cache_dir=str(folder.parent / f"{folder.name}-cache"), **kwargs)


def arguments(source: Source, output: Path, *extra: str) -> list[str]:
    return ["--annotations", str(source.annotations), "--images", str(source.images), "--output", str(output), *extra]


@pytest.mark.parametrize("kind", KINDS)
def test_builds_a_hub_folder_grouped_per_image(tmp_path, scripts, kind, capsys):
    source = make_source(tmp_path, kind)
    output = tmp_path / "out"
    assert scripts[kind].main(arguments(source, output)) == 0
    assert "train: 4 images, 20 captions" in capsys.readouterr().out

    loaded = load(output)
    assert sorted(loaded) == ["test", "train", "validation"]
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    for split, rows in source.expected.items():
        assert loaded[split]["image_id"] == [image_id for image_id, _, _ in rows]
        assert loaded[split]["caption"] == [captions for _, captions, _ in rows]
        assert [row["image"].size for row in loaded[split]] == [size for _, _, size in rows]
    assert all(len(captions) == 5 for split in ("validation", "test") for captions in loaded[split]["caption"])

    card = DatasetCard.load(output / "README.md")
    data_files = card.data.configs[0]["data_files"]
    assert [entry["split"] for entry in data_files] == ["train", "validation", "test"]
    assert card.data.task_categories == ["image-to-text", "text-to-image"]
    assert card.data.license == ("other" if kind == "flickr30k" else "cc-by-4.0")
    assert "Karpathy" in card.text and "| `train` | 4 | 20 |" in card.text


@pytest.mark.parametrize("kind", KINDS)
def test_missing_image_stops_before_writing(tmp_path, kind):
    """Run as a script from the repository root: exit code 2, one line naming the file, no traceback."""
    source = make_source(tmp_path, kind)
    missing = source.images / source.relpaths["validation"][1]
    missing.unlink()
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, f"dataset_scripts/{kind}.py", *arguments(source, output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: 1 of 8 images are missing")
    assert str(missing) in result.stderr and "--skip-missing" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not output.exists()


def test_missing_images_message_lists_ten_and_counts_the_rest(scripts):
    karpathy = sys.modules["karpathy"]
    paths = [f"img/{index}.jpg" for index in range(13)]
    split = karpathy.Split("train", Path("train.json"), paths, [["a"]] * 13, [str(i) for i in range(13)])
    message = karpathy._missing_message({"train": paths}, {"train": split}, Path("/data"))
    assert message.startswith("13 of 13 images are missing under /data: /data/img/0.jpg, ")
    assert "/data/img/9.jpg, ... (3 more)" in message and "/data/img/10.jpg" not in message


def test_skip_missing_leaves_the_rows_out_with_a_warning(tmp_path, scripts, capsys):
    source = make_source(tmp_path, "flickr30k")
    (source.images / source.relpaths["train"][2]).unlink()  # the first train row
    (source.images / source.relpaths["test"][0]).unlink()
    output = tmp_path / "out"
    assert scripts["flickr30k"].main(arguments(source, output, "--skip-missing")) == 0
    assert "warning: leaving out 2 images missing" in capsys.readouterr().err

    loaded = load(output)
    assert loaded["train"]["image_id"] == [image_id for image_id, _, _ in source.expected["train"][1:]]
    assert loaded["test"]["image_id"] == [source.expected["test"][1][0]]
    assert loaded["validation"].num_rows == 2
    assert "2 images listed in the annotations were missing" in (output / "README.md").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_missing_annotation_file_is_named(tmp_path, scripts, kind, capsys):
    source = make_source(tmp_path, kind)
    absent = source.annotations / FILES[kind]["test"]
    absent.unlink()
    output = tmp_path / "out"
    assert scripts[kind].main(arguments(source, output)) == 2
    assert capsys.readouterr().err == f"error: annotation file not found: {absent}\n"
    assert not output.exists()


def test_malformed_entry_is_named_by_file_and_index(tmp_path, scripts, capsys):
    source = make_source(tmp_path, "coco")
    path = source.annotations / FILES["coco"]["validation"]
    entries = json.loads(path.read_text())
    entries[1]["caption"] = 7
    path.write_text(json.dumps(entries))
    assert scripts["coco"].main(arguments(source, tmp_path / "out")) == 2
    assert f"error: {path}, entry 1: 'caption' must be a string or a non-empty list" in capsys.readouterr().err


def test_existing_output_needs_overwrite_and_push_uploads_the_folder(tmp_path, scripts, monkeypatch, capsys):
    source = make_source(tmp_path, "flickr30k")
    output = tmp_path / "out"
    output.mkdir()
    assert scripts["flickr30k"].main(arguments(source, output)) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr("hf_pds.hub.push_folder", lambda *args, **kwargs: calls.append((args, kwargs)), raising=False)
    assert scripts["flickr30k"].main(arguments(source, output, "--overwrite", "--push-to-hub", "me/flickr30k")) == 0
    [(args, kwargs)] = calls
    assert args == (output.resolve(), "me/flickr30k") and kwargs["private"] is True
    assert load(output, split="test").num_rows == 2


def test_failed_push_keeps_the_folder_and_says_how_to_push_it(tmp_path, scripts, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError("No Hugging Face token.")

    monkeypatch.setattr("hf_pds.hub.push_folder", refuse, raising=False)
    source = make_source(tmp_path, "coco")
    output = tmp_path / "out"
    assert scripts["coco"].main(arguments(source, output, "--push-to-hub", "me/coco")) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bars of writing the folder
    assert error.startswith("error: No Hugging Face token.") and f"hf-pds push {output.resolve()} me/coco" in error
    assert (output / "README.md").is_file()
