"""A disk cache of CLIP embeddings, so that distilling the same data again runs no CLIP forward pass.

An entry is keyed by the dataset's fingerprint, the two columns, the row policy, and the CLIP towers
(class, name, revision, config, dtype and a sample of their weights) with their pre-processing. It is a
folder of ``.npy`` arrays (read memory-mapped), the captions, and a manifest with a SHA-256 of every file.
Entries are written into a temporary folder and renamed into place, and a missing, partial or corrupt entry
is detected by its manifest and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .embedding import Embeddings

logger = logging.getLogger(__name__)

# Bump when the way embeddings are computed changes, so that old entries are not reused.
CACHE_FORMAT = 1
_ARRAYS = ("image_embeds", "text_embeds", "caption_image", "rows")
_MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$HF_PDS_CACHE``, else ``hf_pds/embeddings`` under the Hugging Face home (``~/.cache/huggingface``)."""
    if os.environ.get("HF_PDS_CACHE"):
        return Path(os.environ["HF_PDS_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_pds" / "embeddings"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(module, samples_per_tensor: int = 64) -> str:
    """A hash of every parameter's name, shape, dtype and an even sample of its values.

    Cheap (no full copy of the weights) and enough to tell two checkpoints, or two random initialisations,
    apart.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].float().cpu().numpy()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()


def _config_dict(component) -> dict:
    config = getattr(component, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {key: value for key, value in config.to_dict().items() if key != "transformers_version"}
    if hasattr(component, "to_dict"):
        return component.to_dict()
    return {}


def _model_description(model) -> dict:
    """Class, name, config, dtype and a weight sample of a model: what changes its outputs."""
    return {
        "class": type(model).__name__,
        "name_or_path": model.config.name_or_path,
        "config": _config_dict(model),
        "dtype": str(next(model.parameters()).dtype),
        "weights": weights_fingerprint(model),
    }


def towers_description(image_encoder, feature_extractor, text_encoder, tokenizer) -> dict:
    """What of the CLIP towers and their pre-processing changes the embeddings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation settings are state that each call of the tokenizer changes: leave them out.
        rules = {
            key: value for key, value in json.loads(backend.to_str()).items() if key not in ("padding", "truncation")
        }
        vocabulary = json.dumps(rules, sort_keys=True)
    else:
        vocabulary = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "image_encoder": _model_description(image_encoder),
        "feature_extractor": {"class": type(feature_extractor).__name__, "config": _config_dict(feature_extractor)},
        "text_encoder": _model_description(text_encoder),
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "model_max_length": tokenizer.model_max_length,
            "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(),
        },
    }


def cache_key(description: dict) -> str:
    """The entry name of a description (dataset, columns, towers): a SHA-256 of its canonical JSON."""
    canonical = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:40]


class EmbeddingCache:
    """Embeddings on disk under ``folder/<key>/``."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def entry(self, key: str) -> Path:
        return self.folder / key

    def load(self, key: str) -> Embeddings | None:
        """The cached embeddings of ``key``, memory-mapped; None when absent, partial or corrupt."""
        entry = self.entry(key)
        if not entry.is_dir():
            return None
        try:
            manifest = json.loads((entry / _MANIFEST).read_text(encoding="utf-8"))
            for name, checksum in manifest["sha256"].items():
                if _sha256(entry / name) != checksum:
                    raise ValueError(f"{name} does not match its checksum")
            arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
            captions = json.loads((entry / "captions.json").read_text(encoding="utf-8"))
            if len(captions) != len(arrays["text_embeds"]) or manifest["key"] != key:
                raise ValueError("its arrays and captions disagree")
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Ignoring the corrupt embedding cache entry %s (%s); recomputing.", entry, error)
            return None
        logger.info("Loaded embeddings from the cache: %s", entry)
        return Embeddings(captions=captions, skipped_rows=manifest["skipped_rows"], **arrays)

    def save(self, key: str, embeddings: Embeddings, description: dict) -> Path:
        """Write an entry atomically; a complete entry that is already there is kept."""
        entry = self.entry(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=self.folder))
        try:
            files = []
            for name in _ARRAYS:
                np.save(staging / f"{name}.npy", np.ascontiguousarray(getattr(embeddings, name)))
                files.append(f"{name}.npy")
            (staging / "captions.json").write_text(json.dumps(embeddings.captions), encoding="utf-8")
            files.append("captions.json")
            manifest = {
                "key": key,
                "format": CACHE_FORMAT,
                "description": description,
                "skipped_rows": [int(row) for row in embeddings.skipped_rows],
                "sha256": {name: _sha256(staging / name) for name in files},
            }
            # The manifest is written last: an entry without one is incomplete by construction.
            (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
            if entry.exists():
                shutil.rmtree(entry)  # only corrupt entries are rewritten: load() refused this one
            staging.rename(entry)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        logger.info("Cached the embeddings at %s", entry)
        return entry
