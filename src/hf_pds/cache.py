"""hf-pds's cache home, and the cache of CLIP embeddings that makes distilling the same data again free.

One home holds every cache of hf-pds: ``$HF_PDS_CACHE``, else ``hf_pds`` under the Hugging Face home
(``~/.cache/huggingface/hf_pds``). The embeddings live in ``embeddings/``, the evaluation's frozen features in
``features/``.

An embedding entry is keyed by what changes the embeddings: the dataset (its fingerprint, and the content of the
image files its cells point to, which the fingerprint does not cover), the columns, the row policy, and the CLIP
towers (class, name, config, dtype and a sample of their weights) with their pre-processing.
It is a folder of ``.npy`` arrays (read memory-mapped), JSON lists, and a manifest with a SHA-256 of every file,
built in a staging folder and moved into place. A partial or corrupt entry is detected by its manifest and
recomputed, never used. A cache folder that cannot be used (not writable, a file, a full disk) costs a warning,
never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .hub import staged_folder

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_PDS_CACHE"
# Read with a deprecation warning: the evaluation's feature cache had a home of its own.
DEPRECATED_FEATURE_CACHE_ENV = "HF_PDS_FEATURE_CACHE"
# Bump when the way embeddings are computed changes, so that old entries are not reused.
CACHE_FORMAT = 1
_MANIFEST = "manifest.json"


def cache_home() -> Path:
    """``$HF_PDS_CACHE``, else ``hf_pds`` under the Hugging Face home (``~/.cache/huggingface/hf_pds``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_pds"


def embeddings_cache_dir() -> Path:
    """Where the CLIP embeddings of the distillation are cached: ``<cache home>/embeddings``."""
    return cache_home() / "embeddings"


def features_cache_dir() -> Path:
    """Where the evaluation's frozen features are cached: ``<cache home>/features``."""
    if os.environ.get(DEPRECATED_FEATURE_CACHE_ENV):
        warnings.warn(
            f"${DEPRECATED_FEATURE_CACHE_ENV} is deprecated: set ${CACHE_ENV} (the home of every hf-pds cache; "
            "features go to its features/ folder).",
            FutureWarning,
            stacklevel=2,
        )
        return Path(os.environ[DEPRECATED_FEATURE_CACHE_ENV]).expanduser()
    return cache_home() / "features"


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


# Config entries that say where a model was loaded from or what wrapped it, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "_commit_hash", "architectures")


def _model_description(model) -> dict:
    """Class, config, dtype and a weight sample of a model: what changes its outputs. Not where it was loaded from:
    the same CLIP model read from two checkpoints (unCLIP-small's image_encoder folder, openai/clip-vit-large-patch14
    for FLUX's adapter) embeds alike, so decoders that read it share the cache."""
    config = {key: value for key, value in _config_dict(model).items() if key not in _PROVENANCE_KEYS}
    return {
        "class": type(model).__name__,
        "config": config,
        "dtype": str(next(model.parameters()).dtype),
        "weights": weights_fingerprint(model),
    }


def towers_description(towers) -> dict:
    """What of the CLIP towers (an object with ``image_encoder``, ``feature_extractor``, ``text_encoder`` and
    ``tokenizer``) and their pre-processing changes the embeddings."""
    tokenizer = towers.tokenizer
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
        "image_encoder": _model_description(towers.image_encoder),
        "feature_extractor": {
            "class": type(towers.feature_extractor).__name__,
            "config": _config_dict(towers.feature_extractor),
        },
        "text_encoder": _model_description(towers.text_encoder),
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "model_max_length": tokenizer.model_max_length,
            "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(),
        },
    }


class EmbeddingCache:
    """Embeddings on disk under ``folder/<key>/`` (``folder`` defaults to :func:`embeddings_cache_dir`)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else embeddings_cache_dir()

    def key(self, source: dict, towers) -> str:
        """The entry name of embeddings of ``source`` (dataset identity, columns, row policy) made by
        ``towers``: a SHA-256 of their canonical description."""
        description = {"format": CACHE_FORMAT, **source, "towers": towers.description()}
        canonical = json.dumps(description, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:40]

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, list]] | None:
        """``(arrays, lists)`` of the entry ``key``, arrays memory-mapped; None when absent, partial or corrupt."""
        entry = self.folder / key
        if not entry.is_dir():
            return None
        try:
            manifest = json.loads((entry / _MANIFEST).read_text(encoding="utf-8"))
            if manifest["key"] != key:
                raise ValueError("its manifest names another entry")
            for name, checksum in manifest["sha256"].items():
                if _sha256(entry / name) != checksum:
                    raise ValueError(f"{name} does not match its checksum")
            arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in manifest["arrays"]}
            lists = {
                name: json.loads((entry / f"{name}.json").read_text(encoding="utf-8")) for name in manifest["lists"]
            }
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring the corrupt embedding cache entry %s (%s); recomputing.", entry, error)
            return None
        logger.info("Loaded embeddings from the cache: %s", entry)
        return arrays, lists

    def save(self, key: str, arrays: dict[str, np.ndarray], lists: dict[str, list]) -> Path | None:
        """Write the entry ``key`` atomically and return it; a corrupt entry there is replaced. When the cache
        folder cannot be written, warn and return None: the run goes on without the cache."""
        entry = self.folder / key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with staged_folder(entry) as staging:
                for name, array in arrays.items():
                    np.save(staging / f"{name}.npy", np.ascontiguousarray(array))
                for name, values in lists.items():
                    (staging / f"{name}.json").write_text(json.dumps(values), encoding="utf-8")
                files = [f"{name}.npy" for name in arrays] + [f"{name}.json" for name in lists]
                manifest = {
                    "key": key,
                    "format": CACHE_FORMAT,
                    "arrays": list(arrays),
                    "lists": list(lists),
                    "sha256": {name: _sha256(staging / name) for name in files},
                }
                # The manifest is written last: an entry without one is incomplete by construction.
                (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        except OSError as error:
            logger.warning(
                "The embedding cache at %s cannot be written (%s): going on without the cache.",
                self.folder,
                error.strerror or error,
            )
            return None
        logger.info("Cached the embeddings at %s", entry)
        return entry
