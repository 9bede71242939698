"""The LLM part of a bundle: llm.safetensors with HF tensor names.

quant "none": every tensor in fp16. quant "rtn" / "awq": the seven linears of each decoder
layer as INT4 (the project's layout, rgpt_rt.quant), embeddings, norms and lm_head in fp16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

QUANT_METHODS = ("rtn", "awq", "none")
# The linears that become INT4: attention and MLP projections of every decoder layer.
INT4_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llm_tensors(llm) -> dict[str, torch.Tensor]:
    """The LLM's weights with HF names, fp16, contiguous; a tied lm_head is stored once."""
    tensors = {}
    for name, value in llm.state_dict().items():
        if name == "lm_head.weight" and getattr(llm.config, "tie_word_embeddings", False):
            continue
        tensors[name] = value.detach().to(torch.float16).contiguous().cpu()
    return tensors


def is_int4_linear(name: str) -> bool:
    parts = name.split(".")
    return name.endswith(".weight") and len(parts) >= 2 and parts[-2] in INT4_LINEARS


def write_llm(
    llm, path: Path, *, quant: str, group_size: int, calibration=None
) -> dict[str, object]:
    """Write llm.safetensors; return what the manifest records about the quantization."""
    if quant not in QUANT_METHODS:
        raise ValueError(f"quant {quant!r} is unknown; use one of {QUANT_METHODS}")
    tensors = llm_tensors(llm)
    if quant == "none":
        save_file(tensors, str(path), metadata={"format": "rgpt_rt.llm", "quant": "none"})
        return {"method": "none", "dtype": "float16"}
    from rgpt_rt.quant.bundle import quantize_llm_tensors

    return quantize_llm_tensors(
        llm,
        tensors,
        path,
        method=quant,
        group_size=group_size,
        calibration=calibration,
        is_int4=is_int4_linear,
    )
