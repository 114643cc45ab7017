"""Quantization: configuration, calibration data sources, methods and the accuracy report."""
