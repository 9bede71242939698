"""The LLM part of a bundle: llm.safetensors, written straight from the source shards.

    info = write_llm(source, path, quant="rtn" | "awq" | "none", group_size=128, calibration=...)

One tensor at a time (AWQ: one layer at a time): the model is never held in fp16 or fp32.
The file holds HF-named tensors, with each layer's q/k/v stacked into `self_attn.qkv_proj` and
gate/up into `mlp.gate_up_proj` (what the decoder runs; nothing is concatenated at load):
  "rtn" / "awq"  those linears and o/down as INT4 (the kernels' layout, ops/int4_format.py);
                 embed_tokens, the norms and lm_head in fp16. AWQ calibrates on the model's own
                 inputs (calibration.py): images through the vision side, a region, task prompts.
  "none"         every weight in the source's dtype, q/k/v and gate/up stacked the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rgpt_rt.bundle import BUILD_ID_KEY
from rgpt_rt.config import LLMConfig
from rgpt_rt.export.llama_source import LlamaSource
from rgpt_rt.ops.int4_format import (
    LAYOUT,
    concat_int4,
    int4_entries,
    int4_metadata,
    int4_tensors,
)
from rgpt_rt.quant.rtn import quantize_rtn
from rgpt_rt.safetensors_io import SafetensorsWriter, TensorEntry

QUANT_METHODS = ("rtn", "awq", "none")
# fused linear -> the HF linears it stacks (rows in this order)
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
LAYER_PARTS = (  # the order of a layer's tensors in the file
    "input_layernorm.weight",
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "post_attention_layernorm.weight",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)
FORMAT_VERSION = 2  # 2: q/k/v and gate/up stored stacked


def resolve_group_size(llm_config: LLMConfig, requested: int | None) -> int:
    """The group size: `requested`, or (None) 128 when it divides every quantized input width,
    else 64 or 32 (the kernels take multiples of 32). A size that does not divide is an error."""
    widths = sorted(
        {
            llm_config.hidden_size,
            llm_config.intermediate_size,
            llm_config.num_heads * llm_config.head_dim,
        }
    )
    if requested is not None:
        bad = [w for w in widths if w % requested]
        if requested % 32 or bad:
            raise ValueError(
                f"--group-size {requested} must be a multiple of 32 that divides the LLM's input widths {widths}"
            )
        return requested
    for size in (128, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(
        f"no group size of 128, 64 or 32 divides the LLM's input widths {widths}; use --quant none"
    )


def linear_shapes(config: LLMConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of each linear a layer stores (fused names)."""
    D, F_, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    return {
        "self_attn.qkv_proj": (q + 2 * kv, D),
        "self_attn.o_proj": (D, q),
        "mlp.gate_up_proj": (2 * F_, D),
        "mlp.down_proj": (D, F_),
    }


