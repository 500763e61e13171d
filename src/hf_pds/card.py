"""The dataset card of a distilled set: YAML the Hub understands, provenance, preview and statistics."""

from __future__ import annotations

import io
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


def stats_plot(support: np.ndarray, similarity: np.ndarray) -> PIL.Image.Image:
    """Two panels: source pairs behind each prototype, and the distribution of image-text similarity."""

    def draw(left, right):
        left.bar(np.arange(len(support)), support, width=1.0, color="#4c72b0")
        left.set(xlabel="prototype (sorted by similarity)", ylabel="source pairs", title="Support per prototype")
        right.hist(similarity, bins=_bins(similarity), color="#dd8452")
        right.set(xlabel="cosine(image prototype, text prototype)", ylabel="prototypes", title="Image-text similarity")

    return _two_panels(draw)


def fidelity_plot(fidelity: np.ndarray, text_alignment: np.ndarray) -> PIL.Image.Image:
    """Two panels: how close each image's CLIP embedding is to its image prototype, and to its text prototype."""

    def draw(left, right):
        left.hist(fidelity, bins=_bins(fidelity), color="#55a868")
        left.set(xlabel="cosine(image, its image prototype)", ylabel="images", title="Fidelity")
        right.hist(text_alignment, bins=_bins(text_alignment), color="#8172b3")
        right.set(xlabel="cosine(image, its text prototype)", ylabel="images", title="Text alignment")

    return _two_panels(draw)


def _summary(values: np.ndarray, digits: int | None) -> dict:
    """Min, median and max, rounded to ``digits`` (None: whole numbers)."""
    return {
        name: round(float(reduce(values)), digits)
        for name, reduce in (("min", np.min), ("median", np.median), ("max", np.max))
    }


def _spread(values: np.ndarray) -> dict:
    """Mean, 5th percentile and min, to 3 decimals."""
    return {
        "mean": round(float(np.mean(values)), 3),
        "p5": round(float(np.percentile(values, 5)), 3),
        "min": round(float(np.min(values)), 3),
    }


def render_card(dataset, prototypes, settings: dict, provenance: dict, repo_id: str | None = None) -> str:
    """The README.md of a distilled set, from ``model_card_templates/distilled_dataset_card.md``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    source = provenance.get("source_dataset")
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
    card = DatasetCard.from_template(
        card_data,
        template_str=template,
        pretty_name=pretty_name,
        n_rows=len(dataset),
        n_preview=min(16, len(dataset)),
        source_text=f"[`{source}`](https://huggingface.co/datasets/{source})" if _is_hub_id(source) else f"`{source}`",
        source_config=provenance.get("source_config"),
        source_split=provenance.get("source_split"),
        source_fingerprint=provenance.get("source_fingerprint", "unknown"),
        source_images=settings.get("source_images"),
        source_captions=settings.get("source_captions"),
        skipped_rows=settings.get("skipped_rows", 0),
        decoder=provenance.get("decoder", "unknown"),
        decoder_checkpoint=provenance.get("decoder_checkpoint"),
        decoder_revision=provenance.get("decoder_revision"),
        image_encoder=provenance.get("image_encoder", "unknown"),
        image_encoder_revision=provenance.get("image_encoder_revision"),
        clip_model=provenance.get("clip_model", "unknown"),
        clip_revision=provenance.get("clip_revision"),
        hf_pds_version=provenance.get("hf_pds_version", "unknown"),
        notes=notes,
        settings=settings,
        image_size=f"{first_image.width}x{first_image.height}",
        text_dim=prototypes.text_prototypes.shape[1],
        image_dim=prototypes.image_prototypes.shape[1],
        support=_summary(prototypes.support, None),
        similarity=_summary(prototypes.similarity, 3),
        fidelity=_spread(fidelity),
        text_alignment=_spread(text_alignment),
        lowest_fidelity=[
            {"row": int(row), "fidelity": round(float(fidelity[row]), 3), "caption": dataset[int(row)]["caption"]}
            for row in np.argsort(fidelity, kind="stable")[:LOWEST_FIDELITY_ROWS]
        ],
        covered_pairs=int(prototypes.support.sum()),
        kept_pairs=prototypes.n_pairs - prototypes.n_pruned,
        fallbacks=int((prototypes.support == 0).sum()),
        repo_id=repo_id or "path/to/this/folder",
    )
    return str(card).rstrip("\n") + "\n"


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
