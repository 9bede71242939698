"""The vision graph as ONNX: CLIP + refinement + patch merge + connector on the global tokens.

export_vision_onnx(model, "vision.onnx", max_batch=8)     # pixel_values [B,3,S,S] -> image_embeds [B,g²,D], hires [B,4g,4g,C]
unsupported_ops("vision.onnx")                            # [] when TensorRT's ONNX parser takes every node
parity = onnx_parity(model, "vision.onnx", seed=1)        # ONNX Runtime against RGPT.encode_image on fresh images
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("image_embeds", "hires")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a model at 2 GB: larger weights go beside it

# Operators the exporter may emit: each is supported by TensorRT's ONNX parser (TensorRT 8.6
# and 10.x, operators.md of onnx-tensorrt) for the float types and static-weight cases
# this graph uses. A node outside this list fails the export check before any engine build.
TENSORRT_ONNX_OPS = frozenset(
    [
        "Abs",
        "Add",
        "AveragePool",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Div",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "Gemm",
        "GlobalAveragePool",
        "Greater",
        "Identity",
        "LayerNormalization",
        "Less",
        "Log",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceMax",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Tile",
        "Transpose",
        "Unsqueeze",
        "Where",
    ]
)


class VisionGraph(nn.Module):
    """What vision.onnx computes: RGPT.encode_image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pixel_values: [B, 3, S, S] -> image_embeds [B, g*g, D], hires [B, 4g, 4g, C]
        return self.model.encode_image(pixel_values)


def export_vision_onnx(model, path: str | Path, max_batch: int = 8, opset: int = OPSET) -> Path:
    """Export RGPT.encode_image (fp32) with a dynamic batch dimension in [1, max_batch]."""
    path = Path(path)
    size = model.config.vision.image_size
    graph = VisionGraph(model).eval().float()
    example = torch.randn(2 if max_batch >= 2 else 1, 3, size, size)
    weight_bytes = sum(p.numel() * 4 for p in graph.parameters())
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
        )
    return path


def onnx_ops(path: str | Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def unsupported_ops(path: str | Path) -> list[str]:
    """Operators of the graph that TensorRT's ONNX parser is not known to take."""
    return sorted(set(onnx_ops(path)) - TENSORRT_ONNX_OPS)


def check_onnx_graph(path: str | Path) -> dict[str, object]:
    """onnx.checker, the operator list, and the input/output shapes (batch dynamic, rest static)."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(str(path))  # a path, so models with external data are checked too
    bad = unsupported_ops(path)
    if bad:
        raise ValueError(f"{path.name} uses operators TensorRT's ONNX parser does not take: {bad}")
    model = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if any(isinstance(d, str) for d in dims[1:]) or not isinstance(dims[0], str):
            raise ValueError(
                f"{path.name}: {value.name} has shape {dims}; only the batch dimension may be dynamic"
            )
        shapes[value.name] = dims
    return {"opset": model.opset_import[0].version, "shapes": shapes, "ops": onnx_ops(path)}


def onnx_session(path: str | Path, device: str = "cpu"):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def onnx_parity(
    model, path: str | Path, *, seed: int, batch_sizes: tuple[int, ...] = (1, 2)
) -> dict[str, float]:
    """ONNX Runtime (CPU, fp32) against the PyTorch reference on fresh random images.

    Tolerance from the precision: ONNX Runtime may fuse and reorder fp32 arithmetic, so its
    error against a float64 run of the same model may be at most 4x the error of PyTorch's own
    fp32 run against float64, plus 1e-6 of the output scale for ties at tiny errors."""
    session = onnx_session(path)
    reference = VisionGraph(model).eval()
    exact = VisionGraph(_float64_copy(model)).eval()
    size = model.config.vision.image_size
    generator = torch.Generator().manual_seed(seed)
    worst = {"max_abs": 0.0, "max_rel": 0.0, "torch_fp32_max_abs": 0.0, "tolerance": 0.0}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels.numpy()})
        with torch.no_grad():
            ours = reference(pixels.float())
            truth = exact(pixels.double())
        for name, onnx_out, torch_out, true_out in zip(OUTPUT_NAMES, got, ours, truth):
            true_np = true_out.numpy()
            scale = float(np.abs(true_np).max())
            abs_err = float(np.abs(onnx_out - true_np).max())
            torch_err = float((torch_out.double() - true_out).abs().max())
            tolerance = 4 * torch_err + 1e-6 * scale
            if abs_err > tolerance:
                raise ValueError(
                    f"ONNX Runtime {name} differs from the reference by {abs_err:.3g} "
                    f"(tolerance {tolerance:.3g}, batch {batch}); the export is wrong"
                )
            worst["max_abs"] = max(worst["max_abs"], abs_err)
            worst["max_rel"] = max(worst["max_rel"], abs_err / max(scale, 1e-30))
            worst["torch_fp32_max_abs"] = max(worst["torch_fp32_max_abs"], torch_err)
            worst["tolerance"] = max(worst["tolerance"], tolerance)
    return worst


def _float64_copy(model):
    """A float64 copy of the vision stages only (the LLM is not copied: for the 7B model it
    would be 27 GB in float64)."""
    import copy

    llm = model.llm
    model.llm = None
    try:
        twin = copy.deepcopy(model)
    finally:
        model.llm = llm
    return twin.double()