# --- the plan: every tensor of the file, declared before the first byte is written -------------
def plan_entries(
    source: LlamaSource, quant: str, group_size: int | None
) -> tuple[list[TensorEntry], dict[str, tuple[tuple[int, int], int]]]:
    """(entries in file order, {int4 linear: (shape, group)})."""
    config = source.config
    entries: list[TensorEntry] = []
    int4: dict[str, tuple[tuple[int, int], int]] = {}

    def plain(name: str, shape: tuple[int, ...]) -> None:
        dtype = source.tensors[name].entry.dtype if quant == "none" else torch.float16
        entries.append(TensorEntry(name, dtype, shape))

    plain("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for part in LAYER_PARTS:
            name = prefix + part
            if part.endswith("norm.weight"):
                plain(name, (config.hidden_size,))
                continue
            n, k = linear_shapes(config)[part]
            if quant == "none":
                first = prefix + FUSED.get(part, (part,))[0] + ".weight"
                entries.append(
                    TensorEntry(name + ".weight", source.tensors[first].entry.dtype, (n, k))
                )
                continue
            int4[name] = ((n, k), group_size)
            entries += int4_entries(name, (n, k), group_size)
    plain("model.norm.weight", (config.hidden_size,))
    if not config.tie_word_embeddings:
        plain("lm_head.weight", (config.vocab_size, config.hidden_size))
    return entries, int4


def write_llm(
    source: LlamaSource,
    path: Path,
    *,
    quant: str,
    group_size: int | None,
    calibration: Callable[[], list[torch.Tensor]] | None = None,
    log: Callable[[str], None] = lambda _: None,
    build_id: str = "",
) -> dict[str, object]:
    """Write llm.safetensors from `source`; returns what the manifest records. AWQ calls
    `calibration()` for its inputs: a list of [1, T, D] input embeddings."""
    if quant not in QUANT_METHODS:
        raise ValueError(f"quant {quant!r} is unknown; use one of {QUANT_METHODS}")
    config = source.config
    entries, int4 = plan_entries(source, quant, group_size)
    metadata = int4_metadata(int4) | {
        "rgpt_llm": json.dumps(
            {"version": FORMAT_VERSION, "fused": {k: list(v) for k, v in FUSED.items()}}
        ),
        BUILD_ID_KEY: build_id,
    }
    layers = _awq_layers(source, calibration(), group_size, log) if quant == "awq" else None
    with SafetensorsWriter(path, entries, metadata) as writer:
        _write_plain(writer, source, "model.embed_tokens.weight", quant)
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            result = next(layers) if layers is not None else None
            for part in LAYER_PARTS:
                name = prefix + part
                if part.endswith("norm.weight"):
                    if result is not None:
                        writer.write(name, result.tensors[part].to(torch.float16))
                    else:
                        _write_plain(writer, source, name, quant)
                    continue
                parts = [prefix + p for p in FUSED.get(part, (part,))]
                if quant == "none":
                    stacked = torch.cat([source.read(p + ".weight") for p in parts])
                    writer.write(name + ".weight", stacked)
                    continue
                if result is not None:
                    weights = [result.int4[p.removeprefix(prefix)] for p in parts]
                else:
                    weights = [quantize_rtn(source.read(p + ".weight"), group_size) for p in parts]
                for tensor_name, tensor in int4_tensors(name, concat_int4(weights)).items():
                    writer.write(tensor_name, tensor)
            log(f"    layer {i + 1}/{config.num_layers} written")
        _write_plain(writer, source, "model.norm.weight", quant)
        if not config.tie_word_embeddings:
            _write_plain(writer, source, "lm_head.weight", quant)
    if quant == "none":
        dtype = source.tensors["model.embed_tokens.weight"].entry.dtype
        return {"method": "none", "dtype": str(dtype).replace("torch.", ""), "fused": True}
    info: dict[str, object] = {
        "method": quant,
        "bits": 4,
        "group_size": group_size,
        "layout": LAYOUT,
        "fused": True,
        "fp16": ["embed_tokens", "norms", "lm_head"],
    }
    if quant == "awq":
        info["calibration_samples"] = "task prompts on synthetic images (calibration.py)"
    return info


def _write_plain(writer: SafetensorsWriter, source: LlamaSource, name: str, quant: str) -> None:
    tensor = source.read(name)
    writer.write(name, tensor if quant == "none" else tensor.to(torch.float16))


# --- AWQ, one layer at a time ------------------------------------------------------------------
def _awq_layers(source: LlamaSource, samples: list[torch.Tensor], group_size: int, log):
    """Yields each layer's AwqLayer in order. Holds one layer's fp32 weights and the calibration
    activations; each layer's output (of the float layer, as AWQ does) feeds the next."""
    from rgpt_rt.quant.awq_llama import INPUTS, LINEARS, NORMS, quantize_llama_layer_awq

    config = source.config
    hidden = [x[0].to(torch.float32) for x in samples]  # each [T, D]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        names = [f"{n}.weight" for n in LINEARS] + list(NORMS)
        weights = {n: source.read(prefix + n, torch.float32) for n in names}
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in INPUTS}
        hidden = [layer_forward(weights, config, x, captured) for x in hidden]
        inputs = {n: torch.cat(xs) for n, xs in captured.items()}
        log(f"    AWQ layer {i + 1}/{config.num_layers}")
        yield quantize_llama_layer_awq(weights, inputs, group_size)
        del weights, inputs, captured


def layer_forward(
    w: dict[str, torch.Tensor],
    config: LLMConfig,
    x: torch.Tensor,
    captured: dict[str, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """One LLaMA layer in fp32 on one sequence x [T, D] (causal, positions 0..T-1), recording the
    inputs of the four AWQ groups in `captured`. As transformers' LlamaDecoderLayer computes it."""
    T = x.shape[0]
    H, Hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps

    def keep(name: str, value: torch.Tensor) -> torch.Tensor:
        if captured is not None:
            captured[name].append(value)
        return value

    h = keep("self_attn.q_proj", _rms_norm(x, w["input_layernorm.weight"], eps))
    q = (h @ w["self_attn.q_proj.weight"].T).view(T, H, hd).transpose(0, 1)  # [H, T, hd]
    k = (h @ w["self_attn.k_proj.weight"].T).view(T, Hkv, hd).transpose(0, 1)
    v = (h @ w["self_attn.v_proj.weight"].T).view(T, Hkv, hd).transpose(0, 1)
    cos, sin = _rope(config, T)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
    attn = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    attn = keep("self_attn.o_proj", attn.transpose(0, 1).reshape(T, H * hd))
    x = x + attn @ w["self_attn.o_proj.weight"].T
    h = keep("mlp.gate_proj", _rms_norm(x, w["post_attention_layernorm.weight"], eps))
    gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
    down_in = keep("mlp.down_proj", F.silu(gate) * up)
    return x + down_in @ w["mlp.down_proj.weight"].T


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(config: LLMConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from rgpt_rt.runtime.layers import rope_inv_freq

    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rope_inv_freq(config))
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
