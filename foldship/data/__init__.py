"""Evaluation and calibration data: labelled images in, normalised NCHW tensors out."""
from .datasets import CalibrationImages, ImageSet, calibration_images, load_images

__all__ = ["ImageSet", "load_images", "calibration_images", "CalibrationImages"]
