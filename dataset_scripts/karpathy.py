"""Shared code of the Karpathy-split dataset scripts (``flickr30k.py`` and ``coco.py``).

BLIP distributes the Karpathy splits of Flickr30k and MS-COCO as JSON lists:

* train: one entry per caption, ``{"image": relpath, "caption": str, "image_id": ...}``;
* val / test: one entry per image, ``{"image": relpath, "caption": [str, ...]}``.

This module groups the entries into one row per image (``image``, ``caption``: every caption of the image,
``image_id``), checks that every image file exists before anything is written, and saves the splits ``train``,
``validation`` and ``test`` as a Hub-layout folder with :func:`hf_pds.hub.write_hub_folder`.

The scripts are plain CLI programs, not a package: ``python dataset_scripts/flickr30k.py`` finds this module
because Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets

from hf_pds.hub import hub_configs, size_category, write_hub_folder

SPLITS = ("train", "validation", "test")
# How many missing image paths an error message lists before it gives only the count.
MAX_LISTED = 10

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
    }
)


class DatasetScriptError(Exception):
    """A problem with the user's input (a file, a path, an option): reported on one line, exit code 2."""


@dataclass(frozen=True)
class KarpathyDataset:
    """What differs between Flickr30k and COCO; everything else lives in this module.

    Attributes:
        script: the script's file name, used as the CLI's program name and in the card.
        pretty_name: the card's ``pretty_name`` and title.
        annotation_files: split name -> BLIP JSON file name, for each of :data:`SPLITS`.
        image_id: relative image path -> image id (a string); raises ``ValueError`` when it cannot.
        image_id_rule: one sentence for the card saying how ``image_id`` is derived.
        image_folder_hint: what ``--images`` should hold, for the help text.
        license: the card's ``license`` (a Hub license id, or ``"other"``).
        description: Markdown paragraph on the source dataset, for the card.
        license_note: Markdown paragraph on the terms of the images and captions, for the card.
        card_metadata: further YAML fields of the card (e.g. ``license_name``, ``license_link``).
    """

    script: str
    pretty_name: str
    annotation_files: Mapping[str, str]
    image_id: Callable[[str], str]
    image_id_rule: str
    image_folder_hint: str
    license: str
    description: str
    license_note: str
    card_metadata: Mapping[str, object] = field(default_factory=dict)


@dataclass
class Split:
    """One split grouped per image, as parallel lists in order of first appearance in the JSON file."""

    name: str
    annotation_file: Path
    images: list[str]  # paths relative to --images, exactly as the JSON gives them
    captions: list[list[str]]
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return sum(len(captions) for captions in self.captions)

    def without(self, images: set[str]) -> Split:
        """This split without the rows of the given relative image paths."""
        keep = [index for index, image in enumerate(self.images) if image not in images]
        return replace(
            self,
            images=[self.images[index] for index in keep],
            captions=[self.captions[index] for index in keep],
            image_ids=[self.image_ids[index] for index in keep],
        )


def read_annotations(path: Path) -> list[dict]:
    """The entries of one BLIP annotation file, checked to be a JSON list of objects."""
    if not path.is_file():
        raise DatasetScriptError(f"annotation file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetScriptError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise DatasetScriptError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetScriptError(f"{path}, entry {index}: expected an object, got {type(entry).__name__}")
    return entries


def _entry_captions(entry: dict, where: str) -> list[str]:
    """The captions of one entry: a train entry has one string, a val/test entry a list of them."""
    caption = entry.get("caption")
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list) and caption and all(isinstance(text, str) for text in caption):
        return list(caption)
    raise DatasetScriptError(f"{where}: 'caption' must be a string or a non-empty list of strings, got {caption!r:.80}")


