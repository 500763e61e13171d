"""Resumable runs: a crash or a kill resumes with the missing images only; other arguments are refused; one live
run per output; a run that fails before its prototypes leaves nothing behind."""

import signal
import time

import datasets
import pytest

from helpers import FAST, cli, crash_encoding_after, distill_arguments, folder_bytes


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


def test_a_second_live_run_into_the_same_output_is_refused_at_once(pipe, dataset, tmp_path):
    from hf_pds.run_state import RunInProgressError, RunState

    holder = RunState(tmp_path / "out")
    holder.open({"budget": 3})
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(RunInProgressError, match=r"Another run is writing .*out \(pid \d+ on .*\): wait for it"):
            pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)
        assert calls == []
    finally:
        hook.remove()
        holder.close()
    out = pipe(dataset, budget=3, output_dir=tmp_path / "out", **FAST)  # the lock is free once its run ends
    assert out.dataset.num_rows == 3 and not (tmp_path / ".out.pds-run").exists()


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
