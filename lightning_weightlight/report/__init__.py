"""Compression reports: dense against compressed, as tables, JSON, a plot, and a callback at fit end."""

from lightning_weightlight.report.callback import CompressionReportCallback
from lightning_weightlight.report.compression_report import (
    CompressionReport,
    LayerSummary,
    ModelSummary,
    measure_latency,
)

__all__ = [
    "CompressionReport",
    "CompressionReportCallback",
    "LayerSummary",
    "ModelSummary",
    "measure_latency",
]
