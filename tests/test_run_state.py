"""Resumable runs: a crash or a kill resumes with the missing images only; other arguments are refused; one live
run per output; a run that fails before its prototypes leaves nothing behind."""

import logging
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import datasets
import numpy as np
import pytest

from helpers import (
    FAST,
    cli,
    count_clip_calls,
    crash_encoding_after,
    distill_arguments,
    folder_bytes,
    mixed_dataset,
    repaint,
    write_image_files,
)


@contextmanager
def live_run_into(output):
    """Another process, alive for the block, that holds the lock of a run into ``output``."""
    code = (
        "import sys; from hf_pds.run_state import RunState; run = RunState(sys.argv[1]); run.open({'budget': 3}); "
        "print('holding', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(output)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
        holder.stdout.close()


def test_a_crashed_run_resumes_with_the_missing_images_only(pipe, dataset, tmp_path, monkeypatch):
    reference = pipe(dataset, budget=5, output_dir=tmp_path / "reference", **FAST)
    crash_encoding_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(dataset, budget=5, output_dir=tmp_path / "out", **FAST)
    work = tmp_path / ".out.pds-run"
    assert not (tmp_path / "out").exists() and len(list((work / "images").glob("*.png"))) == 3
    made = crash_encoding_after(monkeypatch, None)
    pipe(dataset, budget=5, output_dir=tmp_path / "out", **FAST)
    assert len(made) == 2  # only the two missing images
    assert not work.exists()
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "reference")
    assert reference.dataset.num_rows == 5


def test_resuming_with_other_arguments_is_refused_unless_fresh(pipe, dataset, tmp_path, monkeypatch):
    import hf_pds.synthesis as synthesis

    def crash(image):
        raise RuntimeError("stop")

    monkeypatch.setattr(synthesis, "encode_png", crash)
    with pytest.raises(RuntimeError):
        pipe(dataset, budget=4, output_dir=tmp_path / "out", **FAST)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"other arguments \(budget: 4 then, 3 now\).*fresh=True"):
        pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)
    out = pipe(dataset, budget=3, output_dir=tmp_path / "out", fresh=True, **FAST)
    assert datasets.load_dataset(str(tmp_path / "out"), split="train").num_rows == out.dataset.num_rows == 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)


def test_kill_and_resume_equals_an_uninterrupted_run(saved_inputs, tmp_path):
    arguments = ("--budget", "6", "--num-inference-steps", "12")
    uninterrupted = cli(*distill_arguments(saved_inputs, tmp_path / "whole", *arguments))
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()

    images = tmp_path / ".killed.pds-run" / "images"
    victim = cli(*distill_arguments(saved_inputs, tmp_path / "killed", *arguments))
    deadline = time.monotonic() + 240
    while len(list(images.glob("*.png"))) < 2:
        assert victim.poll() is None, "the run ended before it could be killed: " + victim.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    finished_before = len(list(images.glob("*.png")))
    assert 2 <= finished_before < 6 and not (tmp_path / "killed").exists()

    resumed = cli(*distill_arguments(saved_inputs, tmp_path / "killed", *arguments))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "finished images are kept" in output
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "whole")
    assert not (tmp_path / ".killed.pds-run").exists()

    refused = cli(*distill_arguments(saved_inputs, tmp_path / "killed", "--budget", "5", "--overwrite"))
    assert refused.wait(timeout=120) == 0  # a finished run leaves no state: --overwrite starts a new one


def test_a_second_live_run_is_refused_before_any_image_is_checked(pipe, dataset, tmp_path):
    from hf_pds.run_state import RunInProgressError

    cells = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    cells[3] = {"bytes": b"not an image", "path": None}  # checking the images would fail on it
    broken = datasets.Dataset.from_dict({"image": cells, "caption": dataset["caption"]}, features=dataset.features)
    calls, hooks = count_clip_calls(pipe)
    try:
        with (
            live_run_into(tmp_path / "out"),
            pytest.raises(RunInProgressError, match=r"Another run is writing .*out \(pid \d+ on .*\): wait for it"),
        ):
            pipe(broken, budget=3, output_dir=tmp_path / "out", **FAST)
        assert calls == []
    finally:
        for hook in hooks:
            hook.remove()
    out = pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)  # the lock is free once its run ends
    assert out.dataset.num_rows == 3 and not (tmp_path / ".out.pds-run").exists()


def test_the_command_line_refuses_a_second_run_before_loading_the_dataset_or_the_pipeline(tmp_path):
    unloadable = tmp_path / "pipe"  # a pipeline folder that passes the cheap checks and fails to load
    unloadable.mkdir()
    (unloadable / "model_index.json").write_text('{"_class_name": "PDSPipeline"}')
    (tmp_path / "no-data").mkdir()  # a dataset folder that fails to load
    with live_run_into(tmp_path / "out"):
        second = cli(
            "distill",
            "--dataset", str(tmp_path / "no-data"),
            "--pipeline", str(unloadable),
            "--output", str(tmp_path / "out"),
            "--device", "cpu",
        )  # fmt: skip
        output = second.communicate(timeout=600)[0]
    assert second.returncode == 2, output
    assert "hf-pds distill: error: Another run is writing" in output and "cannot load" not in output


