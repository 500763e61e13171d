"""Datasets, checkpoint folders and README snippets shared by the tests."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

IMAGE_MODES = ("RGB", "L", "P", "RGBA", "CMYK", "LA", "I;16")
REPO = Path(__file__).resolve().parent.parent
# Generation settings that keep a tiny-pipeline run under a second.
FAST = {"num_inference_steps": 2, "output_size": 40}


def mixed_image(index: int, rng: np.random.Generator) -> PIL.Image.Image:
    """An image of one of several modes and an odd size."""
    height, width = 20 + 7 * index, 48 - 3 * index
    mode = IMAGE_MODES[index % len(IMAGE_MODES)]
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    rgb = PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode)


def mixed_dataset(n_images: int = 10, seed: int = 0) -> datasets.Dataset:
    """Images of mixed modes and sizes, each with a list of 2-3 captions."""
    rng = np.random.default_rng(seed)
    images = [mixed_image(index, rng) for index in range(n_images)]
    topics = ["dog", "cat", "bird", "boat", "tree"]
    captions = [
        [
            f"a {topics[i % 5]} in picture {i}",
            f"picture {i} shows a {topics[i % 5]}",
            f"the {topics[i % 5]} again",
        ][: 2 + i % 2]
        for i in range(n_images)
    ]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)


def hub_cache(folder: Path, repos: dict[str, Path]) -> Path:
    """A Hugging Face Hub cache (``HF_HUB_CACHE`` layout) holding each local folder as the ``main`` snapshot of a
    model repo id, so that ``from_pretrained(repo_id)`` resolves it offline, exactly as it resolves a download."""
    for repo_id, source in repos.items():
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = folder / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
    return folder


def readme_block(heading: str, index: int = 0) -> str:
    """The code of fenced block ``index`` under the README section ``## {heading}``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```")[2 * index + 1].split("\n", 1)[1]


def count_clip_calls(pipe):
    """Records each forward pass of the CLIP text tower: embedding a dataset always runs it, so none means the
    embeddings came from the cache. (The image tower also scores the generated images, so it runs either way.)"""
    calls = []
    hooks = [pipe.clip_text_encoder.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))]
    return calls, hooks


def folder_bytes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def cli(*arguments: str, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hf_pds.cli", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        **kwargs,
    )


def refuse_writes_in(monkeypatch, folder: Path, code: int) -> None:
    """Make creating a file or folder directly in ``folder`` fail with ``OSError(code)``, as on a read-only file
    system (``errno.EROFS``) or a full disk (``errno.ENOSPC``)."""
    folder = folder.resolve()
    for name in ("open", "mkdir"):
        real = getattr(os, name)

        def refuse(path, *args, _real=real, **kwargs):
            if Path(os.fsdecode(path)).parent == folder:
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refuse)


def distill_arguments(inputs: Path, output: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--dataset", str(inputs / "source"),
        "--pipeline", str(inputs / "pipe"),
        "--output", str(output),
        "--output-size", "40",
        "--no-cache",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def crash_encoding_after(monkeypatch, count: int | None, error: BaseException | None = None) -> list:
    """Make synthesis fail with ``error`` (default: "the machine went down") when it is about to encode image
    ``count + 1`` (None: never); returns a list that grows by one per image encoded."""
    import hf_pds.pairs
    import hf_pds.synthesis

    made = []

    def encode(image):
        if len(made) == count:
            raise error or RuntimeError("the machine went down")
        made.append(1)
        return hf_pds.pairs.encode_png(image)

    monkeypatch.setattr(hf_pds.synthesis, "encode_png", encode)
    return made


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-pds ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_image_files(folder: Path, n_images: int = 8) -> Path:
    """PNG files and a CSV of their paths with a caption each (its ``image`` column holds paths); returns the CSV.
    The PNGs are stored uncompressed, so that new pixels keep a file's size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(n_images):
        path = folder / f"{index}.png"
        PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, compress_level=0)
        rows.append(f"{path},a picture of thing {index % 4}")
    table = folder / "pairs.csv"
    table.write_text("image,caption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return table


def repaint(path: Path, seed: int = 1) -> None:
    """New pixels in an image file of :func:`write_image_files`, at the same path, with the same size and the same
    modification time (as a copy that keeps times, ``cp -p`` or ``rsync -a``, leaves them)."""
    before = path.stat()
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path, compress_level=0)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
