"""The student protocol on synthetic features: selection on validation, determinism, variants, reports."""

import argparse
import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from hf_pds.evaluation.report import markdown_table, summarize, summarize_records, write_report
from hf_pds.evaluation.runner import TrainingPool, method_pairs, retrieval_split, run_grid
from hf_pds.evaluation.student import (
    RetrievalSplit,
    StudentConfig,
    info_nce,
    projection_head,
    train_student,
)

IMAGE_DIM, TEXT_DIM = 24, 12


def synthetic_pool(n_images, seed, per_image=2, noise=0.3):
    """Images and captions that share a hidden concept: text = fixed linear map of the concept + noise."""
    rng = np.random.default_rng(seed)
    concept = rng.normal(size=(n_images, 8))
    image_map = np.random.default_rng(100).normal(size=(8, IMAGE_DIM))
    text_map = np.random.default_rng(101).normal(size=(8, TEXT_DIM))
    caption_image = np.repeat(np.arange(n_images), per_image)
    images = concept @ image_map + noise * rng.normal(size=(n_images, IMAGE_DIM))
    texts = concept[caption_image] @ text_map + noise * rng.normal(size=(len(caption_image), TEXT_DIM))
    return TrainingPool(images, texts, caption_image)


@pytest.fixture(scope="module")
def data():
    train = synthetic_pool(300, seed=0)
    return train, retrieval_split(synthetic_pool(60, seed=1)), retrieval_split(synthetic_pool(60, seed=2))


FAST = StudentConfig(epochs=8, batch_size=64, lr_decay_epoch=5)


def test_training_learns_and_test_figures_are_those_of_the_epoch_selected_on_validation(data):
    train, validation, test = data
    images, texts = method_pairs("full", train, None)
    run = train_student(images, texts, validation, test, FAST, seed=0)
    assert len(run.validation_history) == 8
    assert run.selected_epoch == int(np.argmax(run.validation_history)) + 1
    assert run.validation["rsum"] == run.validation_history[run.selected_epoch - 1]
    # Chance on 60 images is about 2 * (1 + 5 + 10) / 60 * 100 = 53 rsum.
    assert run.test["rsum"] > 200
    assert run.test_selected is None
    # Training only up to the selected epoch ends in the same state: same test figures.
    again = train_student(
        images, texts, validation, test, StudentConfig(**{**vars(FAST), "epochs": run.selected_epoch})
    )
    assert again.test == run.test


def test_same_seed_same_run_other_seed_other_run(data):
    train, validation, test = data
    images, texts = method_pairs("random", train, 40, seed=0)
    first = train_student(images, texts, validation, test, FAST, seed=3)
    assert train_student(images, texts, validation, test, FAST, seed=3).to_dict() == first.to_dict()
    assert train_student(images, texts, validation, test, FAST, seed=4).validation_history != first.validation_history


def test_test_selected_figures_only_on_request_and_labelled(data):
    train, validation, test = data
    images, texts = method_pairs("random", train, 50, seed=1)
    config = StudentConfig(**{**vars(FAST), "report_test_selected": True})
    run = train_student(images, texts, validation, test, config, seed=0)
    assert run.test_selected["label"] == "selected on test"
    assert run.test_selected["metrics"]["rsum"] >= run.test["rsum"]
    assert 1 <= run.test_selected["epoch"] <= 8
    with pytest.raises(ValueError, match="report_test_selected=False"):
        summarize([train_student(images, texts, validation, test, FAST, seed=0)], "test_selected")