def test_the_lock_of_a_dead_run_is_taken_over(pipe, dataset, tmp_path, caplog):
    import logging

    work = tmp_path / ".out.pds-run"
    work.mkdir()
    (work / "lock").write_text("pid 999999 on a-host, since 2026-11-24 03:00:00")  # its process is gone
    with caplog.at_level(logging.INFO, logger="hf_pds.run_state"):
        out = pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)
    assert out.dataset.num_rows == 3
    assert "Taking over the work folder" in caplog.text and "pid 999999" in caplog.text


def test_a_run_that_fails_on_bad_input_leaves_nothing_that_blocks_the_corrected_rerun(pipe, dataset, tmp_path):
    stream = dataset.to_iterable_dataset()  # its size is known only once it is read
    with pytest.raises(ValueError, match="budget=11 is larger than the 10 distinct images"):
        pipe(stream, budget=11, output_dir=tmp_path / "out", **FAST)
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    out = pipe(stream, budget=4, output_dir=tmp_path / "out", **FAST)  # other arguments: not refused
    assert out.dataset.num_rows == 4


def test_only_a_real_interruption_is_resumable_and_called_interrupted(pipe, dataset, tmp_path, monkeypatch):
    import hf_pds.synthesis as synthesis

    def power_cut(image):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesis, "encode_png", power_cut)
    with pytest.raises(KeyboardInterrupt):
        pipe(dataset, budget=4, output_dir=tmp_path / "out", **FAST)
    monkeypatch.undo()
    assert (tmp_path / ".out.pds-run" / "run.json").is_file()
    with pytest.raises(
        ValueError, match=r"holds an interrupted run into .* with other arguments \(budget: 4 then, 3 now\)"
    ):
        pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)
    assert pipe(dataset, budget=4, output_dir=tmp_path / "out", **FAST).dataset.num_rows == 4


def test_a_run_whose_image_files_changed_since_it_was_interrupted_is_not_resumed(pipe, tmp_path, monkeypatch):
    table = write_image_files(tmp_path / "images")

    def source():
        return datasets.load_dataset("csv", data_files=str(table), split="train")

    crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(source(), budget=4, output_dir=tmp_path / "out", **FAST)
    crash_encoding_after(monkeypatch, None)
    repaint(tmp_path / "images" / "1.png")  # same path, size and modification time; other pixels
    with pytest.raises(
        ValueError,
        match=r"other arguments \(dataset: not the data it read \(another dataset, or its files changed since\)\)"
        r".*fresh=True to discard it\.",
    ):
        pipe(source(), budget=4, output_dir=tmp_path / "out", **FAST)
    out = pipe(source(), budget=4, output_dir=tmp_path / "out", fresh=True, **FAST)
    uninterrupted = pipe(source(), budget=4, use_cache=False, **FAST)
    np.testing.assert_array_equal(out.prototypes.image_prototypes, uninterrupted.prototypes.image_prototypes)


def test_an_interrupted_stream_is_resumed_by_the_same_stream_only(pipe, dataset, tmp_path, monkeypatch, caplog):
    dataset.to_parquet(tmp_path / "a" / "train.parquet")
    mixed_dataset(10, seed=1).to_parquet(tmp_path / "b" / "train.parquet")

    def stream(name):
        return datasets.load_dataset(str(tmp_path / name), split="train", streaming=True)

    crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(stream("a"), budget=4, output_dir=tmp_path / "out", **FAST)
    made = crash_encoding_after(monkeypatch, None)
    with pytest.raises(ValueError, match=r"dataset: not the data it read \(another dataset"):
        pipe(stream("b"), budget=4, output_dir=tmp_path / "out", **FAST)
    resumed = pipe(stream("a"), budget=4, output_dir=tmp_path / "out", **FAST)
    assert len(made) == 2  # the same stream resumes: only the missing images are made
    whole = pipe(stream("a"), budget=4, **FAST)
    np.testing.assert_array_equal(resumed.prototypes.image_prototypes, whole.prototypes.image_prototypes)

    # A stream made by a function has no identity: what it reads is unknown until it is read, so it never resumes.
    crash_encoding_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(stream("a").map(lambda row: row), budget=4, output_dir=tmp_path / "mapped", **FAST)
    made = crash_encoding_after(monkeypatch, None)
    with caplog.at_level(logging.WARNING, logger="hf_pds.run_state"):
        other = pipe(stream("b").map(lambda row: row), budget=4, output_dir=tmp_path / "mapped", **FAST)
    assert "has no identity" in caplog.text and "it is not resumed; starting afresh" in caplog.text
    assert len(made) == 4
    np.testing.assert_array_equal(
        other.prototypes.image_prototypes, pipe(stream("b"), budget=4, **FAST).prototypes.image_prototypes
    )
