"""The dataset card of a distilled set: YAML the Hub understands, provenance, preview and statistics."""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
from importlib import resources

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .hub import hub_configs, size_category
from .pairs import encode_png

# model_card_templates/ at the repository's top level, shipped in the wheel as this package.
TEMPLATES = "hf_pds.model_card_templates"
TEMPLATE = "distilled_dataset_card.md"
PREVIEW_FILE = "preview.png"
STATS_FILE = "stats.png"
FIDELITY_FILE = "fidelity.png"
# Rows listed in the card as the images least like their prototypes.
LOWEST_FIDELITY_ROWS = 5
TAGS = ["dataset-distillation", "synthetic", "pds", "image-text"]
# A Hub license field takes an identifier such as "cc-by-4.0"; free text goes to the card body instead.
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
# Characters that start inline Markdown (emphasis, code, links and images, table cells, strikethrough, escapes);
# underscores between two letters or digits start nothing (snake_case), so they are left as they are.
_MARKDOWN_PUNCTUATION = re.compile(r"(?<=[^\W_])_+(?=[^\W_])|([\\`*_\[\]|~])")

# A statistic of values that are not numbers: a cosine between the two spaces of the select decoder's packaged
# encoders (images and captions embedded by two models).
NOT_MEASURED = "n/a (two embedding spaces)"


def escape_markdown(value) -> str:
    """``value`` as one line of plain text in the card: what a caption, a name or a note may hold never becomes
    Markdown or HTML on the Hub page.

    Every run of whitespace becomes one space, so no line break can start a heading, a list or a code fence;
    Markdown's inline punctuation is escaped with a backslash, so no link, image, emphasis or code span starts;
    and ``<`` becomes ``&lt;``, so no HTML tag (``<img>``, ``<script>``) starts. A plain caption reads as it is.
    """
    text = " ".join(str(value).split())
    escaped = _MARKDOWN_PUNCTUATION.sub(lambda match: match[0] if match[1] is None else "\\" + match[1], text)
    return escaped.replace("<", "&lt;")


