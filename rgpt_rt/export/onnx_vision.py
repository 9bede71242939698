"""The vision graph as ONNX: CLIP + refinement + patch merge + connector on the global tokens.

    export_vision_onnx(side, bundle_dir, max_batch=8)   # vision.onnx -> image_embeds [B,g²,D], hires [B,4g,4g,C]
    unsupported_ops(bundle_dir / "vision.onnx")         # [] when TensorRT's ONNX parser takes every node
    references = reference_outputs(side, seed=1)                   # torch, fp32 and fp64
    parity = onnx_parity(bundle_dir / "vision.onnx", references)   # ONNX Runtime against them

The graph's weights are the bundle's fp16 tensors: vision.onnx refers to them inside
vision.safetensors and connector.safetensors (ONNX external data: file, offset, length), so a
7B bundle stores its 0.6 GB of vision weights once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rgpt_rt.bundle import BUILD_ID_KEY
from rgpt_rt.safetensors_io import read_header, write_safetensors

OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("image_embeds", "hires")
# A float initializer of the graph this large must be a bundle tensor (no weight is stored twice).
INLINE_LIMIT = 4096

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


def export_vision_onnx(
    side, folder: Path, max_batch: int = 8, opset: int = OPSET, build_id: str = ""
) -> dict[str, int]:
    """Write vision.safetensors, connector.safetensors and vision.onnx into `folder` for a
    VisionSide after `prepare_for_export()`: the graph (pixel_values -> image_embeds, hires,
    dynamic batch in [1, max_batch]) computes in fp32 on fp16 weights, which it reads from the
    two safetensors files (external data at their offsets; a Cast to fp32 after each), so the
    weights are stored once. Returns {file: bytes the graph points at}."""
    import onnx

    folder = Path(folder)
    tensors = side.bundle_tensors()
    files = {"vision": folder / "vision.safetensors", "connector": folder / "connector.safetensors"}
    metadata = {"format": "rgpt_rt.vision", "dtype": "float16", BUILD_ID_KEY: build_id}
    for part, path in files.items():
        write_safetensors(path, tensors[part], metadata)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        raw = Path(scratch) / "raw.onnx"
        _torch_export(side, raw, max_batch, opset)
        model = onnx.load(str(raw), load_external_data=False)
        pointed = _point_at_bundle(model, side, files, Path(scratch))
    _drop_stack_traces(model)
    model.metadata_props.add(key=BUILD_ID_KEY, value=build_id)
    onnx.save(model, str(folder / "vision.onnx"))
    return pointed


def _drop_stack_traces(model) -> None:
    """The exporter records each node's Python stack, with the build machine's absolute paths:
    a bundle must not carry them, and the same source built in another folder must give the same
    graph."""
    graphs = [model.graph] + [function for function in model.functions]
    for graph in graphs:
        for node in graph.node:
            kept = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _torch_export(side, path: Path, max_batch: int, opset: int) -> None:
    size = side.config.vision.image_size
    example = torch.randn(2 if max_batch >= 2 else 1, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            side,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(getattr(side, "output_names", OUTPUT_NAMES)),  # osprey: 5 outputs
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=True,  # weights beside the graph, never the 2 GB protobuf limit
        )


def _point_at_bundle(model, side, files: dict[str, Path], scratch: Path) -> dict[str, int]:
    """Replace each initializer that is a bundle tensor (by name, or by value: the exporter
    folds some into copies, e.g. the position embedding gathered at positions 0..g²) by an fp16
    external reference into its safetensors file and a Cast to fp32 under the original name;
    keep the rest (small constants) inline. Refuses a graph weight that is no bundle tensor."""
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    by_name, by_value = {}, {}
    for part, path in files.items():
        header, _, start = read_header(path)
        with open(path, "rb") as handle:
            for name, entry in header.items():
                where = (path.name, start + entry.start, entry.end - entry.start)
                by_name[name if part == "vision" else f"connector.{name}"] = where
                handle.seek(where[1])
                by_value[hashlib.sha256(handle.read(where[2])).hexdigest()] = where
    kept, casts, pointed = [], [], {path.name: 0 for path in files.values()}
    for init in model.graph.initializer:
        where = by_name.get(side.bundle_name(init.name) or "")
        if where is None:
            if init.data_location == TensorProto.EXTERNAL:
                external_data_helper.load_external_data_for_tensor(init, str(scratch))
                init.data_location = TensorProto.DEFAULT
                del init.external_data[:]
            if init.data_type == TensorProto.FLOAT and _numel(init) >= INLINE_LIMIT:
                half = numpy_helper.to_array(init).astype(np.float16)
                where = by_value.get(hashlib.sha256(half.tobytes()).hexdigest())
                if where is None:
                    raise ValueError(
                        f"vision graph weight {init.name} {list(init.dims)} is not a bundle "
                        "tensor; the exporter would store it twice"
                    )
            else:
                kept.append(init)
                continue
        location, offset, length = where
        if _numel(init) * 2 != length:
            raise ValueError(
                f"{init.name} {list(init.dims)} does not fit {length} bytes of {location}"
            )
        half = TensorProto(name=init.name + "_fp16", data_type=TensorProto.FLOAT16, dims=init.dims)
        half.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            half.external_data.add(key=key, value=str(value))
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        pointed[location] += length
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)
    return pointed


def _numel(init) -> int:
    count = 1
    for dim in init.dims:
        count *= dim
    return count


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


@dataclass
class Reference:
    """Fresh images and what the torch function computes of them, in fp32 and in fp64."""

    pixels: torch.Tensor  # [B, 3, S, S]
    fp32: tuple[torch.Tensor, torch.Tensor]  # image_embeds, hires
    fp64: tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def reference_outputs(
    vision, *, seed: int, exact=None, batch_sizes: tuple[int, ...] = (1, 2)
) -> list[Reference]:
    """`vision` (a torch function pixels -> (image_embeds, hires) with a .config) on fresh random
    images, in fp32 and in float64. `exact`: makes a float64 twin (called after the fp32 runs,
    dropped after its own); default: `vision` itself (a module) turned to float64 in place and
    back, which is exact (its weights are fp16 values) and never holds two copies of them."""
    size = vision.config.vision.image_size
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(b, 3, size, size, generator=generator) for b in batch_sizes]
    fp32 = [_flat(vision(pixels)) for pixels in images]
    if exact is None:
        vision.double()
        try:
            fp64 = [_flat(vision(pixels.double())) for pixels in images]
        finally:
            vision.float()
    else:
        twin = exact()
        fp64 = [_flat(twin(pixels.double()), torch.float64) for pixels in images]
        del twin
    return [Reference(p, a, b) for p, a, b in zip(images, fp32, fp64)]


def _flat(outputs, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """(image_embeds, hires) or (image_embeds, (res2..res5)) -> a flat tuple on the CPU, in
    the graph's output order."""
    flat = []
    for output in outputs:
        flat += list(output) if isinstance(output, tuple | list) else [output]
    return tuple(t.to("cpu", dtype) for t in flat)


