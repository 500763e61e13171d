"""Embeddings as fixed-size shards on disk: the one store format of hf-pds, and the plain-array view of a shard.

A shard holds a run of images with every caption of those images (one pair per caption), so that a pass over the
shards sees each pair once, with its image. The embedding cache writes shards; precomputed embeddings
(clip-retrieval's layout, embedding columns of a dataset) are read as shards; the prototype stage makes passes over
them (:func:`hf_pds.prototypes.extract_prototypes_sharded`), holding one shard at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class PairShard:
    """One shard's arrays (memory-mapped or in memory); drop it after each pass, so that its pages are released.

    Attributes:
        image_embeds: ``[n_images, d]`` raw image embeddings (float16 or float32).
        text_embeds: ``[n_pairs, d_text]`` raw text embeddings, one row per pair (caption).
        caption_image: ``[n_pairs]`` row of ``image_embeds`` of each pair; None when pair ``i`` is image ``i``
            (clip-retrieval's layout: one caption per image).
    """

    image_embeds: np.ndarray
    text_embeds: np.ndarray
    caption_image: np.ndarray | None = None

    def image_of_pairs(self) -> np.ndarray:
        """The image row of each pair (``caption_image``, or ``0..n_pairs-1``)."""
        if self.caption_image is None:
            return np.arange(len(self.text_embeds))
        return np.asarray(self.caption_image)


@dataclass(frozen=True)
class ShardRef:
    """Where a shard is and how big, without reading it.

    Attributes:
        index: the shard's position among all shards (0, 1, ...); pairs are numbered shard after shard, in this
            order, so that a pair's global index is the same whichever process reads its shard.
        n_images: rows of its ``image_embeds``.
        n_pairs: rows of its ``text_embeds``.
        name: how messages name it (a file, ``img_emb/img_emb_3.npy``, or an entry's shard folder).
        load: opens the shard (memory-mapped where it is on disk).
    """

    index: int
    n_images: int
    n_pairs: int
    name: str
    load: Callable[[], PairShard]
