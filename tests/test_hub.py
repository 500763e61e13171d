"""Hub-layout folders: saving, loading back, replacing only what hf-pds wrote, cleaning leftovers, pushing."""

import errno
import logging
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard

from helpers import FAST, error_line, folder_bytes, mixed_dataset, refuse_writes_in
from hf_pds.cli import main
from hf_pds.distilled import COLUMNS
from hf_pds.errors import NoSpaceError
from hf_pds.hub import push_folder, size_category
from hf_pds.testing import tiny_pds_pipeline

TOKEN = "hf_secretTOKEN1234567890"
# What a saved distilled set holds.
SAVED_FILES = ["README.md", "data", "fidelity.png", "preview.png", "stats.png"]


def test_save_then_load_dataset_gives_identical_rows(distilled, tmp_path):
    folder = distilled.save(tmp_path / "distilled")
    assert sorted(path.name for path in folder.iterdir()) == SAVED_FILES
    loaded = datasets.load_dataset(str(folder), split="train")
    assert loaded.features == distilled.dataset.features
    original_bytes = distilled.dataset.cast_column("image", datasets.Image(decode=False))["image"]
    loaded_bytes = loaded.cast_column("image", datasets.Image(decode=False))["image"]
    assert [cell["bytes"] for cell in loaded_bytes] == [cell["bytes"] for cell in original_bytes]
    for name in COLUMNS[1:]:
        assert list(loaded[name]) == list(distilled.dataset[name]), name


