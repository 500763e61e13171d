"""Evaluation of distilled sets: retrieval metrics, the PDS student protocol, coreset baselines, reports.

``retrieval_metrics`` and the coreset selection are plain numpy; everything that needs torch (the student) or
an optional package (the real encoders) is imported on first use of its name, so that
``import hf_pds.evaluation`` stays light and never imports timm.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "retrieval_metrics": "metrics",
    "retrieval_metrics_from_features": "metrics",
    "select_coreset": "coreset",
    "pds_select": "coreset",
    "pick_captions": "coreset",
    "coverage_radius": "coreset",
    "CORESET_METHODS": "coreset",
    "StudentConfig": "student",
    "StudentRun": "student",
    "RetrievalSplit": "student",
    "train_student": "student",
    "train_students": "student",
    "summarize": "report",
    "TrainingPool": "runner",
    "method_pairs": "runner",
    "run_method": "runner",
    "run_grid": "runner",
    "encode_split": "runner",
    "load_image_encoder": "encoders",
    "load_text_encoder": "encoders",
    "encode_cached": "encoders",
    "write_report": "report",
    "summarize_records": "report",
    "markdown_table": "report",
}
_RENAMED = {"CORESET_METHODS": "METHODS"}

__all__ = [
    "CORESET_METHODS",
    "RetrievalSplit",
    "StudentConfig",
    "StudentRun",
    "TrainingPool",
    "coverage_radius",
    "encode_cached",
    "encode_split",
    "load_image_encoder",
    "load_text_encoder",
    "markdown_table",
    "method_pairs",
    "pds_select",
    "pick_captions",
    "retrieval_metrics",
    "retrieval_metrics_from_features",
    "run_grid",
    "run_method",
    "select_coreset",
    "summarize",
    "summarize_records",
    "train_student",
    "train_students",
    "write_report",
]

if TYPE_CHECKING:
    from .coreset import coverage_radius, pds_select, pick_captions, select_coreset
    from .encoders import encode_cached, load_image_encoder, load_text_encoder
    from .metrics import retrieval_metrics, retrieval_metrics_from_features
    from .report import markdown_table, summarize, summarize_records, write_report
    from .runner import TrainingPool, encode_split, method_pairs, run_grid, run_method
    from .student import RetrievalSplit, StudentConfig, StudentRun, train_student, train_students


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