def markdown_code(value) -> str:
    """``value`` as one inline code span of a table cell, whatever it holds (Markdown and HTML are inert in a code
    span): on one line, fenced by more backticks than any run of them inside, with ``|`` escaped so that it does
    not end the cell (GitHub-flavoured tables read ``\\|`` as ``|``, in a code span too)."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # a fence next to a backtick would merge
    return f"{fence}{pad}{text}{pad}{fence}"


def public_name(name: str) -> str:
    """What the card may publish of a dataset or model name: a Hub id as it is, and of a local path only its
    last part (a path such as ``/home/<user>/data/flickr`` tells where the user keeps files, and a push publishes
    the card)."""
    if not name or (_is_hub_id(name) and not os.path.exists(name)):
        return name
    parts = re.split(r"[/\\]", os.path.abspath(os.path.expanduser(name)).rstrip("/\\"))
    return parts[-1] or name


def card_license(source_license: str | None) -> tuple[str, str | None]:
    """The card's license: the source's when it is a Hub identifier, else ``other`` with a note."""
    if source_license and _LICENSE_ID.match(source_license.strip().lower()):
        return source_license.strip().lower(), None
    if source_license:
        return "other", f"The source dataset states its license as: {source_license.strip()}. It applies here."
    return "other", "The source dataset's license is unknown to hf-pds; the source's terms apply to this set."


def preview_grid(dataset, count: int = 16, columns: int = 4, cell: int = 192) -> PIL.Image.Image:
    """The first ``count`` rows as a grid, each image above its caption."""
    count = min(count, len(dataset))
    rows = -(-count // columns)
    font = PIL.ImageFont.load_default(size=13)
    caption_height = 58
    grid = PIL.Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for index, row in enumerate(dataset.select(range(count))):
        x, y = (index % columns) * cell, (index // columns) * (cell + caption_height)
        grid.paste(row["image"].convert("RGB").resize((cell - 8, cell - 8), PIL.Image.LANCZOS), (x + 4, y + 4))
        lines = textwrap.wrap(row["caption"], width=cell // 7)[:3]
        draw.multiline_text((x + 6, y + cell), "\n".join(lines), fill="black", font=font, spacing=2)
    return grid


def _two_panels(draw) -> PIL.Image.Image:
    """A figure of two side-by-side panels, drawn by ``draw(left, right)`` (matplotlib axes), as an RGB image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), dpi=100)
    draw(left, right)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def _bins(values: np.ndarray) -> int:
    return min(30, max(5, len(values) // 3))


def _finite(values: np.ndarray) -> np.ndarray:
    """The values that are numbers: a cosine between two spaces (the select decoder's packaged encoders) is NaN."""
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def stats_plot(support: np.ndarray, similarity: np.ndarray) -> PIL.Image.Image:
    """Two panels: source pairs behind each prototype, and the distribution of image-text similarity."""

    def draw(left, right):
        left.bar(np.arange(len(support)), support, width=1.0, color="#4c72b0")
        left.set(xlabel="prototype (sorted by similarity)", ylabel="source pairs", title="Support per prototype")
        right.hist(_finite(similarity), bins=_bins(similarity), color="#dd8452")
        right.set(xlabel="cosine(image prototype, text prototype)", ylabel="prototypes", title="Image-text similarity")

    return _two_panels(draw)


def fidelity_plot(fidelity: np.ndarray, text_alignment: np.ndarray) -> PIL.Image.Image:
    """Two panels: how close each image's CLIP embedding is to its image prototype, and to its text prototype."""

    def draw(left, right):
        left.hist(fidelity, bins=_bins(fidelity), color="#55a868")
        left.set(xlabel="cosine(image, its image prototype)", ylabel="images", title="Fidelity")
        right.hist(_finite(text_alignment), bins=_bins(text_alignment), color="#8172b3")
        right.set(xlabel="cosine(image, its text prototype)", ylabel="images", title="Text alignment")

    return _two_panels(draw)


def _summary(values: np.ndarray, digits: int | None) -> dict:
    """Min, median and max, rounded to ``digits`` (None: whole numbers); "n/a" when no value is a number."""
    values = _finite(values)
    if not len(values):
        return dict.fromkeys(("min", "median", "max"), NOT_MEASURED)
    return {
        name: round(float(reduce(values)), digits)
        for name, reduce in (("min", np.min), ("median", np.median), ("max", np.max))
    }


def _spread(values: np.ndarray) -> dict:
    """Mean, 5th percentile and min, to 3 decimals; "n/a" when no value is a number."""
    values = _finite(values)
    if not len(values):
        return dict.fromkeys(("mean", "p5", "min"), NOT_MEASURED)
    return {
        "mean": round(float(np.mean(values)), 3),
        "p5": round(float(np.percentile(values, 5)), 3),
        "min": round(float(np.min(values)), 3),
    }


def render_card(dataset, prototypes, settings: dict, provenance: dict, repo_id: str | None = None) -> str:
    """The README.md of a distilled set, from ``model_card_templates/distilled_dataset_card.md``.

    What comes from the user or the source data (captions, names, notes, settings) enters the card through
    :func:`escape_markdown` or :func:`markdown_code`, and a local folder or model path only by its last part
    (:func:`public_name`).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    source = public_name(provenance["source_dataset"]) if provenance.get("source_dataset") else None
    fidelity, text_alignment = _scores(dataset)
    license_id, license_note = card_license(provenance.get("source_license"))
    pretty_name = f"{source.split('/')[-1] if source else 'Distilled'} PDS {len(dataset)} pairs"
    card_data = DatasetCardData(
        pretty_name=pretty_name,
        license=license_id,
        task_categories=["image-to-text", "text-to-image"],
        tags=TAGS,
        source_datasets=[source] if source else ["unknown"],
        size_categories=[size_category(len(dataset))],
        configs=hub_configs(["train"]),
    )
    notes = [*provenance.get("notes", []), *([license_note] if license_note else [])]
    first_image = dataset[0]["image"]
    template = resources.files(TEMPLATES).joinpath(TEMPLATE).read_text(encoding="utf-8")

    def told(key: str, default: str | None = None) -> str | None:
        """A provenance entry as a code span (None stays None: the template leaves it out)."""
        value = provenance.get(key) or default
        return None if value is None else markdown_code(value)

    def told_name(key: str, default: str | None = None) -> str | None:
        """A model's name or path (its last part only: :func:`public_name`) as a code span."""
        value = provenance.get(key) or default
        return None if value is None else markdown_code(public_name(value))

    card = DatasetCard.from_template(
        card_data,
        template_str=template,
        pretty_name=escape_markdown(pretty_name),
        n_rows=len(dataset),
        n_preview=min(16, len(dataset)),
        source_text=_source_text(source, provenance),
        embeddings=_embeddings_text(provenance.get("embeddings")),
        sample_size=prototypes.settings.get("sample_size"),
        source_config=told("source_config"),
        source_split=told("source_split"),
        source_fingerprint=told("source_fingerprint", "unknown"),
        source_images=settings.get("source_images"),
        source_captions=settings.get("source_captions"),
        skipped_rows=settings.get("skipped_rows", 0),
        decoder=told("decoder", "unknown"),
        decoder_name=provenance.get("decoder"),  # for the template's choices; shown as ``decoder``
        shares_space=prototypes.similarity.size > 0,
        decoder_checkpoint=told_name("decoder_checkpoint"),
        decoder_revision=told("decoder_revision"),
        image_encoder=told_name("image_encoder", "unknown"),
        image_encoder_revision=told("image_encoder_revision"),
        clip_model=told_name("clip_model", "unknown"),
        clip_revision=told("clip_revision"),
        hf_pds_version=escape_markdown(provenance.get("hf_pds_version") or "unknown"),
        notes=[escape_markdown(note) for note in notes],
        settings=settings,
        shown_settings={key: markdown_code(value) for key, value in settings.items()},
        image_size=f"{first_image.width}x{first_image.height}",
        text_dim=prototypes.text_prototypes.shape[1],
        image_dim=prototypes.image_prototypes.shape[1],
        support=_summary(prototypes.support, None),
        similarity=_summary(prototypes.similarity, 3),
        fidelity=_spread(fidelity),
        text_alignment=_spread(text_alignment),
        lowest_fidelity=[
            {
                "row": int(row),
                "fidelity": round(float(fidelity[row]), 3),
                "caption": escape_markdown(dataset[int(row)]["caption"]),
            }
            for row in np.argsort(fidelity, kind="stable")[:LOWEST_FIDELITY_ROWS]
        ],
        covered_pairs=int(prototypes.support.sum()),
        kept_pairs=prototypes.n_pairs - prototypes.n_pruned,
        fallbacks=int((prototypes.support == 0).sum()),
        # A Python string literal: the snippet stays one valid line whatever the id holds.
        repo_id=json.dumps(repo_id or "path/to/this/folder"),
    )
    return str(card).rstrip("\n") + "\n"


def _source_text(source: str | None, provenance: dict) -> str:
    """How the card names the source: a link for a Hub id, else its (escaped) name, else what it was."""
    if source is None and provenance.get("embeddings") and not provenance.get("source_description"):
        return "precomputed embeddings and their captions"
    if source is None:
        return escape_markdown(provenance.get("source_description") or "an unnamed dataset")
    if _is_hub_id(source):
        return f"[{markdown_code(source)}](https://huggingface.co/datasets/{source})"
    return markdown_code(source)


def _embeddings_text(description: dict | None) -> str | None:
    """How the card says where precomputed embeddings came from (None: the run embedded the images itself)."""
    if not description:
        return None
    if description["kind"] == "clip-retrieval":
        where = f"a folder in clip-retrieval's layout, {markdown_code(public_name(description['path']))}"
    else:
        columns = description["columns"]
        columns = " and ".join(
            markdown_code(columns[name]) for name in ("image_embedding_column", "text_embedding_column")
        )
        where = f"the dataset's columns {columns}"
    return (
        f"precomputed, read from {where}: {description['pairs']} pairs in {description['shards']} shards, "
        f"{description['dim']}-d {description['dtype']}; no image was read"
    )


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def _scores(dataset) -> tuple[np.ndarray, np.ndarray]:
    """The ``fidelity`` and ``text_alignment`` columns of a distilled set."""
    scores = dataset.select_columns(["fidelity", "text_alignment"]).with_format("numpy")
    return np.asarray(scores["fidelity"]), np.asarray(scores["text_alignment"])


def card_files(dataset, prototypes, settings: dict, provenance: dict, repo_id: str | None = None):
    """``(README text, {relative path: bytes})``: the card with its preview, statistics and fidelity images."""
    card = render_card(dataset, prototypes, settings, provenance, repo_id)
    images = {
        PREVIEW_FILE: encode_png(preview_grid(dataset)),
        STATS_FILE: encode_png(stats_plot(prototypes.support, prototypes.similarity)),
        FIDELITY_FILE: encode_png(fidelity_plot(*_scores(dataset))),
    }
    return card, images
