"""Decoders: the models that turn an image prototype (and its caption) into an image, one module per family.

Each family (a :class:`~hf_pds.decoders.base.Decoder`) declares its diffusers pipeline, the CLIP model whose towers
embed, prune, cluster and match (the space the decoder reads), how a prototype and its caption become the
pipeline's arguments, and its authors' defaults. ``PDSPipeline.from_pretrained`` recognises a checkpoint's family
from the ``_class_name`` of its ``model_index.json``.
"""

from __future__ import annotations

from .base import Decoder
from .flux import FluxIPAdapterDecoder
from .ip_adapter import IPAdapterDecoder, IPAdapterXLDecoder
from .kandinsky import KandinskyDecoder
from .select import SelectDecoder
from .unclip import UnCLIPDecoder

# In the order infer_decoder tries them: a family whose components include another's comes first.
DECODERS: dict[str, type[Decoder]] = {
    decoder.name: decoder
    for decoder in (
        UnCLIPDecoder,
        KandinskyDecoder,
        FluxIPAdapterDecoder,
        IPAdapterXLDecoder,
        IPAdapterDecoder,
        SelectDecoder,
    )
}


def decoder_named(name: str) -> type[Decoder]:
    """The decoder family called ``name``; ``ValueError`` naming the families otherwise."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {name!r}.")
    return DECODERS[name]


def decoder_of_class(class_name: str, name_or_path) -> type[Decoder]:
    """The decoder family of a checkpoint whose ``model_index.json`` names ``class_name``."""
    for decoder in DECODERS.values():
        if class_name in decoder.model_index_classes:
            return decoder
    known = sorted(name for decoder in DECODERS.values() for name in decoder.model_index_classes)
    raise ValueError(
        f"{name_or_path} is a {class_name} checkpoint, which no hf-pds decoder reads: give a PDSPipeline folder, "
        f"a checkpoint of one of {', '.join(known)}, or 'select'."
    )


def infer_decoder(components: dict) -> type[Decoder]:
    """The family of a set of ``PDSPipeline`` components built by hand (or saved before decoders were named)."""
    for decoder in DECODERS.values():
        if decoder.components and all(components.get(name) is not None for name in decoder.components):
            return decoder
    return SelectDecoder
