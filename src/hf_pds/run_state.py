"""The state of a distillation that writes to an output folder, kept so that it can be resumed.

While ``pipe(..., output_dir=DIR)`` (CLI ``--output DIR``) runs, its state lives in a work folder beside
``DIR``, ``.DIR.pds-run``: the run's arguments (``run.json``), its prototypes with their prompts
(``prototypes.npz``) and one PNG per finished image (``images/``). Each file is written atomically. A run
that dies, even by SIGKILL, is resumed by the same call with the same ``DIR``: finished images are kept,
only the missing ones are made. ``DIR`` itself appears only when the whole output is written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image

from .prototypes import Prototypes

_PROTOTYPE_ARRAYS = (
    "image_prototypes",
    "text_prototypes",
    "caption_index",
    "image_cluster",
    "text_cluster",
    "support",
    "similarity",
)


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def _canonical(value):
    """JSON round trip, so that a fresh dict compares equal to one read back from ``run.json``."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class ImageStore:
    """Finished images of a run: ``images/000042.png`` for prototype 42."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.png"

    def load(self, index: int) -> bytes | None:
        """The PNG of prototype ``index``, or None when it is missing or unreadable."""
        try:
            png = self.path(index).read_bytes()
            PIL.Image.open(io.BytesIO(png)).verify()
        except (OSError, SyntaxError, ValueError):
            return None
        return png

    def save(self, index: int, png: bytes) -> None:
        _write_atomically(self.path(index), png)

    def count(self) -> int:
        """How many images are stored (readable or not)."""
        return len(list(self.folder.glob("*.png")))


class RunState:
    """The work folder of a run writing to ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir).resolve()
        self.folder = self.output_dir.parent / f".{self.output_dir.name}.pds-run"
        self.images = None

    def start(self, arguments: dict, fresh: bool = False) -> bool:
        """Begin or resume the run; returns True when an earlier run is resumed.

        Raises:
            ValueError: the work folder holds an interrupted run with other arguments (unless ``fresh``,
                which discards it).
        """
        arguments = _canonical(arguments)
        manifest = self.folder / "run.json"
        if self.folder.exists() and fresh:
            shutil.rmtree(self.folder)
        resumed = manifest.exists()
        if resumed:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
            changed = sorted(
                key for key in previous.keys() | arguments.keys() if previous.get(key) != arguments.get(key)
            )
            if changed:
                details = "; ".join(f"{key}: {previous.get(key)!r} then, {arguments.get(key)!r} now" for key in changed)
                raise ValueError(
                    f"{self.folder} holds an interrupted run into {self.output_dir} with other arguments ({details}). "
                    "Run again with the same arguments to resume it, or pass fresh=True (CLI: --fresh) to discard it."
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(manifest, json.dumps(arguments, indent=1, sort_keys=True).encode())
        self.images = ImageStore(self.folder / "images")
        return resumed

    def save_prototypes(self, prototypes: Prototypes, prompts: list[str], details: dict) -> None:
        """Keep what synthesis and the final dataset need, so that a resumed run skips steps 2 and 3."""
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(prototypes, name) for name in _PROTOTYPE_ARRAYS})
        _write_atomically(self.folder / "prototypes.npz", buffer.getvalue())
        state = {
            "prompts": prompts,
            "n_pairs": prototypes.n_pairs,
            "n_pruned": prototypes.n_pruned,
            "prototype_settings": prototypes.settings,
            **details,
        }
        _write_atomically(self.folder / "prototypes.json", json.dumps(state).encode())

    def load_prototypes(self) -> tuple[Prototypes, list[str], dict] | None:
        """What :meth:`save_prototypes` kept, or None when the run stopped before it."""
        try:
            with np.load(self.folder / "prototypes.npz") as arrays:
                loaded = {name: arrays[name] for name in _PROTOTYPE_ARRAYS}
            state = json.loads((self.folder / "prototypes.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError):
            return None
        prototypes = Prototypes(
            **loaded,
            n_pairs=state.pop("n_pairs"),
            n_pruned=state.pop("n_pruned"),
            settings=state.pop("prototype_settings"),
        )
        return prototypes, state.pop("prompts"), state

    def finish(self) -> None:
        """Forget the work folder once the output folder is in place."""
        shutil.rmtree(self.folder, ignore_errors=True)
