"""The embedding cache: a second distill runs no CLIP forward; keys follow data and models; bad entries and
unusable folders never cost the run."""

import errno
import logging
from pathlib import Path

import numpy as np

from helpers import FAST, count_clip_calls, repaint, write_image_files
from hf_pds.testing import tiny_pds_pipeline


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
    embeds = entry / "shard-00000" / "text_embeds.npy"  # opening checks sizes and headers (the checksum: verify())
    embeds.write_bytes(embeds.read_bytes()[:-3])
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


def test_an_unusable_cache_folder_costs_a_warning_not_the_run(pipe, dataset, tmp_path, caplog):
    expected = pipe(dataset, budget=3, use_cache=False, **FAST)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("a file where the cache should be")
    with caplog.at_level(logging.WARNING, logger="hf_pds.cache"):
        out = pipe(dataset, budget=3, cache_dir=a_file, **FAST)
    assert "cannot be written" in caplog.text and "going on without the cache" in caplog.text
    assert list(out.dataset["caption"]) == list(expected.dataset["caption"])


def test_the_cache_home_is_one_folder_and_the_old_variable_still_works(monkeypatch, tmp_path):
    import pytest

    from hf_pds.cache import embeddings_cache_dir, features_cache_dir

    monkeypatch.setenv("HF_PDS_CACHE", str(tmp_path / "home"))
    monkeypatch.delenv("HF_PDS_FEATURE_CACHE", raising=False)
    assert embeddings_cache_dir() == tmp_path / "home" / "embeddings"
    assert features_cache_dir() == tmp_path / "home" / "features"
    monkeypatch.setenv("HF_PDS_FEATURE_CACHE", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match=r"\$HF_PDS_FEATURE_CACHE is deprecated: set \$HF_PDS_CACHE"):
        assert features_cache_dir() == tmp_path / "old"


def test_a_full_cache_disk_leaves_no_staging_folder_behind(pipe, dataset, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    expected = pipe(dataset, budget=3, use_cache=False, **FAST)
    open_file = Path.open

    def full_disk(self, mode="r", *args, **kwargs):  # every file written into the cache folder fails
        if cache in self.parents and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open_file(self, mode, *args, **kwargs)

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="hf_pds.cache"):
        patch.setattr(Path, "open", full_disk)
        out = pipe(dataset, budget=3, cache_dir=cache, **FAST)
    assert "No space left on" in caplog.text and "going on without the cache" in caplog.text
    assert list(out.dataset["caption"]) == list(expected.dataset["caption"])
    assert list(cache.iterdir()) == []  # not even an empty staging folder
    # With space again, the entry is written, and nothing else is there.
    pipe(dataset, budget=3, cache_dir=cache, **FAST)
    (entry,) = cache.iterdir()
    assert not entry.name.startswith(".") and (entry / "manifest.json").is_file()


def test_an_image_file_replaced_under_the_same_path_is_embedded_again(pipe, tmp_path, caplog):
    import datasets

    table = write_image_files(tmp_path / "images")
    cache = tmp_path / "cache"
    pipe(datasets.load_dataset("csv", data_files=str(table), split="train"), budget=3, cache_dir=cache, **FAST)
    repaint(tmp_path / "images" / "2.png")  # same path, size and modification time; other pixels
    source = datasets.load_dataset("csv", data_files=str(table), split="train")  # the same CSV, so the same fingerprint
    calls, hooks = count_clip_calls(pipe)
    try:
        with caplog.at_level(logging.INFO, logger="hf_pds.cache"):
            again = pipe(source, budget=3, cache_dir=cache, **FAST)
        assert calls, "the new pixels must be embedded"
        assert "Loaded embeddings from the cache" not in caplog.text
        calls.clear()
        pipe(source, budget=3, cache_dir=cache, **FAST)
        assert calls == [], "unchanged files: the cache is used"
    finally:
        for hook in hooks:
            hook.remove()
    uncached = pipe(source, budget=3, use_cache=False, **FAST)
    np.testing.assert_array_equal(again.prototypes.image_prototypes, uncached.prototypes.image_prototypes)
