"""The bundle's LLM: llm.safetensors -> LlamaDecoder.

The file holds HF-named tensors; INT4 linears are stored in the project's layout (described in
the file's metadata, see rgpt_rt/quant/format.py), the rest in fp16. A file without INT4
weights is a plain fp16 LLM.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rgpt_rt.config import LLMConfig
from rgpt_rt.quant.format import load_int4
from rgpt_rt.runtime.decoder import LlamaDecoder


def load_bundle_decoder(
    folder: Path, config: LLMConfig, dtype: torch.dtype, device: torch.device
) -> LlamaDecoder:
    """The decoder of a bundle, its q/k/v and gate/up linears fused for inference."""
    int4, tensors = load_int4(folder / "llm.safetensors")
    decoder = LlamaDecoder.from_state(
        config, tensors, int4_weights=int4, dtype=dtype, device=device
    )
    decoder.fuse_projections()
    return decoder
