"""Build an offline image-caption dataset of emoji (Hub-layout folder) from the npm ``emoji-datasource`` packages.

    npm install --prefix .cache/emoji emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0
    python dataset_scripts/emoji.py --emoji-dir .cache/emoji/node_modules --output emoji-captions

Each package ships ``emoji.json`` (name, short names, category and subcategory of every emoji) and a 64x64 PNG
per emoji in its art style. The dataset keeps the base emoji only (no skin-tone variants: 1911 in version
16.0.0), composites each image on white, and gives it 3-5 captions made from its name, its short names, its
subcategory and its category. The *concepts* (emoji) are split 70/10/20 into ``train``, ``validation`` and
``test`` with a seeded permutation, so that no concept is in two splits. ``train`` holds every art style of
each concept (one row per style, all with the concept's captions); ``validation`` and ``test`` hold one image
per concept, its style drawn per concept (seeded), so that every caption has exactly one right image in
retrieval. The result loads with ``datasets.load_dataset("emoji-captions")``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from hf_pds.hub import hub_configs, size_category, write_hub_folder
from hf_pds.pairs import encode_png, to_rgb

SPLITS = ("train", "validation", "test")
STYLES = ("google", "twitter")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_EMOJI_DIR = Path(".cache/emoji/node_modules")
PACKAGE_VERSION = "16.0.0"
INSTALL_HINT = (
    f"npm install --prefix .cache/emoji emoji-datasource-google@{PACKAGE_VERSION} "
    f"emoji-datasource-twitter@{PACKAGE_VERSION}"
)
IMAGE_SIZE = 64
MAX_CAPTIONS = 5
STYLE_LICENSES = {"google": "apache-2.0", "twitter": "cc-by-4.0"}

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
        "concept": datasets.Value("string"),
        "style": datasets.Value("string"),
        "category": datasets.Value("string"),
        "subcategory": datasets.Value("string"),
    }
)


class DatasetScriptError(Exception):
    """A problem with the user's input (a path, an option): reported on one line, exit code 2."""


@dataclass(frozen=True)
class Emoji:
    """One base emoji (a concept) as ``emoji.json`` describes it."""

    unified: str
    name: str
    short_names: tuple[str, ...]
    category: str
    subcategory: str
    image: str  # file name under img/<style>/64/

    @property
    def captions(self) -> list[str]:
        """Its 3-5 captions: see :func:`captions_for`."""
        return captions_for(self.name, self.short_names, self.category, self.subcategory)


