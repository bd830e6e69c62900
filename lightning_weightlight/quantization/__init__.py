"""Quantization-aware training, post-training quantization and the conversion to deploy modules."""

from lightning_weightlight.quantization.convert import convert, deploy_module
from lightning_weightlight.quantization.deploy import Float16Weight, Int16x8, WeightOnlyQuantized
from lightning_weightlight.quantization.fake_quant import (
    ActivationFakeQuantize,
    CalibrationError,
    Observer,
    WeightFakeQuantize,
    fake_quantize,
    fake_quantize_per_row,
    fake_quantize_weight,
    weight_scale,
)
from lightning_weightlight.quantization.modules import (
    QATConfig,
    QATConv2d,
    QATConvBn2d,
    QATEmbedding,
    QATLinear,
)
from lightning_weightlight.quantization.ptq import (
    PostTrainingQuantization,
    QuantizationResult,
    quantize_model,
)
from lightning_weightlight.quantization.qat import (
    QuantizationAwareTraining,
    apply_qat_record,
    load_qat_checkpoint,
    prepare_qat,
    restore_qat_layers,
)

__all__ = [
    "ActivationFakeQuantize",
    "CalibrationError",
    "Float16Weight",
    "Int16x8",
    "Observer",
    "PostTrainingQuantization",
    "QATConfig",
    "QATConv2d",
    "QATConvBn2d",
    "QATEmbedding",
    "QATLinear",
    "QuantizationAwareTraining",
    "QuantizationResult",
    "WeightFakeQuantize",
    "WeightOnlyQuantized",
    "apply_qat_record",
    "convert",
    "deploy_module",
    "fake_quantize",
    "fake_quantize_per_row",
    "fake_quantize_weight",
    "load_qat_checkpoint",
    "prepare_qat",
    "quantize_model",
    "restore_qat_layers",
    "weight_scale",
]