def test_save_refuses_to_overwrite_and_leaves_nothing_on_failure(distilled, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        distilled.save(target)
    assert list(target.iterdir()) == []

    def broken_write(self, path, **kwargs):
        Path(path).write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", broken_write)
    with pytest.raises(OSError, match="disk full"):
        distilled.save(tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        distilled.save(target, overwrite=True)
    # Nothing half-written: no new folder, no leftover staging folder, the old folder untouched.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert list(target.iterdir()) == []


def test_overwrite_replaces_a_saved_folder(distilled, tmp_path):
    target = tmp_path / "out"
    distilled.save(target)
    # A shard of an older, larger run: hf-pds's own, so replaced with the rest.
    (target / "data" / "train-00000-of-00001.parquet").rename(target / "data" / "train-00001-of-00002.parquet")
    distilled.save(target, overwrite=True)
    assert sorted(path.name for path in target.iterdir()) == SAVED_FILES
    assert [path.name for path in (target / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_overwrite_refuses_a_clone_of_a_published_set_and_says_how_to_update_it(distilled, tmp_path):
    # A `git clone` of a pushed set: its card carries hf-pds's mark, and the user added files of their own.
    clone = distilled.save(tmp_path / "clone")
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (clone / "train_student.py").write_text("print('my training script')\n")
    (clone / "results").mkdir()
    (clone / "results" / "run-1.json").write_text("{}")
    before = folder_bytes(clone)
    with pytest.raises(FileExistsError) as refused:
        distilled.save(clone, overwrite=True)
    message = str(refused.value)
    assert "holds files that hf-pds did not write (.git/, .gitattributes, results/, train_student.py)" in message
    assert "`hf-pds push NEW_FOLDER REPO_ID`" in message and "`git pull` in the clone" in message
    assert folder_bytes(clone) == before
    # One file of the user's is enough, and one in data/ too; each is named.
    for mine in ("notes.txt", "data/my-labels.csv"):
        output = distilled.save(tmp_path / mine.replace("/", "-"))
        (output / mine).write_text("mine")
        with pytest.raises(FileExistsError, match=f"did not write \\({mine}\\)"):
            distilled.save(output, overwrite=True)
        assert (output / mine).read_text() == "mine"


def test_saved_folder_round_trips_through_load_dataset(saved, distilled):
    loaded = datasets.load_dataset(str(saved), split="train")
    assert loaded.num_rows == 5
    for name in ("caption", "text_embedding", "image_embedding", "support", "similarity", "source_caption_index"):
        assert list(loaded[name]) == list(distilled.dataset[name])
    for a, b in zip(loaded["image"], distilled.dataset["image"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_size_categories():
    assert [size_category(n) for n in (5, 999, 1000, 50_000, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
    ]


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call and what the folder held at upload."""

    calls: list

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        card = DatasetCard.load(folder / "README.md")
        self.calls.append(("upload_folder", kwargs, files, card))
        return SimpleNamespace(
            commit_url=f"https://huggingface.co/datasets/{kwargs['repo_id']}/commit/abc",
            pr_url=f"https://huggingface.co/datasets/{kwargs['repo_id']}/discussions/1"
            if kwargs["create_pr"]
            else None,
        )


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    return FakeHub.calls


def test_push_to_hub_is_private_by_default_and_sends_the_whole_folder(distilled, hub, caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        url = distilled.push_to_hub("me/pds-5", token=TOKEN)
    assert url == "https://huggingface.co/datasets/me/pds-5/commit/abc"
    names = [call[0] for call in hub]
    assert names == ["init", "whoami", "create_repo", "upload_folder"]
    assert hub[0] == ("init", TOKEN)
    assert hub[2] == ("create_repo", "me/pds-5", {"repo_type": "dataset", "private": True, "exist_ok": True})
    _, upload, files, card = hub[3]
    assert upload["repo_type"] == "dataset" and upload["repo_id"] == "me/pds-5"
    assert files == ["README.md", "data/train-00000-of-00001.parquet", "fidelity.png", "preview.png", "stats.png"]
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert 'load_dataset("me/pds-5", split="train")' in card.text
    output = capsys.readouterr()
    assert TOKEN not in caplog.text + output.out + output.err


def test_push_options_reach_the_hub(distilled, hub):
    url = distilled.push_to_hub("me/pds-5", private=False, revision="v2", create_pr=True, commit_message="hello")
    assert url.endswith("/discussions/1")
    create_repo = next(call for call in hub if call[0] == "create_repo")
    assert create_repo[2]["private"] is False
    assert not any(call[0] == "create_branch" for call in hub)  # a PR targets the revision directly
    upload = next(call for call in hub if call[0] == "upload_folder")[1]
    assert (upload["revision"], upload["create_pr"], upload["commit_message"]) == ("v2", True, "hello")
    hub.clear()
    distilled.push_to_hub("me/pds-5", revision="v2")
    assert ("create_branch", "me/pds-5", {"branch": "v2", "repo_type": "dataset", "exist_ok": True}) in hub


def test_push_without_token_or_network_fails_before_uploading(saved, hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="No Hugging Face token"):
        push_folder(saved, "me/pds-5")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        push_folder(saved, "me/pds-5", token=TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(self):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(FakeHub, "whoami", unreachable)
    with pytest.raises(ConnectionError, match="Network is unreachable") as error:
        push_folder(saved, "me/pds-5", token=TOKEN)
    assert TOKEN not in str(error.value)
    assert [call[0] for call in hub] == ["init"]


def test_push_refuses_a_folder_that_is_not_a_distilled_set(tmp_path, hub):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(ValueError, match=r"needs README\.md and data/\*\.parquet"):
        push_folder(tmp_path, "me/x", token=TOKEN)
    assert hub == []


def test_cli_push(saved, hub, capsys):
    assert main(["push", str(saved), "me/pds-5"]) == 0
    out = capsys.readouterr().out
    assert "https://huggingface.co/datasets/me/pds-5/commit/abc" in out and TOKEN not in out
    assert next(call for call in hub if call[0] == "create_repo")[2]["private"] is True
    hub.clear()
    assert main(["push", str(saved), "me/pds-5", "--public"]) == 0
    assert next(call for call in hub if call[0] == "create_repo")[2]["private"] is False


def test_cli_push_reports_a_missing_token(saved, hub, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(saved), "me/pds-5"]) == 2
    assert "No Hugging Face token" in capsys.readouterr().err


def test_reloading_an_overwritten_folder_gives_the_new_rows(distilled, tmp_path):
    other = tiny_pds_pipeline()(mixed_dataset(12), budget=3, num_inference_steps=2, output_size=48, seed=3)
    distilled.save(tmp_path / "pds")
    assert datasets.load_dataset(str(tmp_path / "pds"), split="train").num_rows == 5
    other.save(tmp_path / "pds", overwrite=True)
    reloaded = datasets.load_dataset(str(tmp_path / "pds"), split="train")
    assert list(reloaded["caption"]) == list(other.dataset["caption"])
    card = DatasetCard.load(tmp_path / "pds" / "README.md").data.to_dict()
    assert card["dataset_info"]["splits"] == [
        {"name": "train", "num_bytes": card["dataset_info"]["dataset_size"], "num_examples": 3}
    ]


def test_overwrite_refuses_a_folder_of_the_users_files(pipe, dataset, distilled, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(FileExistsError, match="holds files that hf-pds did not write"):
            pipe(dataset, budget=3, output_dir=mine, overwrite=True, num_inference_steps=2)
    finally:
        hook.remove()
    assert calls == []  # refused before any model ran
    with pytest.raises(FileExistsError, match="holds files that hf-pds did not write"):
        distilled.save(mine, overwrite=True)
    assert sorted(path.name for path in mine.iterdir()) == ["thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_replaces_the_current_folder_or_its_parents(distilled, tmp_path, monkeypatch):
    run_in = tmp_path / "project" / "runs"
    run_in.mkdir(parents=True)
    distilled.save(tmp_path / "project" / "old-output")
    monkeypatch.chdir(run_in)
    for folder in (run_in, run_in.parent, tmp_path):
        with pytest.raises(FileExistsError, match="which this run uses or runs in"):
            distilled.save(folder, overwrite=True)
    assert run_in.is_dir() and (tmp_path / "project" / "old-output" / "README.md").is_file()


def test_overwrite_never_replaces_a_folder_the_run_reads(pipe, dataset, tmp_path):
    source = tmp_path / "source"
    dataset.save_to_disk(source)
    loaded = datasets.load_from_disk(str(source))
    with pytest.raises(FileExistsError, match="which this run uses or runs in"):
        pipe(loaded, budget=3, output_dir=tmp_path, overwrite=True, num_inference_steps=2)
    assert (source / "state.json").is_file()


def test_an_hf_pds_output_is_marked_and_replaced(distilled, tmp_path):
    folder = distilled.save(tmp_path / "out")
    assert "Written by hf-pds" in (folder / "README.md").read_text()
    assert distilled.save(folder, overwrite=True) == folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert distilled.save(empty, overwrite=True) == empty


def test_leftovers_of_an_interrupted_save_are_cleaned_by_the_next_save(distilled, tmp_path):
    import json
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = (tmp_path / "out").resolve()
    leftovers = {}
    for name, pid in (("dead", int(dead.stdout)), ("alive", os.getpid())):
        for suffix in ("partial", "old"):
            folder = tmp_path / f".out.{name}.{suffix}"
            folder.mkdir()
            owner = {"pid": pid, "host": socket.gethostname(), "target": str(target)}
            (folder / ".hf-pds-staging.json").write_text(json.dumps(owner))
            leftovers[name, suffix] = folder
    foreign = tmp_path / ".out.mine.partial"
    foreign.mkdir()
    distilled.save(target)
    assert not leftovers["dead", "partial"].exists() and not leftovers["dead", "old"].exists()
    assert leftovers["alive", "partial"].exists() and leftovers["alive", "old"].exists()  # a live writer's
    assert foreign.exists()  # not written by hf-pds: left alone
    assert sorted(path.name for path in target.iterdir()) == SAVED_FILES


def test_a_source_that_cannot_be_loaded_is_one_clear_error(tmp_path):
    from hf_pds.hub import load_source_dataset

    with pytest.raises(ValueError, match=r"cannot load split 'train' of .*nothing"):
        load_source_dataset(tmp_path / "nothing", "train")
    datasets.DatasetDict({"train": mixed_dataset(3)}).save_to_disk(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_source_dataset(tmp_path / "splits", "test")


def test_a_hub_that_fails_the_upload_is_one_clear_error(saved, hub, monkeypatch):
    def refuse(self, **kwargs):
        raise RuntimeError("409 Conflict: the branch moved")

    monkeypatch.setattr(FakeHub, "upload_folder", refuse)
    with pytest.raises(ConnectionError, match=r"The Hub refused the push to me/pds-5 \(RuntimeError: 409 Conflict"):
        push_folder(saved, "me/pds-5", token=TOKEN)


def test_an_output_inside_a_folder_the_run_reads_is_refused(pipe, dataset, distilled, tmp_path):
    source = tmp_path / "source"
    dataset.save_to_disk(source)
    loaded = datasets.load_from_disk(str(source))
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(
            ValueError, match=re.escape(f"The output folder {source / 'pds'} is inside {source}, which this run reads")
        ):
            pipe(loaded, budget=3, output_dir=source / "pds", **FAST)
    finally:
        hook.remove()
    assert calls == []  # refused before any model ran
    with pytest.raises(ValueError, match="which this run reads"):
        distilled.save(source / "pds", protected=[source])
    assert not (source / "pds").exists()
    assert datasets.load_from_disk(str(source)).num_rows == len(dataset)
    # An empty path would be the current folder.
    with pytest.raises(ValueError, match="output_dir must be a path \\(a non-empty string"):
        pipe(dataset, budget=3, output_dir="", **FAST)
    with pytest.raises(ValueError, match="The output folder is '' \\(empty\\)"):
        distilled.save("")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.EROFS, r"cannot be written \(Read-only file system\), so the output folder .*/out cannot be made"),
        (errno.ENOSPC, r"No space left on /.* to write .*/out \(\d+ MB free\)"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    pipe, dataset, tmp_path, monkeypatch, code, message
):
    (tmp_path / "parent").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "parent", code)
    calls = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(OSError, match=message):
            pipe(dataset, budget=3, output_dir=tmp_path / "parent" / "out", **FAST)
    finally:
        hook.remove()
    assert calls == []  # told before any model ran
    assert list((tmp_path / "parent").iterdir()) == []


def test_a_disk_that_fills_during_the_save_is_told_and_the_rerun_resumes(pipe, dataset, tmp_path, monkeypatch):
    output = tmp_path / "out"

    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(b"half a parquet file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "to_parquet", full_disk)
        with pytest.raises(NoSpaceError) as full:
            pipe(dataset, budget=3, output_dir=output, **FAST)
    assert re.fullmatch(
        rf"No space left on /.* to write {re.escape(str(output))} \(about \d+ MB needed, \d+ MB free\)\. Of this run, "
        rf"the prototypes and 3 finished images are kept in {re.escape(str(tmp_path))}/\.out\.pds-run: running it "
        r"again with the same arguments resumes it\.",
        str(full.value),
    ), full.value
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.pds-run"]  # no half-written output
    decoded = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: decoded.append(1))
    try:
        resumed = pipe(dataset, budget=3, output_dir=output, **FAST)
    finally:
        hook.remove()
    assert decoded == []  # every image came from the work folder
    assert datasets.load_dataset(str(output), split="train")["caption"] == list(resumed.dataset["caption"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("repo_id", ["../x", "a/b/c", ""])
def test_push_checks_the_repo_id_before_any_network_call(saved, distilled, hub, capsys, repo_id):
    assert main(["push", str(saved), repo_id]) == 2
    assert f"error: {repo_id!r} is not a Hub repo id: expected 'name' or 'namespace/name'" in error_line(capsys)
    with pytest.raises(ValueError, match="is not a Hub repo id"):
        push_folder(saved, repo_id, token=TOKEN)
    with pytest.raises(ValueError, match="is not a Hub repo id"):
        distilled.push_to_hub(repo_id, token=TOKEN)
    assert hub == []