def _words(text: str) -> str:
    """Lower case, with ``_`` and ``-`` read as spaces and runs of spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", text)).strip().lower()


def captions_for(name: str, short_names: Sequence[str], category: str, subcategory: str) -> list[str]:
    """The 3-5 captions of an emoji, in a fixed order, without duplicates.

    1. its name (``"crossed swords"``);
    2. ``"a <subcategory> emoji: <name>"`` (``"a tool emoji: crossed swords"``);
    3. ``"<category> emoji showing <name>"`` (``"objects emoji showing crossed swords"``);
    4-5. up to two short names that differ from the name (``"raised hand with fingers splayed"``).
    """
    title = _words(name)
    captions = [title, f"a {_words(subcategory)} emoji: {title}", f"{_words(category)} emoji showing {title}"]
    for short_name in short_names:
        words = _words(short_name)
        if words and words not in captions and len(captions) < MAX_CAPTIONS:
            captions.append(words)
    return captions


def package_dir(emoji_dir: Path, style: str) -> Path:
    """The folder of ``emoji-datasource-<style>``, checked to hold ``emoji.json`` and its 64x64 images."""
    if style not in STYLES:
        raise DatasetScriptError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    folder = emoji_dir / f"emoji-datasource-{style}"
    if not (folder / "emoji.json").is_file() or not (folder / "img" / style / str(IMAGE_SIZE)).is_dir():
        raise DatasetScriptError(
            f"emoji-datasource-{style} (emoji.json and img/{style}/{IMAGE_SIZE}/) not found under {emoji_dir}; "
            f"install it with: {INSTALL_HINT}"
        )
    return folder


def read_emoji(emoji_dir: str | Path, styles: Sequence[str] = STYLES) -> list[Emoji]:
    """The base emoji that every style in ``styles`` has an image of, in ``sort_order``.

    ``emoji.json`` lists skin-tone variants inside their base emoji (``skin_variations``); they are left out.
    """
    emoji_dir = Path(emoji_dir)
    if not styles:
        raise DatasetScriptError("at least one style is needed")
    folders = {style: package_dir(emoji_dir, style) for style in styles}
    entries = json.loads((folders[styles[0]] / "emoji.json").read_text(encoding="utf-8"))
    result = []
    for entry in sorted(entries, key=lambda entry: entry["sort_order"]):
        if not all(entry.get(f"has_img_{style}") for style in styles):
            continue
        if not all((folders[style] / "img" / style / str(IMAGE_SIZE) / entry["image"]).is_file() for style in styles):
            continue
        result.append(
            Emoji(
                unified=entry["unified"],
                name=entry["name"] or entry["short_name"],
                short_names=tuple(entry.get("short_names") or ()),
                category=entry["category"],
                subcategory=entry["subcategory"],
                image=entry["image"],
            )
        )
    if not result:
        raise DatasetScriptError(f"no emoji with images of styles {list(styles)} under {emoji_dir}")
    return result


def emoji_image(path: str | Path) -> PIL.Image.Image:
    """An emoji PNG composited on a white background, as RGB."""
    with PIL.Image.open(path) as image:
        image.load()
        return to_rgb(image)


def split_concepts(
    n_concepts: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, np.ndarray]:
    """Split ``range(n_concepts)`` into train / validation / test by a seeded permutation.

    The validation and test sizes are ``round(fraction * n)``; train takes the rest. Each split's indices are
    returned in ascending order.
    """
    fractions = tuple(float(fraction) for fraction in fractions)
    if len(fractions) != 3 or any(fraction <= 0 for fraction in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetScriptError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    n_validation, n_test = round(fractions[1] * n_concepts), round(fractions[2] * n_concepts)
    if n_validation < 1 or n_test < 1 or n_concepts - n_validation - n_test < 1:
        raise DatasetScriptError(f"{n_concepts} concepts are too few to split by {fractions}")
    order = np.random.default_rng(seed).permutation(n_concepts)
    return {
        "train": np.sort(order[n_validation + n_test :]),
        "validation": np.sort(order[:n_validation]),
        "test": np.sort(order[n_validation : n_validation + n_test]),
    }


def build_splits(
    emoji_dir: str | Path,
    styles: Sequence[str] = STYLES,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    limit: int | None = None,
    eval_styles: Sequence[str] | None = None,
) -> dict[str, datasets.Dataset]:
    """The three splits as ``datasets.Dataset`` objects (see the module docstring for their layout).

    ``limit`` keeps only the first ``limit`` emoji in ``sort_order`` (for quick trials and tests).
    ``eval_styles`` (default: ``styles``) are the art styles that ``validation`` and ``test`` draw their images
    from, while ``train`` keeps one row per style of ``styles``: ``styles=("google",), eval_styles=("twitter",)``
    tests a student trained on Google's art on Twitter's. The concepts and their split do not depend on it (when
    every style has an image of the same emoji, as in version 16.0.0): only the images of the validation and
    test concepts change.
    """
    emoji_dir = Path(emoji_dir)
    styles = tuple(dict.fromkeys(styles))
    eval_styles = styles if eval_styles is None else tuple(dict.fromkeys(eval_styles))
    if not eval_styles:
        raise DatasetScriptError("at least one style is needed for validation and test")
    concepts = read_emoji(emoji_dir, tuple(dict.fromkeys((*styles, *eval_styles))))
    if limit is not None:
        concepts = concepts[:limit]
    splits = split_concepts(len(concepts), fractions, seed)
    # The style of each validation / test concept: drawn per concept, from its own stream of the seed.
    drawn_style = np.random.default_rng([seed, 1]).integers(len(eval_styles), size=len(concepts))
    result = {}
    for split, indices in splits.items():
        columns: dict[str, list] = {name: [] for name in FEATURES}
        for index in indices:
            concept = concepts[index]
            for style in styles if split == "train" else (eval_styles[drawn_style[index]],):
                path = emoji_dir / f"emoji-datasource-{style}" / "img" / style / str(IMAGE_SIZE) / concept.image
                columns["image"].append({"bytes": encode_png(emoji_image(path)), "path": None})
                columns["caption"].append(concept.captions)
                columns["image_id"].append(f"{concept.unified.lower()}-{style}")
                columns["concept"].append(concept.unified)
                columns["style"].append(style)
                columns["category"].append(concept.category)
                columns["subcategory"].append(concept.subcategory)
        result[split] = datasets.Dataset.from_dict(columns, features=FEATURES)
    return result


def dataset_card(splits: Mapping[str, datasets.Dataset], styles: Sequence[str], seed: int) -> str:
    """The folder's README: YAML for ``load_dataset`` and the Hub, then provenance, layout and licenses."""
    from huggingface_hub import DatasetCard, DatasetCardData

    licenses = sorted({STYLE_LICENSES[style] for style in styles})
    extra = {} if len(licenses) == 1 else {"license_name": "-and-".join(licenses)}
    data = DatasetCardData(
        configs=hub_configs(list(SPLITS)),
        pretty_name="Emoji captions (emoji-datasource)",
        license=licenses[0] if len(licenses) == 1 else "other",
        language=["en"],
        task_categories=["image-to-text", "text-to-image"],
        size_categories=size_category(sum(len(split) for split in splits.values())),
        tags=["emoji", "image-captioning", "retrieval", "offline-benchmark"],
        **extra,
    )
    table = "\n".join(
        f"| `{name}` | {len(split)} | {len(set(split['concept']))} | {sum(len(c) for c in split['caption'])} |"
        for name, split in splits.items()
    )
    styles_text = ", ".join(f"`emoji-datasource-{style}@{PACKAGE_VERSION}`" for style in styles)
    body = (
        "# Emoji captions\n\n"
        f"Base emoji (no skin-tone variants) from the npm packages {styles_text}, 64x64 images composited on white, "
        "each with 3-5 captions made from the emoji's name, short names, subcategory and category. Built by "
        "`dataset_scripts/emoji.py` of hf-pds, an offline benchmark for image-text retrieval.\n\n"
        f"Concepts are split 70/10/20 by a permutation seeded with {seed}: no emoji is in two splits. `train` has "
        "one row per art style of each concept; `validation` and `test` have one row per concept, its style drawn "
        "per concept, so that each caption has exactly one right image.\n\n"
        "| split | images | concepts | captions |\n|---|---|---|---|\n"
        f"{table}\n\n"
        "Columns: `image`, `caption` (the list of captions), `image_id` (`<code points>-<style>`), `concept` (the "
        "emoji's code points), `style`, `category`, `subcategory`.\n\n"
        "## License\n\nThe emoji metadata is MIT-licensed (emoji-data, Cal Henderson). Google's Noto emoji images "
        "are under the Apache License 2.0; Twitter's Twemoji graphics under Creative Commons Attribution 4.0.\n"
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def build_folder(
    emoji_dir: str | Path,
    output: str | Path,
    styles: Sequence[str] = STYLES,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    limit: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Check the inputs, then write the Hub-layout folder (README + ``data/{split}-*.parquet``); returns it."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise DatasetScriptError(f"{output} already exists; pass --overwrite to replace it")
    splits = build_splits(emoji_dir, styles, seed, fractions, limit)
    for name, split in splits.items():
        print(f"{name}: {len(split)} images, {sum(len(c) for c in split['caption'])} captions")
    return write_hub_folder(
        output, splits, dataset_card(splits, tuple(dict.fromkeys(styles)), seed), overwrite=overwrite
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="emoji.py",
        description=(
            "Build a Hub-layout image-caption folder of emoji from the npm emoji-datasource packages: splits train, "
            "validation and test by concept, columns image, caption (3-5 captions), image_id, concept, style, "
            f"category, subcategory. Install the packages first: {INSTALL_HINT}"
        ),
    )
    parser.add_argument(
        "--emoji-dir",
        default=str(DEFAULT_EMOJI_DIR),
        metavar="DIR",
        help=f"node_modules folder holding emoji-datasource-<style>/ (default: {DEFAULT_EMOJI_DIR})",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write (README.md + data/*.parquet)")
    parser.add_argument(
        "--styles", nargs="+", default=list(STYLES), choices=STYLES, help="art styles to use (default: both)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the concept split and style draw (default: 0)")
    parser.add_argument(
        "--fractions",
        nargs=3,
        type=float,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VALIDATION", "TEST"),
        help="fractions of concepts per split (default: 0.7 0.1 0.2)",
    )
    parser.add_argument("--limit", type=int, help="keep only the first N emoji (quick trials)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns its exit code (2: a user error, reported on one line)."""
    args = parse_args(argv)
    try:
        folder = build_folder(
            args.emoji_dir, args.output, args.styles, args.seed, args.fractions, args.limit, args.overwrite
        )
    except (DatasetScriptError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Saved to {folder}  (load it with datasets.load_dataset({str(folder)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
