"""Benchmarks of the bundle, each run as ``python -m benchmarks.NAME`` and writing a table and a plot.

* :mod:`benchmarks.training`: training step speed, beside a plain PyTorch DLRM step.
* :mod:`benchmarks.reading`: reading and encoding Criteo TSV.
* :mod:`benchmarks.runtimes`: ONNX Runtime, TorchScript and eager PyTorch on an export dir.
* :mod:`benchmarks.serving`: a real TorchServe under load, beside the in-process limit.
"""
