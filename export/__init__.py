"""Export: checkpoint -> TorchScript / ONNX artifacts with proven parity, and their benchmark.

``python -m export CHECKPOINT_DIR`` writes the export dir;
``python -m export.benchmark EXPORT_DIR`` measures every backend on it.
"""
