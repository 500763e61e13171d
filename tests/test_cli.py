import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import datasets
import pytest

from helpers import (
    cli,
    crash_encoding_after,
    distill_arguments,
    error_line,
    folder_bytes,
    mixed_dataset,
    refuse_writes_in,
)
from hf_pds.cli import main


def test_the_demo_data_with_the_tiny_pipeline_runs_offline(tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["distill", "--pipeline", "tiny", "--output", str(output), "--budget", "3"]
    arguments += ["--num-inference-steps", "2"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "embedded digits demo" in printed and "random weights" in printed
    assert f"Saved to {output}" in printed
    loaded = datasets.load_dataset(str(output), split="train")
    assert loaded.num_rows == 3
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert all(caption.startswith("a handwritten ") and caption.split()[-1] in digits for caption in loaded["caption"])
    assert loaded[0]["image"].size == (224, 224)
    # A second run refuses to overwrite unless told to.
    assert main(arguments) == 2
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
    assert "--budget 50 is larger than" in capsys.readouterr().err
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
        (["--budget", "0"], "--budget must be at least 1, got 0"),
        (["--seed", "-3"], "--seed must be an integer in [0, 2**32), got -3"),
        (["--guidance-scale", "nan"], "--guidance-scale must be >= 0 (a finite number), got nan"),
        (["--noise-level", "1000"], "--noise-level must be an integer in [0, 1000)"),
        (["--prune-ratio", "1.5"], "--prune-ratio must be in [0, 1), got 1.5"),
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


def hub_folder(folder):
    """A folder that looks like a distilled set to ``hf-pds push`` (which checks its layout before anything else)."""
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("a card")
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    return folder


def test_errors_name_the_options_of_the_command_not_python_arguments(tmp_path, capsys, saved_pipe, monkeypatch):
    import huggingface_hub

    source = mixed_dataset(3)
    columns = {name: list(source[name]) for name in source.column_names}
    columns["caption"][1] = [""]
    datasets.Dataset.from_dict(columns, features=source.features).save_to_disk(tmp_path / "source")
    base = ["distill", "--dataset", str(tmp_path / "source"), "--pipeline", str(saved_pipe), "--budget", "2"]
    assert main([*base, "--output", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "Fix them, or pass --skip-invalid-rows to leave them out." in line and "=True" not in line
    (tmp_path / "taken").mkdir()
    assert main([*base, "--output", str(tmp_path / "taken")]) == 2
    assert error_line(capsys).endswith(f"{tmp_path / 'taken'} already exists; pass --overwrite to replace it.")
    # push takes no --token (it would stay in the shell's history): the message names the ways that work.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(hub_folder(tmp_path / "set")), "me/set"]) == 2
    line = error_line(capsys)
    assert line.endswith("No Hugging Face token: log in with `hf auth login` or set HF_TOKEN to push.")
    assert "token=" not in line


def test_streaming_a_save_to_disk_folder_says_to_drop_streaming(tmp_path, capsys, saved_pipe):
    mixed_dataset(4).save_to_disk(tmp_path / "source")
    arguments = ["distill", "--dataset", str(tmp_path / "source"), "--streaming", "--pipeline", str(saved_pipe)]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert line.endswith(
        "is a folder written by save_to_disk, which is read from disk, not streamed: drop --streaming."
    )
    assert "load_from_disk" not in line


def test_a_library_log_line_is_printed_once(tmp_path):
    # huggingface_hub logs each retry of a request through its own handler, and lets the record propagate.
    script = textwrap.dedent(
        """
        import logging, sys
        import huggingface_hub
        from hf_pds.cli import main

        def whoami(self):
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
            raise OSError("Network is unreachable")

        huggingface_hub.HfApi.whoami = whoami
        sys.exit(main(sys.argv[1:]))
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token"}
    command = [sys.executable, "-c", script, "push", str(hub_folder(tmp_path / "set")), "me/set"]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("Retrying in 1s [Retry 1/5].") == 1, result.stderr
    assert "The Hub cannot be reached" in result.stderr


def test_a_run_prints_no_torchvision_notice(saved_inputs, tmp_path):
    # Real unCLIP checkpoints name CLIPImageProcessor, which transformers resolves to CLIPImageProcessorPil without
    # torchvision, with a notice (a log record, which the warnings filter of pytest's configuration does not see).
    pipe = shutil.copytree(saved_inputs / "pipe", tmp_path / "pipe")
    index = json.loads((pipe / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    run = cli(*distill_arguments(saved_inputs, tmp_path / "out", "--pipeline", str(pipe), "--budget", "2"))
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert "torchvision" not in output and "CLIPImageProcessorPil" not in output


def test_distill_help_imports_neither_torch_nor_diffusers():
    script = textwrap.dedent(
        """
        import sys
        from hf_pds.cli import main

        try:
            main(["distill", "--help"])
        except SystemExit:
            pass
        print(sorted({"torch", "diffusers", "transformers", "datasets"} & set(sys.modules)))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "--guidance-scale GUIDANCE_SCALE guidance scale (default: the decoder's, the paper's 5.0" in help_text
    assert result.stdout.splitlines()[-1] == "[]"


def test_ctrl_c_before_the_prototypes_exist_says_nothing_was_kept(saved_inputs, tmp_path, capsys, monkeypatch):
    import hf_pds.pipeline_pds

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_pds.pipeline_pds, "embed", interrupted)
    assert main(distill_arguments(saved_inputs, tmp_path / "out", "--budget", "3")) == 130
    assert capsys.readouterr().err.endswith(
        "hf-pds distill: interrupted; nothing was kept (the prototypes did not exist yet): running it again starts "
        "over.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_synthesis_says_what_was_kept_and_the_rerun_counts_it(
    saved_inputs, tmp_path, capsys, monkeypatch
):
    arguments = distill_arguments(saved_inputs, tmp_path / "out", "--budget", "4", "--num-inference-steps", "2")
    crash_encoding_after(monkeypatch, 1, KeyboardInterrupt())
    assert main(arguments) == 130
    work = (tmp_path / ".out.pds-run").resolve()
    assert capsys.readouterr().err.endswith(
        f"hf-pds distill: interrupted; the prototypes and 1 finished image are kept in {work}: running it again with "
        "the same arguments resumes it.\n"
    )
    monkeypatch.undo()
    assert main([*arguments, "--budget", "3"]) == 2
    line = error_line(capsys)
    assert "(budget: 4 then, 3 now)" in line
    assert line.endswith("on the same data to resume it, or pass --fresh to discard it.")
    made = crash_encoding_after(monkeypatch, None)
    assert main(arguments) == 0
    assert len(made) == 3
    printed = capsys.readouterr().err
    assert "Generated 3 images in " in printed and " s (and kept 1 from the interrupted run)." in printed


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
        f"Of this run, the prototypes and 2 finished images are kept in {tmp_path}/.out.pds-run: running it again "
        "with the same arguments resumes it."
    )
    with caplog.at_level(logging.INFO, logger="hf_pds"):
        assert main(arguments) == 0
    assert "its 2 prototypes and 2 finished images are kept" in caplog.text
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == 2
