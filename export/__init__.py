"""Workstation side: train the extractor, export it to ONNX and write the model package."""
