"""Benchmarks of the bundle, each run as ``python -m benchmarks.NAME`` and writing a table and a plot.

* :mod:`benchmarks.training`: training step speed, beside a plain PyTorch DLRM step.
* :mod:`benchmarks.reading`: reading and encoding Criteo TSV.
* :mod:`benchmarks.runtimes`: ONNX Runtime, TorchScript and eager PyTorch on an export dir.
* :mod:`benchmarks.serving`: a real TorchServe under load, beside the in-process limit.

All four head their tables with :func:`benchmarks.common.machine_header` and
time variants in turns with :func:`benchmarks.common.time_side_by_side`.
"""
