"""hf-pds: multimodal dataset distillation with prototype-guided data synthesis (PDS, ICLR 2026)."""

import logging
from importlib import import_module
from typing import TYPE_CHECKING

# Heavy modules (torch, diffusers, transformers) are imported on first use of a name, so that
# `import hf_pds` and the prototype engine stay quick to import.
_EXPORTS = {
    "PDSPipeline": "pipeline_pds",
    "PDSPipelineOutput": "distilled",
    "Prototypes": "prototypes",
    "extract_prototypes": "prototypes",
}

__all__ = ["PDSPipeline", "PDSPipelineOutput", "Prototypes", "__version__", "extract_prototypes"]

if TYPE_CHECKING:
    from .distilled import PDSPipelineOutput
    from .pipeline_pds import PDSPipeline
    from .prototypes import Prototypes, extract_prototypes


class _PilFallbackNotice(logging.Filter):
    """Drops transformers' notice that ``CLIPImageProcessor`` "requires torchvision" and falls back to
    ``CLIPImageProcessorPil``.

    It is printed when the name is first resolved, which diffusers' unCLIP module and every unCLIP checkpoint's
    ``model_index.json`` do, so it would open every command; no way of building the processor avoids it. Without
    torchvision the PIL processor is the one hf-pds means to use (and the one its embedding cache keys name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# Before transformers is imported (its loggers are plain ``logging`` loggers, so this imports nothing).
logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackNotice())


def __getattr__(name: str):
    if name == "__version__":
        from .hub import hf_pds_version

        return hf_pds_version()
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
