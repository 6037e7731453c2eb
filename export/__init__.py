"""Export: checkpoint -> TorchScript / ONNX artifacts with proven parity, and their benchmark.

``python -m export CHECKPOINT_DIR`` writes the export dir;
``python -m benchmarks.runtimes EXPORT_DIR`` measures every runtime on it.
"""
