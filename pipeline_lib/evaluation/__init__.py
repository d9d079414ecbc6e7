"""Evaluation: clean accuracy and attacks on a trained model."""

from .accuracy import accuracy, predict

__all__ = ["accuracy", "predict"]
