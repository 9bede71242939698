"""Quantize a large HF LLaMA checkpoint to `llm.safetensors`, streaming one tensor at a time.

    quantize_checkpoint(src_folder, dst_folder, group_size=128) -> Path to dst_folder
    load_int4_checkpoint(dst_folder) -> Int4Checkpoint(int4={...}, tensors={...}, config={...})
    convert_quantized_folder(awq_or_gptq_folder, dst_folder)   # same output from an AWQ/GPTQ folder

The source is config.json + model.safetensors, or shards + model.safetensors.index.json.
Every 2-D `*.weight` becomes an Int4Weight (RTN, layout n16k64) except the ones kept in fp16
(embed_tokens, lm_head by default); every other tensor (norms, embeddings, lm_head) is stored
as fp16 (non-float tensors as they are). Tensors are read with plain file reads (no mmap:
nothing of the source stays resident), in layer order, one at a time, quantized in blocks of rows, and written straight into the
output file, whose header is computed up front from the shapes. Peak memory is therefore about
one source tensor in fp16, its INT4 output, and the fp32 temporaries of a block of rows — about
one layer, never the model. tests/quant/test_int4_checkpoint.py measures it on a 120 MiB
checkpoint: ~19 MiB, 1.4× one of its layers (fixed allocator overheads weigh more on a small
model); for LLaMA-7B the same arithmetic gives ~0.15 GB against 0.4 GB per layer (not measured).
The output folder appears complete or not at all (rgpt_rt.atomic.atomic_directory), replacing
any folder already at that path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.bundle import LLM_FILE
from rgpt_rt.ops import int4_layout as layout
from rgpt_rt.ops.int4_format import (
    FORMAT_VERSION,
    LAYOUT,
    Int4Weight,
    int4_entries,
    int4_metadata,
    int4_tensors,
    load_int4,
)
from rgpt_rt.quant.rtn import rtn_codes
from rgpt_rt.safetensors_io import SafetensorsWriter, TensorEntry, read_header, read_tensor

KEEP_FP16 = ("embed_tokens", "lm_head")
ROWS_PER_BLOCK = 512  # rows quantized at once: bounds the fp32 temporaries; whole tiles of 16


# --- the source checkpoint ---------------------------------------------------------------------
def source_tensors(folder: Path) -> dict[str, tuple[Path, TensorEntry, int]]:
    """{name: (shard path, entry, data start)} over model.safetensors or its sharded index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} has neither model.safetensors nor model.safetensors.index.json"
        )
    found = {}
    for shard in shards:
        entries, _, data_start = read_header(folder / shard)
        for name, entry in entries.items():
            found[name] = (folder / shard, entry, data_start)
    return found


def layer_order(name: str) -> tuple:
    """Sort key: embeddings first, then layer 0, 1, ... (by index, not text), then the rest."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def is_quantized(name: str, shape: tuple[int, ...], keep_fp16: Iterable[str]) -> bool:
    return (
        name.endswith(".weight") and len(shape) == 2 and not any(part in name for part in keep_fp16)
    )


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    group_size: int = 128,
    keep_fp16: Iterable[str] = KEEP_FP16,
) -> Path:
    """Quantize the LLaMA checkpoint in folder `src` by RTN into folder `dst`:
    dst/llm.safetensors (INT4 linears in layout n16k64 + fp16 rest) and dst/config.json
    (the source config plus "rgpt_quantization"). Streams one tensor at a time (module docstring).
    For AWQ, quantize with quantize_awq layer by layer and write the result with save_int4."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{src} has no config.json; give a LLaMA folder saved by transformers"
        )
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise ValueError(
            f"{src} is already quantized; use convert_quantized_folder for AWQ/GPTQ folders"
        )
    keep_fp16 = tuple(keep_fp16)
    source = source_tensors(src)
    names = sorted(source, key=layer_order)

    entries: list[TensorEntry] = []
    quantized: dict[str, tuple[int, int]] = {}
    for name in names:
        shape = source[name][1].shape
        if is_quantized(name, shape, keep_fp16):
            linear = name[: -len(".weight")]
            quantized[linear] = tuple(shape)
            entries += int4_entries(linear, tuple(shape), group_size)
        else:
            entries.append(TensorEntry(name, _stored_dtype(source[name][1].dtype), shape))
    metadata = int4_metadata({linear: (shape, group_size) for linear, shape in quantized.items()})

    with atomic_directory(dst) as tmp:
        with SafetensorsWriter(tmp / LLM_FILE, entries, metadata) as writer:
            for name in names:
                path, entry, data_start = source[name]
                tensor = read_tensor(path, entry, data_start)
                if is_quantized(name, entry.shape, keep_fp16):
                    linear = name[: -len(".weight")]
                    weight = _quantize_by_blocks(tensor, group_size)
                    for tensor_name, packed in int4_tensors(linear, weight).items():
                        writer.write(tensor_name, packed)
                else:
                    writer.write(name, tensor.to(_stored_dtype(tensor.dtype)))
                del tensor
        config["rgpt_quantization"] = {
            "format": "rgpt_rt.int4", "format_version": FORMAT_VERSION, "layout": LAYOUT, "bits": 4,
            "group_size": group_size, "method": "rtn", "fp16": list(keep_fp16),
        }  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """Floating tensors that stay unquantized are stored in fp16; others as they are."""
    return torch.float16 if dtype.is_floating_point else dtype