def onnx_parity(path: str | Path, references: list[Reference]) -> dict[str, float]:
    """ONNX Runtime (CPU, fp32 on the file's fp16 weights) against the torch references.

    Tolerance from the precision: ONNX Runtime may fuse and reorder fp32 arithmetic, so its
    error against the float64 run may be at most 4x the error of torch's own fp32 run against
    it, plus 1e-6 of the output scale for ties at tiny errors."""
    session = onnx_session(path)
    names = [output.name for output in session.get_outputs()]  # the graph's, in the torch order
    worst = {"max_abs": 0.0, "max_rel": 0.0, "torch_fp32_max_abs": 0.0, "tolerance": 0.0}
    for reference in references:
        got = session.run(names, {INPUT_NAME: reference.pixels.numpy()})
        for name, onnx_out, torch_out, true_out in zip(names, got, reference.fp32, reference.fp64):
            true_np = true_out.numpy()
            scale = float(np.abs(true_np).max())
            abs_err = float(np.abs(onnx_out - true_np).max())
            torch_err = float((torch_out.double() - true_out).abs().max())
            tolerance = 4 * torch_err + 1e-6 * scale
            batch = reference.pixels.shape[0]
            if abs_err > tolerance:
                raise ValueError(
                    f"ONNX Runtime {name} differs from the torch reference by {abs_err:.3g} "
                    f"(tolerance {tolerance:.3g}, batch {batch})"
                )
            worst["max_abs"] = max(worst["max_abs"], abs_err)
            worst["max_rel"] = max(worst["max_rel"], abs_err / max(scale, 1e-30))
            worst["torch_fp32_max_abs"] = max(worst["torch_fp32_max_abs"], torch_err)
            worst["tolerance"] = max(worst["tolerance"], tolerance)
    return worst
