import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
from huggingface_hub import DatasetCard

import hf_pds
from helpers import mixed_dataset
from hf_pds.card import card_license, preview_grid
from hf_pds.cli import main
from hf_pds.hub import push_folder, size_category
from hf_pds.pipeline_pds import snapshot_revision
from hf_pds.testing import tiny_pds_pipeline

TOKEN = "hf_secretTOKEN1234567890"


@pytest.fixture(scope="module")
def distilled():
    pipe = tiny_pds_pipeline()
    source = datasets.load_dataset("parquet", data_files={"train": _source_parquet()}, split="train")
    return pipe(source, budget=5, num_inference_steps=2, output_size=48)


def _source_parquet() -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "source.parquet"
    mixed_dataset(12).to_parquet(path)
    return str(path)


@pytest.fixture(scope="module")
def saved(distilled, tmp_path_factory):
    return distilled.save(tmp_path_factory.mktemp("saved") / "pds-5")


def test_card_yaml_has_what_the_hub_needs(saved, distilled):
    card = DatasetCard.load(saved / "README.md")
    data = card.data.to_dict()
    assert data["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    assert {"dataset-distillation", "synthetic", "pds"} <= set(data["tags"])
    assert data["task_categories"] == ["image-to-text", "text-to-image"]
    assert data["source_datasets"] and data["size_categories"] == ["n<1K"]
    assert data["license"] == "other" and data["pretty_name"]
    body = card.text
    # Provenance and every hyper-parameter of the run.
    assert distilled.provenance["source_fingerprint"] in body
    assert "hf_pds.testing.tiny_pds_pipeline(seed=0)" in body and "tiny random CLIP" in body
    assert f"hf-pds version | {hf_pds.__version__}" in body
    for key, value in distilled.settings.items():
        assert f"| `{key}` | `{value}` |" in body
    assert "source images / captions (pairs) | 12 / 30" in body
    assert "@inproceedings{choi2026pds" in body and "## Limitations" in body and "## Evaluate it" in body
    assert "license is unknown" in body  # the note that goes with "other"
    assert "![The first 5 pairs" in body and "(stats.png)" in body


def test_saved_folder_round_trips_through_load_dataset(saved, distilled):
    loaded = datasets.load_dataset(str(saved), split="train")
    assert loaded.num_rows == 5
    for name in ("caption", "text_embedding", "image_embedding", "support", "similarity", "source_caption_index"):
        assert list(loaded[name]) == list(distilled.dataset[name])
    for a, b in zip(loaded["image"], distilled.dataset["image"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_preview_shows_the_first_images_above_their_captions(saved, distilled):
    preview = PIL.Image.open(saved / "preview.png").convert("RGB")
    assert preview.size == (4 * 192, 2 * (192 + 58))  # 5 pairs: two rows of four cells
    first = distilled.dataset[0]["image"].convert("RGB").resize((184, 184), PIL.Image.LANCZOS)
    np.testing.assert_array_equal(np.asarray(preview.crop((4, 4, 188, 188))), np.asarray(first))
    caption_band = np.asarray(preview.crop((0, 192, 192, 250)).convert("L"))
    assert (caption_band < 100).sum() > 50  # text was drawn under the image
    empty_cell = np.asarray(preview.crop((2 * 192, 250, 3 * 192, 500)).convert("L"))
    assert (empty_cell == 255).all()  # cells past the last pair stay blank
    stats = PIL.Image.open(saved / "stats.png")
    assert stats.format == "PNG" and stats.size[0] > stats.size[1]


def test_preview_takes_at_most_sixteen_pairs():
    rows = datasets.Dataset.from_dict(
        {"image": [PIL.Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(20)], "caption": ["x"] * 20}
    )
    assert preview_grid(rows).size == (4 * 192, 4 * (192 + 58))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("CC-BY-4.0", ("cc-by-4.0", None)),
        ("Flickr terms of use", ("other", "Flickr terms of use")),
        (None, ("other", "unknown")),
    ],
)
def test_license_is_inherited_when_it_is_an_identifier(source, expected):
    license_id, note = card_license(source)
    assert license_id == expected[0]
    assert (note is None) if expected[1] is None else (expected[1] in note)


def test_size_categories():
    assert [size_category(n) for n in (5, 999, 1000, 50_000, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
    ]


def test_revision_is_read_from_a_hub_cache_path():
    commit = "a" * 40
    assert snapshot_revision(f"/root/.cache/huggingface/hub/models--org--name/snapshots/{commit}/unet") == commit
    assert snapshot_revision("./my-local-folder/unet") is None


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
    assert files == ["README.md", "data/train-00000-of-00001.parquet", "preview.png", "stats.png"]
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
