"""lightning-weightlight: pruning, quantization and distillation as PyTorch Lightning callbacks."""

import logging as _logging

from lightning_weightlight import kernels
from lightning_weightlight.distillation import (
    DistillationModule,
    FeaturePair,
    IndexedDataset,
    compression_target,
    student_state_dict,
)
from lightning_weightlight.export import (
    CompressedFileError,
    CompressionError,
    compress,
    load_compressed,
    save_compressed,
)
from lightning_weightlight.kernels import (
    Int8Conv2d,
    Int8Linear,
    SparseConv2d,
    SparseInt8Conv2d,
    SparseInt8Linear,
    SparseLinear,
    build_deploy_module,
    choose_kernel,
)
from lightning_weightlight.pruning import (
    DynamicPruning,
    Iterative,
    OneShot,
    PolynomialDecay,
    WeightPruning,
)
from lightning_weightlight.pruning.structured import (
    StructuredPruning,
    load_structured_checkpoint,
)
from lightning_weightlight.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    convert,
    load_qat_checkpoint,
    quantize_model,
)
from lightning_weightlight.report import CompressionReport, CompressionReportCallback

# The callbacks' summaries are INFO records of this package's loggers. Like Lightning does for its
# own logger, show them on stderr unless the application configured logging itself.
_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False

__version__ = "0.1.0"

__all__ = [
    "CompressedFileError",
    "CompressionError",
    "CompressionReport",
    "CompressionReportCallback",
    "DistillationModule",
    "DynamicPruning",
    "FeaturePair",
    "IndexedDataset",
    "Int8Conv2d",
    "Int8Linear",
    "Iterative",
    "OneShot",
    "PolynomialDecay",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
    "SparseConv2d",
    "SparseInt8Conv2d",
    "SparseInt8Linear",
    "SparseLinear",
    "StructuredPruning",
    "WeightPruning",
    "__version__",
    "build_deploy_module",
    "choose_kernel",
    "compress",
    "compression_target",
    "convert",
    "kernels",
    "load_compressed",
    "load_qat_checkpoint",
    "load_structured_checkpoint",
    "quantize_model",
    "save_compressed",
    "student_state_dict",
]
