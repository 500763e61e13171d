"""hf-pds's cache home, and the cache of CLIP embeddings that makes distilling the same data again free.

One home holds every cache of hf-pds: ``$HF_PDS_CACHE``, else ``hf_pds`` under the Hugging Face home
(``~/.cache/huggingface/hf_pds``). The embeddings live in ``embeddings/``, the evaluation's frozen features in
``features/``.

An embedding entry is keyed by what changes the embeddings: the dataset (its fingerprint, and the content of the
image files its cells point to, which the fingerprint does not cover), the columns, the row policy, and the CLIP
towers (class, name, config, dtype and a sample of their weights) with their pre-processing.
An entry is a store (:mod:`hf_pds.shards`): fixed-size shards of ``.npy`` arrays (read memory-mapped) and a
manifest, written last. Each shard is written whole or not at all into ``<key>.partial/``, which a killed run leaves
behind so that the next one embeds only the missing shards; the finished folder is moved into place. Opening an
entry checks its manifest and each file's size and ``.npy`` header, never rereading the content; the SHA-256
recorded while writing is checked by :meth:`hf_pds.shards.Store.verify` only. A corrupt entry is recomputed, never
used. A cache folder that cannot be written (a file, read-only, a full disk) at the start of the embedding costs a
warning, never the run: the shards go to the run's temporary folder. A disk that fills up in the middle of the
embedding stops the run (:class:`~hf_pds.errors.NoSpaceError`), and the shards finished so far are kept for the
next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

from .defaults import DEFAULT_EMBEDDING_DTYPE
from .hub import write_atomically
from .shards import DEFAULT_SHARD_IMAGES, Store, finish_store, open_store

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_PDS_CACHE"
# Read with a deprecation warning: the evaluation's feature cache had a home of its own.
DEPRECATED_FEATURE_CACHE_ENV = "HF_PDS_FEATURE_CACHE"
# Bump when the way embeddings are computed changes, so that old entries are not reused.
CACHE_FORMAT = 2


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
    """Embedding stores under ``folder/<key>/`` (``folder`` defaults to :func:`embeddings_cache_dir`).

    An entry is a store (:mod:`hf_pds.shards`: a manifest and its shard folders). It is built in
    ``folder/<key>.partial/``, which outlives a killed run: each shard is moved in whole when written, so the next
    run with the same key embeds only the shards that are missing (:meth:`staging`, then
    :func:`hf_pds.shards.finished_shards`). Once every shard is there, :meth:`finish` writes the manifest and moves
    the folder into place. Entries of an older format have other keys, so they are never read (recomputed).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else embeddings_cache_dir()

    def key(
        self, source: dict, towers, *, dtype: str = DEFAULT_EMBEDDING_DTYPE, shard_size: int = DEFAULT_SHARD_IMAGES
    ) -> str:
        """The entry name of embeddings of ``source`` (dataset identity, columns, row policy) made by ``towers``
        and stored as ``dtype`` in shards of ``shard_size`` images: a SHA-256 of their canonical description."""
        description = {
            "format": CACHE_FORMAT,
            **source,
            "towers": towers.description(),
            "dtype": dtype,
            "shard_size": shard_size,
        }
        canonical = json.dumps(description, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:40]

    def entry(self, key: str) -> Path:
        """The folder of the finished entry ``key``."""
        return self.folder / key

    def load(self, key: str) -> Store | None:
        """The store of the entry ``key`` (checked as :func:`hf_pds.shards.open_store` checks: manifest, sizes and
        headers, no checksum); None, with a warning, when it is absent, partial or corrupt."""
        entry = self.entry(key)
        if not entry.is_dir():
            return None
        try:
            store = open_store(entry, key)
        except ValueError as error:
            logger.warning("Ignoring the corrupt embedding cache entry %s (%s); recomputing.", entry, error)
            return None
        logger.info("Loaded embeddings from the cache: %s", entry)
        return store

    def staging(self, key: str) -> Path | None:
        """The folder where the entry ``key`` is built, ``<key>.partial/``, with the shards an interrupted run
        finished; made, and checked to be writable, here. When it cannot be written (the cache folder is a file,
        read-only, on a full disk), warn and return None: the run goes on without the cache."""
        staging = self.folder / f"{key}.partial"
        probe = staging / ".writable"
        try:
            staging.mkdir(parents=True, exist_ok=True)
            write_atomically(probe, b"")
            probe.unlink()
        except OSError as error:
            logger.warning(
                "The embedding cache at %s cannot be written (%s): going on without the cache.",
                self.folder,
                error.strerror or error,
            )
            if staging.is_dir() and not any(staging.iterdir()):
                staging.rmdir()
            return None
        return staging

    def finish(self, key: str, n_shards: int, *, dtype: str, shard_size: int) -> Store:
        """Write the manifest of the entry ``key`` once its ``n_shards`` shards are in :meth:`staging`, move it
        into place and return its store (the main process, once every process has written its shards)."""
        store = finish_store(
            self.folder / f"{key}.partial", self.entry(key), n_shards, dtype=dtype, shard_size=shard_size, key=key
        )
        logger.info("Cached the embeddings at %s", store.folder)
        return store
