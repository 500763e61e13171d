import errno
import logging

import datasets
import pytest

from helpers import distill_arguments, error_line, folder_bytes, mixed_dataset, refuse_writes_in
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
    evaluate = ["evaluate", "--eval-dataset", str(tmp_path / "eval"), "--full", "--output", str(mine), "--overwrite"]
    assert main(evaluate) == 2
    assert "holds files that hf-pds did not write" in error_line(capsys)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]


def test_overwrite_into_a_clone_of_a_published_set_is_refused_with_the_way_to_update_it(
    saved_inputs, tmp_path, capsys, saved_pipe
):
    clone = tmp_path / "clone"
    assert main(distill_arguments(saved_inputs, clone, "--budget", "2", "--num-inference-steps", "2")) == 0
    capsys.readouterr()
    (clone / ".git").mkdir()
    (clone / "train_student.py").write_text("print('mine')")
    (clone / "results").mkdir()
    before = folder_bytes(clone)
    base = ["distill", "--dataset", str(tmp_path / "no-such-dataset"), "--pipeline", str(saved_pipe)]
    assert main([*base, "--output", str(clone), "--overwrite"]) == 2
    line = error_line(capsys)
    assert f"{clone} holds files that hf-pds did not write (.git/, results/, train_student.py)" in line
    assert "It is a git clone: to update the set it holds, save into a new folder" in line
    assert folder_bytes(clone) == before and (clone / "results").is_dir()


def test_an_output_inside_the_source_folder_or_empty_is_refused(saved_inputs, tmp_path, monkeypatch, capsys):
    source = saved_inputs / "source"
    before = sorted(path.name for path in source.iterdir())
    assert main(distill_arguments(saved_inputs, source / "pds", "--budget", "2")) == 2
    assert f"The output folder {source / 'pds'} is inside {source}, which this run reads" in error_line(capsys)
    assert sorted(path.name for path in source.iterdir()) == before
    monkeypatch.chdir(tmp_path)
    pipeline = str(saved_inputs / "pipe")
    assert main(["distill", "--dataset", str(source), "--pipeline", pipeline, "--output", "", "--budget", "2"]) == 2
    assert "The output folder is '' (empty): name the folder to write." in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.EROFS, "(Read-only file system), so the output folder"), (errno.ENOSPC, "No space left on")],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, saved_pipe, code, message
):
    (tmp_path / "parent").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "parent", code)
    # The dataset does not exist: an error about the output shows that nothing was loaded before the check.
    base = ["distill", "--dataset", str(tmp_path / "no-such-dataset"), "--pipeline", str(saved_pipe)]
    assert main([*base, "--output", str(tmp_path / "parent" / "out")]) == 2
    assert message in error_line(capsys)


def test_a_disk_that_fills_during_the_save_is_one_line_and_the_same_command_resumes(
    saved_inputs, tmp_path, monkeypatch, capsys, caplog
):
    arguments = distill_arguments(saved_inputs, tmp_path / "out", "--budget", "2", "--num-inference-steps", "2")

    def full_disk(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "to_parquet", full_disk)
        assert main(arguments) == 2
    line = error_line(capsys)
    assert "No space left on" in line and "MB needed" in line
    assert line.endswith(
        f"The run resumes when rerun: its prototypes and 2 finished images are kept in {tmp_path}/.out.pds-run."
    )
    with caplog.at_level(logging.INFO, logger="hf_pds"):
        assert main(arguments) == 0
    assert "its 2 prototypes and 2 finished images are kept" in caplog.text
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 2
