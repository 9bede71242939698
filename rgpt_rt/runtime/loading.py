"""Loading the runtime decoder: HF-named tensors -> LlamaDecoder, INT4 linears swapped in,
q/k/v and gate/up fused for inference.

    decoder = load_decoder("vicuna-7b/", dtype=torch.float16, device="cuda")        # an HF folder
    decoder = decoder_from_state(config, tensors, int4_weights={...})              # tensors in memory
    decoder = load_bundle_decoder(bundle_folder, config, dtype, device)            # a bundle's llm.safetensors

Names are HF's ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"); the decoder's
are the same without "model.". No transformers: hf_llama.py reads folders with json and
safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rgpt_rt.bundle import LLM_FILE
from rgpt_rt.config import LLMConfig
from rgpt_rt.ops.int4_format import Int4Weight, load_int4
from rgpt_rt.runtime.hf_llama import read_hf_tensors, read_llm_config
from rgpt_rt.runtime.int4_linear import Int4Linear
from rgpt_rt.runtime.model import QUANTIZED_LINEARS, LlamaDecoder


def load_decoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    group_size: int = 128,
    device: str | torch.device = "cpu",
) -> LlamaDecoder:
    """Load a transformers LLaMA folder (config.json + model.safetensors, or shards with an
    index). quant="int4" quantizes q/k/v/o/gate/up/down with round-to-nearest INT4."""
    config = read_llm_config(path)
    tensors = read_hf_tensors(path, dtype=dtype, device=device)
    return decoder_from_state(
        config, tensors, dtype=dtype, quant=quant, group_size=group_size, device=device
    )


def decoder_from_state(
    config: LLMConfig,
    tensors: Mapping[str, Tensor],
    *,
    int4_weights: Mapping[str, Int4Weight] | None = None,
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
    group_size: int = 128,
    device: str | torch.device = "cpu",
) -> LlamaDecoder:
    """Build from HF-named tensors. int4_weights: already-quantized linears by HF module name
    ("model.layers.0.mlp.up_proj" -> Int4Weight), e.g. from a bundle's llm.safetensors; those
    need no fp tensor. quant="int4": the remaining q/k/v/o/gate/up/down linears by RTN."""
    if quant not in (None, "int4"):
        raise ValueError(f"quant {quant!r} is unknown; use None or 'int4'")
    int4_weights = {_runtime_name(k): w for k, w in (int4_weights or {}).items()}
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # saved by old transformers; recomputed here
            continue
        state[_runtime_name(name)] = tensor.to(device=device, dtype=dtype)
    if (
        config.tie_word_embeddings
        and "lm_head.weight" not in state
        and "embed_tokens.weight" in state
    ):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaDecoder(config)
    expected = {n for n in model.state_dict() if n.rsplit(".", 1)[0] not in int4_weights}
    missing, unknown = expected - set(state), set(state) - set(model.state_dict())
    if missing or unknown:
        raise ValueError(
            f"the weights do not fit a LLaMA of this config: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unknown)[:8]} (names are HF's, e.g. model.layers.0.self_attn.q_proj.weight)"
        )
    for name, tensor in state.items():
        module_name, attr = name.rsplit(".", 1)
        expected_shape = model.get_submodule(module_name).get_parameter(attr).shape
        if tensor.shape != expected_shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; the config needs {tuple(expected_shape)}"
            )
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for name, weight in int4_weights.items():
        _replace(model, name, Int4Linear(weight).to(device))
    if quant == "int4":
        quantize_int4(model, group_size)
    model.rope_cos = torch.empty(0, config.head_dim, dtype=dtype, device=device)
    model.rope_signed_sin = torch.empty(0, config.head_dim, dtype=dtype, device=device)
    return model.eval()


def quantize_int4(decoder: LlamaDecoder, group_size: int = 128) -> None:
    """Replace every q/k/v/o/gate/up/down linear still in floating point by an Int4Linear (RTN)."""
    for name, module in list(decoder.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
            _replace(decoder, name, Int4Linear.from_linear(module, group_size))


def load_bundle_decoder(
    folder: Path, config: LLMConfig, dtype: torch.dtype, device: torch.device
) -> LlamaDecoder:
    """The decoder of a bundle (its llm.safetensors: INT4 linears in the kernels' layout, the
    rest fp16; a file without INT4 weights is a plain fp16 LLM), fused for inference."""
    int4, tensors = load_int4(folder / LLM_FILE)
    decoder = decoder_from_state(config, tensors, int4_weights=int4, dtype=dtype, device=device)
    decoder.fuse_projections()
    return decoder


def _runtime_name(hf_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'layers.0.mlp.up_proj.weight'; lm_head is unchanged."""
    return hf_name.removeprefix("model.")


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