def test_both_heads_and_a_trainable_backbone(data):
    train, validation, test = data
    images, texts = method_pairs("random", train, 60, seed=2)
    both = train_student(images, texts, validation, test, StudentConfig(epochs=2, head="both", embed_dim=16))
    assert both.test["rsum"] > 0
    # A trainable backbone: images go in as tensors, and the given module is copied, not changed.
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IMAGE_DIM, IMAGE_DIM))
    before = [parameter.detach().clone() for parameter in backbone.parameters()]

    def as_images(features):
        return torch.as_tensor(features, dtype=torch.float32).reshape(-1, 1, 4, 6)

    config = StudentConfig(epochs=2, trainable_backbone=True)
    split = RetrievalSplit(as_images(validation.images), validation.texts, validation.text_image)
    test_split = RetrievalSplit(as_images(test.images), test.texts, test.text_image)
    run = train_student(as_images(images), texts, split, test_split, config, image_backbone=backbone)
    assert run.test["rsum"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs image_backbone"):
        train_student(images, texts, validation, test, config)


def test_config_and_input_errors_are_named(data):
    train, validation, test = data
    with pytest.raises(ValueError, match="unknown head 'image'"):
        StudentConfig(head="image")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        StudentConfig(epochs=0)
    images, texts = method_pairs("random", train, 10)
    with pytest.raises(ValueError, match="10 images but 9 texts"):
        train_student(images, texts[:9], validation, test, FAST)
    with pytest.raises(ValueError, match="one text space"):
        train_student(images, texts[:, :5], validation, test, FAST)
    with pytest.raises(ValueError, match="unknown method 'best'"):
        method_pairs("best", train, 10)
    with pytest.raises(ValueError, match="needs a budget"):
        method_pairs("herding", train, None)


def test_info_nce_known_value_and_head_shape():
    temperature = 0.5
    embeds = torch.eye(2)
    # Two orthonormal pairs: each row's logits are (1/t, 0), so each cross-entropy is log(1 + exp(-1/t)).
    assert info_nce(embeds, embeds, temperature).item() == pytest.approx(np.log1p(np.exp(-1 / temperature)))
    head = projection_head(TEXT_DIM, IMAGE_DIM)
    assert head(torch.zeros(3, TEXT_DIM)).shape == (3, IMAGE_DIM)
    assert sum(parameter.numel() for parameter in head.parameters()) == (
        TEXT_DIM * IMAGE_DIM + IMAGE_DIM + IMAGE_DIM * IMAGE_DIM + IMAGE_DIM + 2 * IMAGE_DIM
    )


def test_full_pairs_and_pds_select_pairs(data):
    train, _, _ = data
    images, texts = method_pairs("full", train, None)
    assert images.shape == (600, IMAGE_DIM) and texts.shape == (600, TEXT_DIM)
    images, texts = method_pairs("pds-select", train, 12, seed=0)
    assert images.shape == (12, IMAGE_DIM) and texts.shape == (12, TEXT_DIM)
    # The text side is the text prototype: a mean of captions, not one of them.
    assert not any(np.any(np.all(np.isclose(text, train.text_features), axis=1)) for text in texts)
    _, caption_texts = method_pairs("pds-select", train, 12, seed=0, text_source="caption")
    assert all(np.any(np.all(text == train.text_features, axis=1)) for text in caption_texts)


def test_grid_records_do_not_depend_on_the_number_of_workers(data):
    train, validation, test = data
    tasks = [("random", 20, 0), ("k-center", 20, 1), ("full", None, 1)]
    config = StudentConfig(epochs=1, batch_size=128)
    one = run_grid(tasks, train, validation, test, config, workers=1)
    two = run_grid(tasks, train, validation, test, config, workers=2)
    assert one == two
    assert [(record["method"], record["budget"], record["seed"]) for record in one] == tasks
    assert one[2]["pairs"] == 600


def test_report_files(tmp_path, data):
    train, validation, test = data
    config = StudentConfig(epochs=2, report_test_selected=True)
    tasks = [(method, budget, seed) for method in ("random", "k-center") for budget in (10, 20) for seed in (0, 1)]
    records = run_grid([("full", None, 0), ("full", None, 1), *tasks], train, validation, test, config)
    rows = summarize_records(records)
    assert [(row["method"], row["budget"], row["runs"]) for row in rows][:3] == [
        ("full", None, 2),
        ("random", 10, 2),
        ("random", 20, 2),
    ]
    random_10 = [
        record["test"]["rsum"] for record in records if record["method"] == "random" and record["budget"] == 10
    ]
    assert rows[1]["metrics"]["rsum"]["mean"] == pytest.approx(np.mean(random_10))
    assert rows[1]["metrics"]["rsum"]["std"] == pytest.approx(np.std(random_10, ddof=1))
    table = markdown_table(rows)
    assert "| full | all 600 | 2 |" in table and "| k-center | 20 | 2 |" in table and "±" in table
    paths = write_report(tmp_path / "report", records, settings={"note": "x"}, test_selected=True)
    markdown = paths["markdown"].read_text()
    assert "## Selected on test" in markdown and "recall_vs_budget.png" in markdown
    payload = json.loads(paths["json"].read_text())
    assert len(payload["runs"]) == 10 and payload["settings"] == {"note": "x"}
    assert payload["summary"]["test_selected"][0]["method"] == "full"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_parser_has_help_and_rejects_nothing_to_do(tmp_path, capsys):
    from hf_pds.evaluation.cli import add_evaluate_parser, run_evaluate

    parser = argparse.ArgumentParser(prog="hf-pds")
    help_text = " ".join(add_evaluate_parser(parser.add_subparsers(dest="command")).format_help().split())
    assert "--baseline" in help_text and "validation" in help_text and "selected on test" in help_text
    args = parser.parse_args(["evaluate", "--eval-dataset", str(tmp_path), "--output", str(tmp_path / "out")])
    assert args.epochs == 100 and args.runs == 5 and args.head == "text" and args.image_encoder == "efficientnet-lite0"
    assert run_evaluate(args) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    args = parser.parse_args(
        ["evaluate", "--eval-dataset", str(tmp_path), "--output", str(tmp_path / "out"), "--baseline", "random"]
    )
    assert run_evaluate(args) == 2
    assert "--baseline needs --budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--eval-dataset", "x", "--output", "y", "--baseline", "kmeans"])