def group_by_image(entries: Sequence[dict], image_id: Callable[[str], str], annotation_file: Path, split: str) -> Split:
    """Group entries into one row per image file, in order of first appearance, captions in file order.

    ``image_id`` is derived from the file name in every split, never read from the train entries' own
    ``image_id``: BLIP writes it differently per dataset and split (COCO train: ``"coco_522418"``), so the
    same image would otherwise get different ids in different splits.
    """
    rows: dict[str, tuple[str, list[str]]] = {}  # relative path -> (image id, captions); dicts keep order
    paths_of_id: dict[str, str] = {}
    for index, entry in enumerate(entries):
        where = f"{annotation_file}, entry {index}"
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise DatasetScriptError(f"{where}: 'image' must be a non-empty relative path, got {image!r:.80}")
        captions = _entry_captions(entry, where)
        if image not in rows:
            try:
                identifier = image_id(image)
            except ValueError as error:
                raise DatasetScriptError(f"{where}: {error}") from None
            # Two files with one id would make image_id useless as a key for joins and retrieval metrics.
            if identifier in paths_of_id:
                raise DatasetScriptError(
                    f"{where}: {image} and {paths_of_id[identifier]} both get image_id {identifier!r}"
                )
            paths_of_id[identifier] = image
            rows[image] = (identifier, [])
        rows[image][1].extend(captions)
    return Split(
        name=split,
        annotation_file=annotation_file,
        images=list(rows),
        captions=[captions for _, captions in rows.values()],
        image_ids=[identifier for identifier, _ in rows.values()],
    )


def load_splits(spec: KarpathyDataset, annotations: Path) -> dict[str, Split]:
    """Read and group the three annotation files; the first missing or malformed file stops everything."""
    splits = {}
    for split in SPLITS:
        path = annotations / spec.annotation_files[split]
        splits[split] = group_by_image(read_annotations(path), spec.image_id, path, split)
        if not splits[split].images:
            raise DatasetScriptError(f"{path} has no entries")
    return splits


def missing_images(splits: Mapping[str, Split], images: Path) -> dict[str, list[str]]:
    """Split name -> relative paths of its images that are not files under ``images``."""
    return {name: [path for path in split.images if not (images / path).is_file()] for name, split in splits.items()}


def _missing_message(missing: Mapping[str, list[str]], splits: Mapping[str, Split], images: Path) -> str:
    paths = [str(images / path) for name in SPLITS for path in missing.get(name, [])]
    total = sum(len(split) for split in splits.values())
    listed = ", ".join(paths[:MAX_LISTED]) + (
        f", ... ({len(paths) - MAX_LISTED} more)" if len(paths) > MAX_LISTED else ""
    )
    return (
        f"{len(paths)} of {total} images are missing under {images}: {listed}; "
        "check --images, or pass --skip-missing to leave them out"
    )


