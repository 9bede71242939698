"""Re-verify a bundle from its own files (what `python export/build_engine.py --check B` runs).

    report = check_bundle(Path("build/bundles/tiny"))     # raises BundleError on any problem

1. the manifest, every file's size and sha256, nothing unlisted (rgpt_rt.bundle.verify_bundle);
2. the graph: the ONNX checker and the operators TensorRT's parser takes;
3. every weight against config.json's shapes: the vision tensors, and each tensor of
   llm.safetensors (read from its header, nothing loaded);
4. vision parity on fresh random images: vision.onnx in ONNX Runtime against the runtime's own
   torch backend over vision.safetensors (the weights the graph points at), float64 beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rgpt_rt.bundle import LLM_FILE, BundleError, verify_bundle
from rgpt_rt.export.llama_source import expected_shapes
from rgpt_rt.export.llm import linear_shapes
from rgpt_rt.export.onnx_vision import check_onnx_graph, onnx_parity, reference_outputs
from rgpt_rt.ops.int4_format import METADATA_KEY
from rgpt_rt.safetensors_io import read_header


def check_bundle(
    folder: Path, seed: int | None = None, sha256: str | None = None
) -> dict[str, Any]:
    """Every check of the module docstring; the report says what each found."""
    folder = Path(folder)
    manifest = verify_bundle(folder, sha256=sha256)
    report: dict[str, Any] = {
        "files": len(manifest.files),
        "hashes": "ok",
        "sha256": manifest.sha256,
    }
    config = manifest.config
    try:
        report["graph"] = check_onnx_graph(folder / "vision.onnx")["ops"]
    except Exception as error:  # the onnx checker raises its own types
        raise BundleError(f"{folder}/vision.onnx fails the ONNX checker: {error}") from None
    report["llm_tensors"] = check_llm_shapes(folder, config)
    from rgpt_rt.runtime.vision import torch_backend

    vision_files = (folder / "vision.safetensors", folder / "connector.safetensors")
    cpu = torch.device("cpu")
    fresh_seed = seed if seed is not None else int(time.time()) % 100_000
    try:
        backend = torch_backend(config)
        references = reference_outputs(
            backend.from_files(config, cpu, *vision_files),
            seed=fresh_seed,
            exact=lambda: backend.from_files(config, cpu, *vision_files, torch.float64),
        )
    except ValueError as error:
        raise BundleError(str(error)) from None
    try:
        report["parity"] = onnx_parity(folder / "vision.onnx", references)
    except ValueError as error:
        raise BundleError(f"{folder}: vision.onnx fails parity on fresh inputs: {error}") from None
    report["seed"] = fresh_seed
    return report


def check_llm_shapes(folder: Path, config) -> int:
    """Every tensor of llm.safetensors has the shape config.json implies (stacked linears,
    INT4 codes/scales/zeros); returns how many were checked."""
    path = folder / LLM_FILE
    entries, metadata, _ = read_header(path)
    expected = {
        name: shape
        for name, shape in expected_shapes(config.llm).items()
        if not any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and not any(f".{p}." in name for p in ("gate_proj", "up_proj", "down_proj"))
    }
    table = json.loads(metadata.get(METADATA_KEY, "{}"))
    for i in range(config.llm.num_layers):
        for part, (n, k) in linear_shapes(config.llm).items():
            name = f"model.layers.{i}.{part}"
            if not table:
                expected[name + ".weight"] = (n, k)
            elif tuple(table.get(name, {}).get("shape", ())) != (n, k):
                raise BundleError(
                    f"{folder.name}: config.json implies INT4 {name} {[n, k]} but {LLM_FILE} "
                    f"describes {table.get(name, {}).get('shape', 'nothing')}"
                )
    for name, shape in expected.items():
        got = entries.get(name)
        if got is None or tuple(got.shape) != shape:
            held = list(got.shape) if got is not None else "nothing"
            raise BundleError(
                f"{folder.name}: config.json implies {name} {list(shape)} but {LLM_FILE} holds {held}"
            )
    return len(entries)