def _quantize_by_blocks(w: torch.Tensor, group_size: int) -> Int4Weight:
    """RTN of w [N, K] a block of rows at a time (the same result as one call): each block of
    ROWS_PER_BLOCK rows fills whole tiles of the packed tensors."""
    n, k = w.shape
    shapes = layout.packed_shapes(n, k, group_size)
    qweight = torch.empty(shapes["qweight"], dtype=torch.int32)
    scales = torch.empty(shapes["scales"], dtype=torch.float16)
    zeros = torch.empty(shapes["zeros"], dtype=torch.uint8)
    tiles_per_block = ROWS_PER_BLOCK // layout.TILE_ROWS
    for start in range(0, n, ROWS_PER_BLOCK):
        tiles = slice(start // layout.TILE_ROWS, start // layout.TILE_ROWS + tiles_per_block)
        packed = layout.pack(*rtn_codes(w[start : start + ROWS_PER_BLOCK], group_size), group_size)
        qweight[tiles], scales[tiles], zeros[tiles] = packed
    return Int4Weight(qweight, scales, zeros, group_size, (n, k))


# --- reading the output, and converting AWQ/GPTQ folders -------------------------------------
@dataclass
class Int4Checkpoint:
    int4: dict[str, Int4Weight]  # linear name -> weight
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the fp16 rest
    config: dict = field(default_factory=dict)


def load_int4_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> Int4Checkpoint:
    """Read dst/llm.safetensors + dst/config.json (as written by quantize_checkpoint)."""
    folder = Path(folder)
    path = folder / LLM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {LLM_FILE}; write one with quantize_checkpoint")
    int4, tensors = load_int4(path, device)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Int4Checkpoint(int4=int4, tensors=tensors, config=config)


def convert_quantized_folder(src: str | Path, dst: str | Path) -> Path:
    """An HF AWQ/GPTQ folder -> dst/llm.safetensors + config.json in rgpt_rt's layout
    (bit-exact import; fp16 tensors kept; linear biases stored as {name}.bias)."""
    from rgpt_rt.ops.int4_format import save_int4
    from rgpt_rt.quant.importers import load_quantized_folder

    folder = load_quantized_folder(src)
    tensors = {
        name: t.to(torch.float16) if t.is_floating_point() else t
        for name, t in folder.tensors.items()
    }
    tensors.update({f"{name}.bias": bias for name, bias in folder.biases.items()})
    group_sizes = sorted({q.group_size for q in folder.int4.values()})
    config = dict(folder.config)
    config["rgpt_quantization"] = {
        "format": "rgpt_rt.int4", "format_version": FORMAT_VERSION, "layout": LAYOUT, "bits": 4,
        "group_size": group_sizes[0] if group_sizes else None,
        "method": f"import:{folder.quant_method}", "source_quantization_config": config.pop("quantization_config"),
    }  # fmt: skip
    with atomic_directory(dst) as tmp:
        save_int4(tmp / LLM_FILE, folder.int4, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)
