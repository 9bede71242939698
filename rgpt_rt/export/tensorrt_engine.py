"""An FP16 TensorRT engine for vision.onnx, when TensorRT is installed (TensorRT 10 Python API).

    status = tensorrt_status()          # "TensorRT 10.x" or "TensorRT not installed: ONNX only"
    path = build_vision_engine(onnx_path, out_dir, image_size=336, max_batch=8, timing_cache=...)

The engine file is named for the GPU and the TensorRT version, since engines only run on the
device and version that built them. A timing cache beside the build is reused across builds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rgpt_rt.export.onnx_vision import INPUT_NAME

NOT_INSTALLED = "TensorRT not installed: ONNX only"


def tensorrt_status() -> str:
    try:
        import tensorrt
    except ImportError:
        return NOT_INSTALLED
    return f"TensorRT {tensorrt.__version__}"


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def engine_name(device_name: str, trt_version: str) -> str:
    return f"vision.{device_slug(device_name)}.trt{trt_version}.engine"


def build_vision_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    image_size: int,
    max_batch: int,
    workspace_bytes: int,
    timing_cache: Path,
) -> tuple[Path, dict[str, object]]:
    """Parse vision.onnx, build an FP16 engine with one optimisation profile for batch
    1..max_batch (optimum at max(1, max_batch // 2)), and serialise it into out_dir.
    Returns the engine path and what the manifest records about it."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA device to build an engine; none is visible")
    device_name = torch.cuda.get_device_name(0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(
        INPUT_NAME, (1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape)
    )
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the vision engine (see the log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))

    path = out_dir / engine_name(device_name, trt.__version__)
    # written beside, then renamed over: a file of that name (a hard link into the bundle being
    # replaced, add_engine.py) is replaced, never written through
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, path)
    info = {
        "device": device_name,
        "tensorrt": trt.__version__,
        "precision": "fp16",
        "profile": {"min": 1, "opt": max(1, max_batch // 2), "max": max_batch},
    }
    return path, info
