"""Write the serving module as TorchScript, ONNX, INT8 ONNX and AOTInductor (``.pt2``) artifacts.

Each function writes one file and returns its path; none of them judges the
result: :mod:`export.parity` does, on the file as written, so what is checked
is exactly what the archive step will pack.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

ONNX_OPSET = 18
INPUT_NAMES = ("dense", "sparse")
OUTPUT_NAME = "probability"


def export_torchscript(
    module: nn.Module, path: str | os.PathLike[str], *, example: tuple[torch.Tensor, torch.Tensor]
) -> Path:
    """Script (not trace: no shape is baked in), freeze, save.

    Freezing inlines the parameters as constants and folds what depends only
    on them, so the saved graph has no attribute lookups left. We stop there:
    ``torch.jit.optimize_for_inference`` converts Linear layers to MKLDNN
    layouts, which was slower at small batches here and changes numerics.
    """
    scripted = torch.jit.script(module.eval())
    frozen = torch.jit.freeze(scripted)
    with torch.inference_mode():
        frozen(*example)  # fail here, not in the parity check, if the scripted graph cannot run
    path = Path(path)
    frozen.save(os.fspath(path))
    return path


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    example: tuple[torch.Tensor, torch.Tensor],
    opset: int = ONNX_OPSET,
    output_name: str = OUTPUT_NAME,
) -> Path:
    """``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch.

    Inputs ``dense`` float32[B, D] and ``sparse`` int64[B, S], output
    ``output_name`` (a ranker's ``probability`` float32[B] by default). Weights stay inside the one file so the
    archive carries a single artifact. Checked with ``onnx.checker``.
    """
    if opset < 17:
        raise ValueError(f"ONNX opset must be >= 17, got {opset}")
    batch = torch.export.Dim("batch")
    path = Path(path)
    exporter_logger = logging.getLogger("torch.onnx")
    previous_level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and similar chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # axis renaming and deprecation warnings
            torch.onnx.export(
                module.eval(),
                example,
                os.fspath(path),
                input_names=list(INPUT_NAMES),
                output_names=[output_name],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                dynamic_shapes={INPUT_NAMES[0]: {0: batch}, INPUT_NAMES[1]: {0: batch}},
            )
    finally:
        exporter_logger.setLevel(previous_level)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return path


def export_pt2(
    module: nn.Module, path: str | os.PathLike[str], *, example: tuple[torch.Tensor, torch.Tensor]
) -> Path:
    """``torch.export`` with a dynamic batch, compiled by AOTInductor into a ``.pt2`` package.

    The package holds the graph compiled to C++ kernels in a shared library
    (with the weights inside), for the CPU this runs on: its instruction set
    (for example AVX512) is baked in, and loading needs no compiler, only
    torch. Compiling needs a C++ compiler and takes tens of seconds
    (``torch._inductor`` prints what it runs when it fails).
    """
    from torch._inductor import aoti_compile_and_package

    batch = torch.export.Dim("batch")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must be named *.pt2, got {path.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree deprecation warnings from inside torch
        program = torch.export.export(
            module.eval(), example, dynamic_shapes={INPUT_NAMES[0]: {0: batch}, INPUT_NAMES[1]: {0: batch}}
        )
        aoti_compile_and_package(program, package_path=os.fspath(path))
    return path


def quantize_int8(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized per call.

    ``nn.Linear`` exports as ``Gemm``, which ORT's dynamic quantizer leaves in
    float, so Gemm is first rewritten as MatMul + Add (:func:`_gemm_to_matmul`);
    the quantizer then fuses each into a ``DynamicQuantizeMatMul`` (int8 GEMM
    with VNNI where the CPU has it). Embedding Gathers are quantized too,
    which makes the file about 4x smaller; the AUC change is what the export
    report judges.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    staged = out_path.with_suffix(".matmul.onnx")
    try:
        model = onnx.load(os.fspath(onnx_path))
        onnx.save(_gemm_to_matmul(model), os.fspath(staged))
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "consider pre-processing" noise
        quantize_dynamic(
            os.fspath(staged),
            os.fspath(out_path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
        )
    finally:
        staged.unlink(missing_ok=True)
    onnx.checker.check_model(os.fspath(out_path))
    return out_path


def _gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm(x, W, b, transB=1)`` as ``MatMul(x, W^T) + b`` so it can be quantized.

    Only the form the exporter emits for ``nn.Linear`` (alpha = beta = 1,
    no transA, an initializer weight) is rewritten; anything else is kept.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if weight is None or not plain:
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weight)
        if attrs.get("transB", 0):
            matrix = matrix.T.copy()
        transposed = numpy_helper.from_array(matrix, name=f"{weight.name}__kn")
        graph.initializer.append(transposed)
        if len(node.input) > 2 and node.input[2]:
            product = f"{node.output[0]}__matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], transposed.name], [product], name=f"{node.name}_matmul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], transposed.name], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model
