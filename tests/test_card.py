"""The dataset card of a distilled set: YAML for the Hub, provenance, settings, preview and statistics."""

import dataclasses
from importlib import resources

import datasets
import numpy as np
import PIL.Image
import pytest
from huggingface_hub import DatasetCard
from markdown_it import MarkdownIt

import hf_pds
from helpers import FAST, mixed_dataset
from hf_pds.card import TEMPLATE, TEMPLATES, card_license, preview_grid
from hf_pds.cli import main


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


def test_the_card_shows_how_faithful_the_images_are(saved, distilled):
    card = (saved / "README.md").read_text()
    fidelity = np.asarray(distilled.dataset["fidelity"], dtype=np.float64)
    mean, p5 = round(float(fidelity.mean()), 3), round(float(np.percentile(fidelity, 5)), 3)
    assert f"| fidelity (image vs its image prototype) | {mean} | {p5} |" in card
    lowest = int(np.argmin(fidelity))
    assert f"| {lowest} | {round(float(fidelity[lowest]), 3)} | {distilled.dataset[lowest]['caption']} |" in card
    assert "`fidelity` | float | cosine of the image's embedding and its image prototype" in card
    plot = PIL.Image.open(saved / "fidelity.png")
    assert plot.format == "PNG" and plot.size[0] > plot.size[1]


# What a caption, a source name or a note may hold to take over a Hub page, each on a line of its own.
ATTACKS = [
    "# An injected heading",
    "![pixel](http://tracker.example/pixel.png) a tracking pixel",
    '<img src="http://tracker.example/i.png"> raw HTML',
    "<script>alert(1)</script>",
    "[a link](http://tracker.example/) and <http://tracker.example/auto>",
    "**bold** _x_ | a cell ~~gone~~ `code`",
    "```",
    "an open fence that swallows what follows",
]
# How the Hub page reads the card: CommonMark with GFM tables.
MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def rendered(card_text: str) -> list:
    """The tokens of the card's body, with the inline children flattened."""
    tokens = []
    for token in MARKDOWN.parse(card_text):
        tokens += [token, *(token.children or [])]
    return tokens


@pytest.fixture(scope="module")
def attacked(pipe):
    """A set distilled from an in-memory dataset whose every caption holds every attack, as do a note and the
    negative prompt (a setting)."""
    attack = "\n".join(ATTACKS)
    rows = mixed_dataset(8).map(lambda row, index: {"caption": [f"picture {index}\n{attack}"]}, with_indices=True)
    return pipe(rows, budget=3, negative_prompt=attack, provenance={"notes": [attack]}, **FAST)


def test_user_text_enters_the_card_as_plain_text(attacked, tmp_path):
    attack = "\n".join(ATTACKS)
    # The provenance edited before saving, as PDSPipelineOutput documents (on a copy: the fixture is shared).
    named = dataclasses.replace(attacked, provenance={**attacked.provenance, "source_dataset": attack})
    body = DatasetCard.load(named.save(tmp_path / "pds") / "README.md").text
    template = resources.files(TEMPLATES).joinpath(TEMPLATE).read_text(encoding="utf-8")
    tokens = rendered(body)

    # The sections are the template's, and so are the code blocks: no heading added, no fence left open.
    headings = [tokens[i + 1].content for i, token in enumerate(tokens) if token.type == "heading_open"]
    assert headings[1:] == [line[3:] for line in template.splitlines() if line.startswith("## ")]
    assert [token.info for token in tokens if token.type == "fence"] == ["python", "bibtex"]
    # No image, link or HTML but the template's own (and the mark that says who wrote the folder).
    assert {token.attrGet("src") for token in tokens if token.type == "image"} == {
        "preview.png",
        "stats.png",
        "fidelity.png",
    }
    assert {token.attrGet("href") for token in tokens if token.type == "link_open"} == {
        "https://arxiv.org/abs/2602.19756",
        "https://pypi.org/project/hf-pds/",
    }
    html = [token.content.strip() for token in tokens if token.type in ("html_block", "html_inline")]
    assert html == ["<!-- Written by hf-pds. `overwrite=True` (CLI: --overwrite) may replace this folder. -->"]
    # Each caption reads as it was written, on one line, in its own table cell: no emphasis, code or strikethrough
    # took a part of it. So do the note, and (in code spans) the setting and the source's name (a local name: its
    # last part).
    cells = [token.content for token in tokens if token.type in ("text", "code_inline")]
    for caption in attacked.dataset["caption"]:
        assert " ".join(caption.split()) in cells
    assert " ".join(attack.split()) in cells
    assert " ".join(attack.split("/")[-1].split()) in cells
    assert "| `budget` | `3` |" in body and "| row | fidelity | caption |" in body  # the template's own Markdown


def test_a_set_distilled_from_an_in_memory_dataset_says_so(attacked, tmp_path):
    card = (attacked.save(tmp_path / "pds") / "README.md").read_text()
    assert "3 synthetic image-text pairs distilled from an in-memory datasets.Dataset with" in card
    assert "| source dataset | an in-memory datasets.Dataset |" in card
    # None is a value of the settings table (scheduler_preset=None), never of the provenance.
    assert "None" not in card.replace("| `scheduler_preset` | `None` |", "")


def test_the_card_publishes_no_path_of_the_users_machine(saved_inputs, tmp_path):
    arguments = ["distill", "--dataset", str(saved_inputs / "source"), "--pipeline", str(saved_inputs / "pipe")]
    arguments += ["--budget", "2", "--num-inference-steps", "2", "--output-size", "32", "--device", "cpu"]
    assert main([*arguments, "--output", str(tmp_path / "out")]) == 0
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert str(saved_inputs) not in card.content and str(tmp_path) not in card.content
    assert card.data.source_datasets == ["source"] and card.data.pretty_name == "source PDS 2 pairs"
    assert "distilled from `source` with" in card.text
    assert "| source dataset | `source`, config `default`, split `train` |" in card.text
    assert "| decoder | `unclip`: `pipe` |" in card.text
