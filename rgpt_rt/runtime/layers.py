"""The layers of the runtime's LLaMA decoder (model.py), read top to bottom: RoPE (default /
linear / dynamic / llama3), RMSNorm, grouped-query attention over a static KV cache, SwiGLU, and
the decoder layer. Each attention and MLP has its prefill forward (torch ops over [B*T, D]) and
its fused decode step (`decode`: the kernels of rgpt_rt/ops/decode.py, C++ twins on a CPU).

Module names are HF's, so HF-named weights map one to one. No transformers here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt_rt.config import LLMConfig
from rgpt_rt.ops.decode import decode_attention, rope_kv_append, silu_mul
from rgpt_rt.runtime.hf_llama import ROPE_TYPES, rope_type
from rgpt_rt.runtime.int4_linear import concat_linears

# --- RoPE -----------------------------------------------------------------------------------


def rope_inv_freq(config: LLMConfig) -> Tensor:
    """The inverse frequencies [head_dim / 2] (fp32), computed as transformers computes them."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = config.rope_scaling or {}
    kind = rope_type(scaling)
    if kind in ("default", "dynamic"):
        # dynamic NTK equals the default rope up to max_position_embeddings; caches are limited to that.
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; the decoder runs {ROPE_TYPES}")


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x [B, H, T, hd]; cos, signed_sin [B, 1, T, hd] -> [B, H, T, hd]. HF LLaMA's rotate-half,
    x·cos + cat(-x2, x1)·sin, with the minus folded into the sin table's first half (bit-exact)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


@dataclass
class Positions:
    """Where one forward's tokens go, computed once and shared by every layer."""

    input_pos: Tensor  # [B, T] the slot (= position) of each token
    rows: Tensor  # [B, 1] 0..B-1, to index the cache
    cos: Tensor  # [B, 1, T, hd]
    signed_sin: Tensor  # [B, 1, T, hd]
    mask: Tensor | None  # [B, 1, G*T, S] (True: attend), None: attend to all S slots
    kv_len: int  # S: the slots attended


# --- the layers -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32, and half precision on CUDA: one op (CUDA's kernel computes in fp32 and rounds
        # once, where HF rounds the normalised value and then the scaled one; a decode step
        # runs 65 of these, and HF's form is four kernels each). Elsewhere as HF LlamaRMSNorm:
        # normalise in fp32, scale in the input's dtype.
        if x.dtype == torch.float32 or x.is_cuda:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(D, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, D, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k, v in one linear after fuse()

    def fuse(self, fused: nn.Module | None = None) -> bool:
        """Replace q/k/v by one linear of their stacked outputs: `fused` (a bundle stores them
        stacked), or their concatenation (see LlamaDecoder.fuse_projections)."""
        if self.qkv_proj is not None:
            return True
        fused = fused or concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def forward(self, x: Tensor, pos: Positions, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """x [B*T, D] (the tokens of B rows of T); k_cache, v_cache [B, Hkv, T_max, hd] -> [B*T, D].
        Writes this step's K/V at pos.input_pos and attends over the first pos.kv_len slots."""
        B, T = pos.input_pos.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # [B*T, (H + 2 Hkv) hd]
            # q and k side by side: rotated in one pass (half the kernels), then split
            qk = qkv[:, : (H + Hkv) * hd].view(B, T, H + Hkv, hd).transpose(1, 2)
            q, k = apply_rope(qk, pos.cos, pos.signed_sin).split((H, Hkv), dim=1)
            v = qkv[:, (H + Hkv) * hd :].view(B, T, Hkv, hd)  # [B, T, Hkv, hd]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
            k = k.view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
            v = v.view(B, T, Hkv, hd)  # [B, T, Hkv, hd]
            q, k = apply_rope(q, pos.cos, pos.signed_sin), apply_rope(k, pos.cos, pos.signed_sin)

        # [B, T, Hkv, hd] into the slots (in the cache's dtype)
        k_cache[pos.rows, :, pos.input_pos] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[pos.rows, :, pos.input_pos] = v.to(v_cache.dtype)
        keys, values = k_cache[:, :, : pos.kv_len], v_cache[:, :, : pos.kv_len]  # [B, Hkv, S, hd]
        if keys.dtype != q.dtype:  # an fp16 cache under fp32 activations (a CPU session)
            keys, values = keys.to(q.dtype), values.to(q.dtype)

        # Grouped-query attention without repeating K/V: the G = H / Hkv query heads that share a
        # KV head are folded into the query length (head h = j*G + r reads KV head j).
        q = q.reshape(B, Hkv, (H // Hkv) * T, hd)  # [B, Hkv, G*T, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=pos.mask)
        # reshape, not view: CUDA's attention kernels may return [B, Hkv, G*T, hd] laid out
        # as [B, G*T, Hkv, hd] (seen on an H200 in fp32), which no view can split by head
        out = out.reshape(B, H, T, hd).transpose(1, 2).reshape(B * T, H * hd)
        return self.o_proj(out)

    def decode(self, x: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, rope, attention):
        """The fused step's attention: x [B, D] (one token per row), pos [B] its slots; k_cache,
        v_cache [B, Hkv, T_max, hd]; rope (cos, signed_sin) tables; attention (workspace,
        splits) -> [B, D]. Between the qkv and o linears: two kernels, rope + KV append and
        the attention over each row's slots 0..pos[b]."""
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # [B, (H + 2 Hkv) hd]
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        rope_kv_append(qkv, k_cache, v_cache, pos, *rope, H, Hkv)  # q, k rotated in place
        q = qkv.as_strided((x.shape[0], H, hd), (qkv.stride(0), hd, 1))  # [B, H, hd] view
        return self.o_proj(decode_attention(q, k_cache, v_cache, pos, *attention))


class MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        D, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, inner, bias=False)
        self.up_proj = nn.Linear(D, inner, bias=False)
        self.down_proj = nn.Linear(inner, D, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one linear after fuse()

    def fuse(self, fused: nn.Module | None = None) -> bool:
        """Replace gate/up by one linear of their stacked outputs (`fused`, or concatenated)."""
        if self.gate_up_proj is not None:
            return True
        fused = fused or concat_linears([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def decode(self, x: Tensor) -> Tensor:
        """The fused step's MLP: x [B, D] -> [B, D], SiLU·mul in one kernel."""
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)  # [B, 2 inner]
        else:
            gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        return self.down_proj(silu_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, pos: Positions, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """x [B*T, D] -> [B*T, D]."""
        x = x + self.self_attn(self.input_layernorm(x), pos, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))
