"""Scale and safety: the embedding cache, resumable runs, several processes."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from helpers import FAST, mixed_dataset
from hf_pds.testing import tiny_pds_pipeline


def count_clip_calls(pipe):
    calls = []
    hooks = [
        tower.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
        for tower in (pipe.image_encoder, pipe.clip_text_encoder)
    ]
    return calls, hooks


def folder_bytes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_second_distill_at_another_budget_runs_no_clip_forward(pipe, dataset, tmp_path):
    first = pipe(dataset, budget=4, cache_dir=tmp_path, **FAST)
    calls, hooks = count_clip_calls(pipe)
    try:
        second = pipe(dataset, budget=3, cache_dir=tmp_path, num_inference_steps=3, output_size=40)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []
    assert second.dataset.num_rows == 3
    uncached = pipe(dataset, budget=3, use_cache=False, num_inference_steps=3, output_size=40)
    np.testing.assert_array_equal(second.prototypes.image_prototypes, uncached.prototypes.image_prototypes)
    assert list(second.dataset["caption"]) == list(uncached.dataset["caption"])
    assert first.settings["source_captions"] == second.settings["source_captions"] == 25


def test_the_cache_key_follows_the_data_and_the_model(pipe, dataset, tmp_path):
    pipe(dataset, budget=2, cache_dir=tmp_path, **FAST)
    calls, hooks = count_clip_calls(pipe)
    try:
        pipe(dataset.select(range(9)), budget=2, cache_dir=tmp_path, **FAST)  # other data
        assert calls, "a different dataset must be embedded again"
        calls.clear()
        pipe(dataset, budget=2, cache_dir=tmp_path, caption_column="caption", skip_invalid_rows=True, **FAST)
        assert calls, "another row policy must be embedded again"
    finally:
        for hook in hooks:
            hook.remove()
    other_model = tiny_pds_pipeline(seed=1)
    calls, hooks = count_clip_calls(other_model)
    other_model(dataset, budget=2, cache_dir=tmp_path, **FAST)
    assert calls, "other weights must be embedded again"
    assert len(list(tmp_path.iterdir())) == 4


def test_a_corrupt_or_partial_cache_entry_is_recomputed(pipe, dataset, tmp_path, caplog):
    expected = pipe(dataset, budget=3, cache_dir=tmp_path, **FAST)
    (entry,) = list(tmp_path.iterdir())
    embeds = entry / "text_embeds.npy"
    damaged = bytearray(embeds.read_bytes())
    damaged[-3] ^= 0xFF
    embeds.write_bytes(bytes(damaged))
    calls, hooks = count_clip_calls(pipe)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_pds.cache"):
            again = pipe(dataset, budget=3, cache_dir=tmp_path, **FAST)
        assert calls and "Ignoring the corrupt embedding cache entry" in caplog.text
        assert list(again.dataset["caption"]) == list(expected.dataset["caption"])
        # The entry was rewritten whole: now it is used.
        calls.clear()
        pipe(dataset, budget=3, cache_dir=tmp_path, **FAST)
        assert calls == []
        # An entry without its manifest (a write that died) is not used either.
        (entry / "manifest.json").unlink()
        pipe(dataset, budget=3, cache_dir=tmp_path, **FAST)
        assert calls
    finally:
        for hook in hooks:
            hook.remove()


def test_a_crashed_run_resumes_with_the_missing_images_only(pipe, dataset, tmp_path, monkeypatch):
    import hf_pds.synthesis as synthesis

    reference = pipe(dataset, budget=5, output_dir=tmp_path / "reference", **FAST)
    real_encode = synthesis.encode_png
    made = []

    def crash_after_three(image):
        if len(made) == 3:
            raise RuntimeError("the machine went down")
        made.append(1)
        return real_encode(image)

    monkeypatch.setattr(synthesis, "encode_png", crash_after_three)
    with pytest.raises(RuntimeError, match="went down"):
        pipe(dataset, budget=5, output_dir=tmp_path / "out", **FAST)
    work = tmp_path / ".out.pds-run"
    assert not (tmp_path / "out").exists() and len(list((work / "images").glob("*.png"))) == 3
    made.clear()
    monkeypatch.setattr(synthesis, "encode_png", lambda image: made.append(1) or real_encode(image))
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


def cli(*arguments: str, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hf_pds.cli", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        **kwargs,
    )


@pytest.fixture(scope="module")
def saved_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    tiny_pds_pipeline().save_pretrained(folder / "pipe")
    (folder / "source").mkdir()
    mixed_dataset(12).to_parquet(folder / "source" / "train.parquet")
    return folder


def distill_arguments(inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--dataset", str(inputs / "source"),
        "--pipeline", str(inputs / "pipe"),
        "--output", str(output),
        "--output-size", "40",
        "--no-cache",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


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


def test_two_processes_give_the_same_distilled_set_as_one(saved_inputs, tmp_path):
    arguments = ("--budget", "5", "--num-inference-steps", "2", "--batch-size", "2")
    single = cli(*distill_arguments(saved_inputs, tmp_path / "one", *arguments))
    single_output = single.communicate(timeout=300)[0]
    assert single.returncode == 0, single_output
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    double = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "hf_pds.cli", *distill_arguments(saved_inputs, tmp_path / "two", *arguments),
        ],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    output = double.stdout + double.stderr
    assert double.returncode == 0, output
    assert output.count("processes: 2") == 1
    assert "terminate called" not in output
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    card = (tmp_path / "two" / "README.md").read_text()
    assert "| `kmeans_backend` | `faiss` |" in card  # the backend "auto" chose is named in the card
