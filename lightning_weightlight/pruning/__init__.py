"""Pruning callbacks (weights and whole channels), their schedules and the functional core beneath them."""

from lightning_weightlight.pruning.dynamic import DynamicPruning
from lightning_weightlight.pruning.masks import (
    SparsityPattern,
    apply_masks,
    compute_masks,
    drop_and_grow,
    magnitude_scores,
    mask_sparsity,
    parse_pattern,
    random_scores,
)
from lightning_weightlight.pruning.schedules import Iterative, OneShot, PolynomialDecay, SparsitySchedule
from lightning_weightlight.pruning.structured import StructuredPruning, load_structured_checkpoint
from lightning_weightlight.pruning.weight import WeightPruning

__all__ = [
    "DynamicPruning",
    "Iterative",
    "OneShot",
    "PolynomialDecay",
    "SparsityPattern",
    "SparsitySchedule",
    "StructuredPruning",
    "WeightPruning",
    "apply_masks",
    "compute_masks",
    "drop_and_grow",
    "load_structured_checkpoint",
    "magnitude_scores",
    "mask_sparsity",
    "parse_pattern",
    "random_scores",
]
