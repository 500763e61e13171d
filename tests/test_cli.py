import datasets
import pytest

from helpers import mixed_dataset
from hf_pds.cli import main


def test_distill_without_arguments_runs_the_embedded_demo(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["distill", "--output", str(output), "--budget", "3", "--num-inference-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "embedded digits demo" in printed and "random weights" in printed
    assert f"Saved to {output}" in printed
    loaded = datasets.load_dataset(str(output), split="train")
    assert loaded.num_rows == 3
    assert all("digit" in caption or "number" in caption for caption in loaded["caption"])
    assert loaded[0]["image"].size == (224, 224)
    # A second run refuses to overwrite unless told to.
    assert main(["distill", "--output", str(output), "--budget", "3", "--num-inference-steps", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet", "parquet-streaming"])
def test_distill_a_local_dataset_with_the_saved_tiny_pipeline(tmp_path, layout):
    from hf_pds.testing import tiny_pds_pipeline

    tiny_pds_pipeline().save_pretrained(tmp_path / "pipe")
    source = mixed_dataset(8).rename_columns({"image": "picture", "caption": "texts"})
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": source}).save_to_disk(tmp_path / "source")
    else:
        (tmp_path / "source").mkdir()
        source.to_parquet(tmp_path / "source" / "train.parquet")
    code = main(
        [
            "distill",
            "--dataset",
            str(tmp_path / "source"),
            "--pipeline",
            str(tmp_path / "pipe"),
            "--image-column",
            "picture",
            "--caption-column",
            "texts",
            "--budget",
            "2",
            "--num-inference-steps",
            "2",
            "--output-size",
            "32",
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            *(["--streaming"] if layout.endswith("streaming") else []),
        ]
    )
    assert code == 0
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 2


def test_bad_input_is_reported_and_nothing_is_written(tmp_path, capsys):
    from hf_pds.testing import tiny_pds_pipeline

    tiny_pds_pipeline().save_pretrained(tmp_path / "pipe")
    source = mixed_dataset(6)
    columns = {name: list(source[name]) for name in source.column_names}
    columns["caption"][4] = ["a fine caption", ""]
    datasets.Dataset.from_dict(columns, features=source.features).save_to_disk(tmp_path / "source")
    arguments = ["distill", "--dataset", str(tmp_path / "source"), "--pipeline", str(tmp_path / "pipe")]
    code = main([*arguments, "--budget", "2", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "Row 4: column 'caption' has an empty caption at position 1" in capsys.readouterr().err
    code = main([*arguments, "--budget", "50", "--output", str(tmp_path / "out"), "--skip-invalid-rows"])
    assert code == 2
    assert "budget=50 is larger than" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe", "source"]
