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
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(caption.startswith("a handwritten ") and caption.split()[-1] in digits for caption in loaded["caption"])
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


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-pds ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    from hf_pds.testing import tiny_pds_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    tiny_pds_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--device", "cuda"], "--device cuda: this machine has no such device"),
        (["--device", "toaster"], "--device 'toaster' is not a torch device"),
        (["--budget", "0"], "budget must be at least 1, got 0"),
        (["--seed", "-3"], "seed must be an integer in [0, 2**32), got -3"),
        (["--guidance-scale", "nan"], "guidance_scale must be >= 0 (a finite number), got nan"),
        (["--noise-level", "1000"], "noise_level must be an integer in [0, 1000)"),
        (["--prune-ratio", "1.5"], "prune_ratio must be in [0, 1), got 1.5"),
        (["--embedding-batch-size", "0"], "--embedding-batch-size must be a positive integer, got 0"),
    ],
)
def test_distill_checks_its_arguments_before_loading_anything(tmp_path, capsys, saved_pipe, arguments, message):
    # The dataset does not exist: an error about the argument shows that nothing was loaded before the check.
    base = ["distill", "--dataset", str(tmp_path / "no-such-dataset"), "--pipeline", str(saved_pipe)]
    assert main([*base, "--output", str(tmp_path / "out"), *arguments]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_distill_reports_load_failures_on_one_line(tmp_path, capsys, saved_pipe):
    import shutil

    source = tmp_path / "source"
    mixed_dataset(6).save_to_disk(source)
    arguments = ["distill", "--dataset", str(source), "--output", str(tmp_path / "out"), "--budget", "2"]
    (tmp_path / "not-a-pipeline").mkdir()
    assert main([*arguments, "--pipeline", str(tmp_path / "not-a-pipeline")]) == 2
    assert "is not a pipeline folder: it has no model_index.json" in error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(saved_pipe, broken)
    shutil.rmtree(broken / "unet")
    assert main([*arguments, "--pipeline", str(broken)]) == 2
    assert "lacks the component folder(s) unet that its model_index.json names" in error_line(capsys)
    shutil.copytree(saved_pipe / "unet", broken / "unet")
    next((broken / "unet").glob("*.safetensors")).write_bytes(b"not a safetensors file")
    assert main([*arguments, "--pipeline", str(broken)]) == 2
    assert f"cannot load the pipeline {broken}" in error_line(capsys)
    assert main(["distill", "--dataset", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 2
    assert "cannot load split 'train' of" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_distill_and_evaluate_never_replace_a_users_folder(tmp_path, capsys, saved_pipe):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    base = ["distill", "--dataset", str(tmp_path / "no-such-dataset"), "--pipeline", str(saved_pipe)]
    assert main([*base, "--output", str(mine), "--overwrite"]) == 2
    assert "holds files that hf-pds did not write" in error_line(capsys)
    evaluate = ["evaluate", "--eval-dataset", str(tmp_path), "--full", "--output", str(mine), "--overwrite"]
    assert main(evaluate) == 2
    assert "holds files that hf-pds did not write" in error_line(capsys)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
