"""The embedded default job: scikit-learn's handwritten digits and two reference classifiers."""

from lightning_weightlight.demo.data import DigitsDataModule
from lightning_weightlight.demo.models import DigitsClassifier, DigitsCNN, DigitsMLP

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "DigitsMLP"]
