"""ONNX variants: export with a dynamic batch axis (FP32, FP16), and ONNX Runtime INT8 quantisation
(dynamic, and static QDQ calibrated on the calibration images, optionally after rewriting DenseNet's
pre-activation batch norms so the whole INT8 graph stays in ORT's NHWC layout).

The exported graph takes ImageNet-normalised input ``[N,3,224,224]``; the runner normalises
uint8 pixels on the device first, like every runner, so the graph is the plain network.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimize import BuildError
from optimize.registry import Precision, Technique, Variant
from optimize.techniques import BuildContext, Built

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 17


def export_onnx(model: nn.Module, path: Path, *, dtype: torch.dtype = torch.float32, opset: int = DEFAULT_OPSET) -> str:
    """Export ``model`` with a dynamic batch axis; return which exporter was used.

    TorchScript-based export (``dynamo=False``) is tried first: on DenseNet-121 with torch 2.14
    it exports in ~10 s and its graph ran ~25% faster on ONNX Runtime's CPU EP than the
    ``torch.export``-based exporter's (which takes ~35 s); the dynamo exporter is the fallback.
    """
    model = copy.deepcopy(model).to(dtype).eval()
    example = torch.zeros((2, 3, 224, 224), dtype=dtype)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        return "torchscript (dynamo=False)"
    except Exception as e:  # the legacy exporter may be removed in a later torch
        log.warning("TorchScript-based ONNX export failed (%s); trying the dynamo exporter", e)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=max(opset, 18),
    )
    if program is None:
        raise BuildError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(path))
    return "dynamo (torch.export)"


def _resolve_initializer(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> str | None:
    """The initializer behind ``name``, following ``Identity`` nodes (the exporter shares tensors that way)."""
    seen: set[str] = set()
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type != "Identity" or name in seen:
            return None
        seen.add(name)
        name = node.input[0]
    return name


def _sole_relu_conv(bn: Any, consumers: dict[str, list[Any]]) -> Any:
    """The ungrouped convolution that alone reads ``relu(bn)`` as its data input, else ``None``."""
    relus = consumers.get(bn.output[0], [])
    if len(relus) != 1 or relus[0].op_type != "Relu":
        return None
    after = consumers.get(relus[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "Conv" or after[0].input[0] != relus[0].output[0]:
        return None
    groups = next((attr.i for attr in after[0].attribute if attr.name == "group"), 1)
    return after[0] if groups == 1 else None


def fold_concat_batchnorms(src: Path, dst: Path) -> dict[str, int]:
    """Rewrite every batch norm that ONNX Runtime cannot fold (DenseNet's ``norm1`` on each
    concatenation, the transitions' ``norm`` and ``norm5``) into plain arithmetic, exactly.

    DenseNet is pre-activation: ``conv(relu(a * x + b))`` with a per-channel ``a`` and ``b``, where
    ``x`` is a concatenation. ORT folds a batch norm only into the convolution *before* it, so these
    stay ``BatchNormalization`` nodes, which have no NHWC or INT8 kernel: in a QDQ model each one
    costs a dequantise, an FP32 batch norm, a quantise and two layout transposes around ORT's NHWC
    INT8 convolutions (half the INT8 model's time on an AVX2 CPU). Where every ``a > 0`` and the
    ReLU feeds one convolution, ``relu(a*x + b) = a * relu(x + b/a)``, so ``a`` is folded into that
    convolution's input channels and only ``Add(x, b/a)`` is left, which quantises to one
    ``QLinearAdd`` and keeps the layout NHWC end to end. Otherwise (a non-positive scale, another
    consumer) the batch norm becomes ``Mul(a)`` + ``Add(b)``, still layout-agnostic. In FP32 the
    result equals the original up to float rounding; what INT8 changes is then checked by the
    fidelity gate.

    Returns:
        How many batch norms were folded into the next convolution (``folded``), turned into
        ``Mul`` + ``Add`` (``affine``), or left to ORT because a convolution precedes them (``kept``).

    Raises:
        BuildError: a batch norm's parameters are not constant.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def constant(name: str) -> Any:
        resolved = _resolve_initializer(name, inits, producers)
        if resolved is None:
            raise BuildError(f"batch-norm input {name!r} is not a constant; cannot fold it")
        return numpy_helper.to_array(inits[resolved])

    def sole_weight(conv: Any) -> str | None:
        """The conv's weight initializer, if nothing else reads it (or the Identity chain to it)."""
        name = conv.input[1]
        chain = [name]
        resolved = _resolve_initializer(name, inits, producers)
        while resolved is not None and chain[-1] != resolved:
            chain.append(producers[chain[-1]].input[0])
        if resolved is None or any(len(consumers.get(c, [])) != 1 for c in chain):
            return None
        return resolved

    stats = {"folded": 0, "affine": 0, "kept": 0}
    nodes: list[Any] = []
    extra: list[Any] = []
    for n in graph.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        before = producers.get(n.input[0])
        if before is not None and before.op_type == "Conv":
            stats["kept"] += 1  # ORT folds it into that convolution
            nodes.append(n)
            continue
        base = n.name or n.output[0]
        scale, bias, mean, var = (constant(i).astype(np.float64) for i in n.input[1:5])
        eps = next((attr.f for attr in n.attribute if attr.name == "epsilon"), 1e-5)
        a = scale / np.sqrt(var + eps)
        b = bias - mean * a
        conv = _sole_relu_conv(n, consumers)
        weight = sole_weight(conv) if conv is not None else None
        if conv is not None and weight is not None and bool((a > 0).all()):
            w = numpy_helper.to_array(inits[weight])
            folded = (w.astype(np.float64) * a.reshape(1, -1, *([1] * (w.ndim - 2)))).astype(w.dtype)
            inits[weight].CopyFrom(numpy_helper.from_array(folded, weight))
            shift = f"{base}/shift"
            extra.append(numpy_helper.from_array((b / a).astype(np.float32).reshape(1, -1, 1, 1), shift))
            nodes.append(helper.make_node("Add", [n.input[0], shift], [n.output[0]], name=f"{base}/add"))
            stats["folded"] += 1
        else:
            mul_c, add_c = f"{base}/scale", f"{base}/shift"
            extra.append(numpy_helper.from_array(a.astype(np.float32).reshape(1, -1, 1, 1), mul_c))
            extra.append(numpy_helper.from_array(b.astype(np.float32).reshape(1, -1, 1, 1), add_c))
            scaled = f"{n.output[0]}/scaled"
            nodes.append(helper.make_node("Mul", [n.input[0], mul_c], [scaled], name=f"{base}/mul"))
            nodes.append(helper.make_node("Add", [scaled, add_c], [n.output[0]], name=f"{base}/add"))
            stats["affine"] += 1
    graph.initializer.extend(extra)
    # Drop what only the old batch norms read (their parameters and the Identity nodes sharing them).
    live = {o.name for o in graph.output}
    kept_nodes: list[Any] = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept_nodes.append(node)
            live.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    unused = [t for t in graph.initializer if t.name not in live]
    for t in unused:
        graph.initializer.remove(t)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return stats


class _CalibrationReader:
    """Feeds the calibration images, normalised, one small batch at a time."""

    def __init__(self, images: torch.Tensor, batch: int = 4) -> None:
        from model_server.preprocess import normalize

        x = normalize(images)
        self._batches = iter([{INPUT_NAME: x[i : i + batch].numpy()} for i in range(0, x.shape[0], batch)])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - used by some ORT calibrators only
        pass


def _quantize(variant: Variant, ctx: BuildContext, fp32_path: Path, out_path: Path) -> dict[str, Any]:
    # onnxruntime.quantization logs every tensor it touches on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        return _quantize_quietly(variant, ctx, fp32_path, out_path)
    finally:
        root.setLevel(level)


def _quantize_quietly(variant: Variant, ctx: BuildContext, fp32_path: Path, out_path: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = fp32_path.with_name("model-pre.onnx")
    source, rewrite = fp32_path, None
    if variant.options.get("fold_concat_bn"):
        source = fp32_path.with_name("model-folded.onnx")
        rewrite = fold_concat_batchnorms(fp32_path, source)
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    if source != fp32_path:
        source.unlink()
    per_channel = bool(variant.options.get("per_channel", True))
    if variant.technique is Technique.DYNAMIC_QUANT:
        # ConvInteger on the CPU EP takes uint8 weights; activations are quantised per call.
        quantize_dynamic(str(pre), str(out_path), per_channel=per_channel, weight_type=QuantType.QUInt8)
        details = {
            "format": "QOperator (ConvInteger/MatMulInteger)",
            "weight_type": "uint8",
            "per_channel": per_channel,
        }
    else:
        quantize_static(
            str(pre),
            str(out_path),
            _CalibrationReader(ctx.calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        details = {
            "format": "QDQ",
            "activation_type": "uint8",
            "weight_type": "int8",
            "per_channel": per_channel,
            "calibration_images": int(ctx.calibration.shape[0]),
            "calibration_method": "minmax",
        }
        if rewrite is not None:
            # Every op ORT has an INT8 kernel for is quantised, the rewritten Add/Mul included
            # (QLinearAdd/QLinearMul), so nothing between two convolutions leaves NHWC INT8.
            details["batchnorm_rewrite"] = {
                **rewrite,
                "rule": "relu(a*x+b) = a*relu(x+b/a) for a > 0: a folded into the next conv, Add(b/a) left; "
                "else Mul(a)+Add(b)",
            }
    pre.unlink(missing_ok=True)
    return details


def build(variant: Variant, ctx: BuildContext) -> Built:
    opset = int(variant.options.get("opset", DEFAULT_OPSET))
    dtype = torch.float16 if variant.precision is Precision.FP16 else torch.float32
    if variant.precision is Precision.INT8:
        fp32 = ctx.out_dir / "model-fp32.onnx"
        exporter = export_onnx(ctx.reference, fp32, opset=opset)
        details = _quantize(variant, ctx, fp32, ctx.out_dir / "model.onnx")
        fp32.unlink()
    else:
        exporter = export_onnx(ctx.reference, ctx.out_dir / "model.onnx", dtype=dtype, opset=opset)
        details = {}
    details.update({"exporter": exporter, "opset": opset, "dynamic_batch": True})
    return Built(payload={"model": "model.onnx"}, devices=list(variant.devices), model=ctx.reference, details=details)
