"""Mask R-CNN for Keras 3 / TensorFlow 2 with the Edge Agreement Head."""

__version__ = "0.1.0"