def to_dataset(split: Split, images: Path) -> datasets.Dataset:
    """The split as a ``datasets.Dataset`` whose images are file paths: nothing is decoded here, and
    ``write_hub_folder`` embeds the files' bytes into the Parquet shards."""
    columns = {
        "image": [str(images / path) for path in split.images],
        "caption": split.captions,
        "image_id": split.image_ids,
    }
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def dataset_card(spec: KarpathyDataset, splits: Mapping[str, Split], skipped: Mapping[str, int]) -> str:
    """The folder's README: YAML metadata (``configs`` for ``load_dataset``, license, tasks) and a short body
    saying where the data came from and how many images and captions each split holds."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        configs=hub_configs(list(SPLITS)),
        pretty_name=spec.pretty_name,
        license=spec.license,
        language=["en"],
        task_categories=["image-to-text", "text-to-image"],
        size_categories=size_category(sum(len(split) for split in splits.values())),
        tags=["image-captioning", "retrieval", "karpathy-split"],
        **spec.card_metadata,
    )
    table = "\n".join(
        f"| `{name}` | {len(split)} | {split.num_captions} | `{split.annotation_file.name}` |"
        for name, split in splits.items()
    )
    skipped_total = sum(skipped.values())
    skipped_note = (
        f"\n{skipped_total} images listed in the annotations were missing when the folder was built and are "
        "left out (" + ", ".join(f"{name}: {count}" for name, count in skipped.items() if count) + ").\n"
        if skipped_total
        else ""
    )
    body = (
        f"# {spec.pretty_name}\n\n"
        f"{spec.description}\n\n"
        "The splits are Karpathy's (Karpathy and Fei-Fei, *Deep Visual-Semantic Alignments for Generating Image "
        "Descriptions*, CVPR 2015), read from the BLIP annotation files, and regrouped to one row per image by "
        f"`dataset_scripts/{spec.script}` of [hf-pds](https://pypi.org/project/hf-pds/).\n\n"
        "| split | images | captions | annotation file |\n|---|---|---|---|\n"
        f"{table}\n{skipped_note}\n"
        "Columns: `image` (the original image file), `caption` (every caption of the image, unchanged, in file "
        f"order), `image_id` ({spec.image_id_rule}).\n\n"
        "```python\nfrom datasets import load_dataset\n\n"
        'ds = load_dataset("<this folder or repo id>")\n```\n\n'
        f"## License\n\n{spec.license_note}\n"
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def build_folder(
    spec: KarpathyDataset,
    annotations: str | Path,
    images: str | Path,
    output: str | Path,
    skip_missing: bool = False,
    overwrite: bool = False,
) -> Path:
    """Check every input, then write the Hub-layout folder; returns its path.

    Raises:
        DatasetScriptError: a missing or malformed annotation file, missing images (unless ``skip_missing``),
            or an ``output`` that exists (unless ``overwrite``). Nothing is written in these cases.
    """
    annotations, images, output = Path(annotations), Path(images).absolute(), Path(output)
    # Fail before the minutes of reading and checking a full dataset, not after.
    if output.exists() and not overwrite:
        raise DatasetScriptError(f"{output} already exists; pass --overwrite to replace it")
    if not images.is_dir():
        raise DatasetScriptError(f"image folder not found: {images}")
    splits = load_splits(spec, annotations)
    missing = missing_images(splits, images)
    skipped = {name: len(paths) for name, paths in missing.items()}
    if any(skipped.values()):
        if not skip_missing:
            raise DatasetScriptError(_missing_message(missing, splits, images))
        counts = ", ".join(f"{name}: {count}" for name, count in skipped.items() if count)
        print(
            f"warning: leaving out {sum(skipped.values())} images missing under {images} ({counts})",
            file=sys.stderr,
        )
        splits = {name: split.without(set(missing[name])) for name, split in splits.items()}
        for name, split in splits.items():
            if not split.images:
                raise DatasetScriptError(f"no image of split {name!r} ({split.annotation_file}) exists under {images}")
    for name, split in splits.items():
        print(f"{name}: {len(split)} images, {split.num_captions} captions")
    card = dataset_card(spec, splits, skipped)
    data = {name: to_dataset(split, images) for name, split in splits.items()}
    return write_hub_folder(output, data, card, overwrite=overwrite)


def parse_args(spec: KarpathyDataset, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The scripts' shared command line."""
    files = ", ".join(spec.annotation_files[split] for split in SPLITS)
    parser = argparse.ArgumentParser(
        prog=spec.script,
        description=(
            f"Build a Hub-layout folder of {spec.pretty_name} from the BLIP annotation files: splits train, "
            "validation and test, one row per image, columns image, caption (all captions of the image) and "
            "image_id. datasets.load_dataset(OUTPUT) loads it."
        ),
    )
    parser.add_argument("--annotations", required=True, metavar="DIR", help=f"folder holding {files}")
    parser.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help=f"folder the annotations' image paths are relative to ({spec.image_folder_hint})",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write (README.md + data/*.parquet)")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="after writing the folder, upload it to this Hub dataset repo (created private if it does not exist)",
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out images whose files are missing, with a warning (default: stop with an error listing them)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    return parser.parse_args(argv)


def main(spec: KarpathyDataset, argv: Sequence[str] | None = None) -> int:
    """Run a dataset script; returns its exit code (2: a user error, reported on one line)."""
    args = parse_args(spec, argv)
    try:
        folder = build_folder(spec, args.annotations, args.images, args.output, args.skip_missing, args.overwrite)
    except (DatasetScriptError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Saved to {folder}  (load it with datasets.load_dataset({str(folder)!r}))")
    if args.push_to_hub:
        # Only pushing needs the Hub upload helper.
        from hf_pds.hub import push_folder

        try:
            url = push_folder(
                folder, args.push_to_hub, private=True, commit_message=f"Upload {spec.pretty_name} ({spec.script})"
            )
        except (ValueError, ConnectionError, PermissionError) as error:
            print(
                f"error: {error} The folder {folder} is saved; push it later with "
                f"`hf-pds push {folder} {args.push_to_hub}`.",
                file=sys.stderr,
            )
            return 2
        print(f"Pushed to {args.push_to_hub}: {url}")
    return 0