def test_pds_select_with_both_text_sources_trains_two_students_on_the_same_prototypes(data):
    from hf_pds.evaluation.runner import run_method

    train, validation, test = data
    records = run_method(
        "pds-select", 10, train, validation, test, StudentConfig(epochs=1), seeds=(0,), text_source="both"
    )
    assert [record["method"] for record in records] == ["pds-select", "pds-select+caption"]
    assert all(record["pairs"] == 10 and record["seed"] == 0 for record in records)
    prototype_only = run_method("pds-select", 10, train, validation, test, StudentConfig(epochs=1), seeds=(0,))
    assert prototype_only[0]["test"] == records[0]["test"]
    with pytest.raises(ValueError, match="unknown text source 'mean'"):
        run_method("random", 10, train, validation, test, text_source="mean")


def planted_clusters(n_clusters=6, per_cluster=15, dim=10, seed=0):
    """Tight clusters far apart: ``(points, cluster of each point)``."""
    rng = np.random.default_rng(seed)
    centres = 20 * rng.normal(size=(n_clusters, dim))
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    return centres[cluster] + rng.normal(size=(len(cluster), dim)), cluster


def test_kmeans_nearest_picks_the_image_nearest_each_centre_one_per_planted_cluster():
    from hf_pds.evaluation.coreset import METHODS, select_coreset
    from hf_pds.kmeans import kmeans

    points, cluster = planted_clusters()
    with threadpool_limits(1):  # k-means on a few points: threads only wait for each other
        rows = select_coreset("kmeans-nearest", points, 6, seed=3)
        _, centres = kmeans(points.astype(np.float32), 6, 3, "sklearn")
        many = [select_coreset("kmeans-nearest", points, 30, seed=seed) for seed in (0, 0, 1)]
    assert rows.dtype == np.int64 and sorted(cluster[rows].tolist()) == list(range(6))
    # Each row is the image nearest its centre: the engine's k-means, same backend and seed.
    assert np.array_equal(rows, ((points[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=0))
    # Distinct rows even when centres outnumber the planted clusters; deterministic per seed.
    assert len(set(many[0].tolist())) == 30 and set(cluster[many[0]].tolist()) == set(range(6))
    assert np.array_equal(many[0], many[1]) and not np.array_equal(many[0], many[2])
    assert "kmeans-nearest" in METHODS


def test_kmeans_nearest_pairs_draw_one_caption_per_image_as_the_coresets(data):
    from hf_pds.evaluation.coreset import pick_captions, select_coreset
    from hf_pds.evaluation.runner import method_selection

    train, _, _ = data
    with threadpool_limits(1):
        rows, texts = method_selection("kmeans-nearest", train, 12, seed=5)
        assert np.array_equal(rows, select_coreset("kmeans-nearest", train.image_features, 12, seed=5))
    assert np.array_equal(texts, train.text_features[pick_captions(rows, train.caption_image, seed=5)])


def test_pds_oracle_trains_on_the_prototypes_of_pds_select(data, monkeypatch):
    from hf_pds.evaluation import runner
    from hf_pds.evaluation.coreset import pds_select

    train, validation, test = data
    handed = []

    def spy(images, texts, *args, **kwargs):
        handed.append((np.asarray(images), np.asarray(texts)))
        return train_student(images, texts, *args, **kwargs)

    monkeypatch.setattr(runner, "train_student", spy)
    with threadpool_limits(1):
        records = runner.run_method(
            "pds-oracle", 10, train, validation, test, StudentConfig(epochs=1), seeds=(2,), text_source="both"
        )
        prototypes = pds_select(train.image_features, train.text_features, train.caption_image, 10, seed=2).prototypes
        variants = runner.pds_variant_pairs(train, 10, seed=2)
        by_source = {
            source: method_pairs("pds-select", train, 10, seed=2, text_source=source)
            for source in ("prototype", "caption")
        }
    assert [(record["method"], record["pairs"], record["seed"]) for record in records] == [("pds-oracle", 10, 2)]
    [(images, texts)] = handed
    assert np.array_equal(images, prototypes.image_prototypes)
    assert np.array_equal(texts, prototypes.text_prototypes)
    # One extraction gives every PDS variant: the same pairs as method_pairs.
    assert list(variants) == ["pds-select", "pds-select+caption", "pds-oracle"]
    assert all(np.array_equal(a, b) for a, b in zip(variants["pds-oracle"], (images, texts), strict=True))
    for variant, source in (("pds-select", "prototype"), ("pds-select+caption", "caption")):
        assert all(np.array_equal(a, b) for a, b in zip(variants[variant], by_source[source], strict=True))
    # No image rows behind its pairs: method_selection (used to train a backbone on images) refuses it.
    with pytest.raises(ValueError, match="selects no image rows"):
        runner.method_selection("pds-oracle", train, 10)
    with pytest.raises(ValueError, match="needs a budget"):
        method_pairs("pds-oracle", train, None)


def test_hf_pds_evaluate_offers_kmeans_nearest_but_not_pds_oracle():
    from hf_pds.evaluation.cli import add_evaluate_parser

    parser = argparse.ArgumentParser(prog="hf-pds")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    argv = ["evaluate", "--eval-dataset", "x", "--output", "y", "--budget", "4", "--baseline"]
    assert parser.parse_args([*argv, "kmeans-nearest"]).baseline == ["kmeans-nearest"]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "pds-oracle"])
