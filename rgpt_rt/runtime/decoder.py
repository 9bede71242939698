"""The runtime's LLaMA decoder: RMSNorm, RoPE (default / linear / dynamic / llama3), grouped-query
attention and SwiGLU in one file, loaded from HF-named weights, with a static KV cache.

    decoder = LlamaDecoder.from_pretrained("ckpt/llm", dtype=torch.float16, device="cuda")
    cache = decoder.new_cache(batch_size=1, max_len=1024)
    logits = decoder.prefill(cache, inputs_embeds=embeds)    # [1, V] at the last token
    logits = decoder.decode_step(next_token, cache)          # [1, V]; a CUDA graph on CUDA

Positions are slots: row b of the cache holds positions 0..lengths[b]-1 and its next token goes
at position lengths[b]. Attention is causal by position, so rows of different lengths share one
batch, and the keys of a shared prefix can be copied between rows and caches (`copy_prefix`).
No transformers here: hf_llama.py reads the folder with safetensors and json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rgpt_rt.config import LLMConfig
from rgpt_rt.runtime.hf_llama import ROPE_TYPES, read_hf_tensors, read_llm_config, rope_type

# The linears that quant="int4" replaces; embeddings, norms and lm_head stay in floating point.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# CUDA graphs of the decode step attend over a key length rounded up to this many slots, so a
# graph serves 256 decode steps and a 1k-slot cache needs at most 4 graphs per batch size.
GRAPH_KV_BUCKET = 256


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


# --- the static KV cache --------------------------------------------------------------------


class KVCache:
    """Pre-allocated keys and values of every layer, and how many positions each row holds.

    k, v: [L, B, Hkv, T_max, hd] on the decoder's device; lengths: [B] int64 on the host (the
    decoder computes positions from it without a device sync). Row b holds positions
    0..lengths[b]-1; its next token is written at slot lengths[b].
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(
                f"a KV cache needs batch_size >= 1 and max_len >= 1; got {batch_size}, {max_len}"
            )
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64)
        self.graphs: dict[int, _DecodeGraph] = {}  # CUDA graphs of the decode step, by key length
        self.graph_owner: LlamaDecoder | None = None
        # The memory pool this cache's graphs share; it lives and dies with them. (A pool kept by
        # the decoder and reused after every graph in it was freed trips an internal assert in
        # torch's caching allocator: seen on an H200, torch 2.11.)
        self.graph_pool = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget the tokens of `rows` (all rows by default); the memory is reused as is."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[list(rows)] = 0

    def copy_prefix(
        self, src: KVCache, src_row: int, dst_rows: Sequence[int] | int, length: int
    ) -> None:
        """Copy the first `length` positions of `src` row `src_row` into each of `dst_rows` of this
        cache, whose lengths become `length` (what they held before is dropped). `src` may be this
        cache. Prefill each row's own suffix afterwards: it goes at positions length.."""
        rows = [dst_rows] if isinstance(dst_rows, int) else list(dst_rows)
        if [src.k.shape[i] for i in (0, 2, 4)] != [self.k.shape[i] for i in (0, 2, 4)]:
            raise ValueError(
                f"cannot copy between caches of different models: {tuple(src.k.shape)} vs {tuple(self.k.shape)}"
            )
        if not 0 <= src_row < src.batch_size or any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(
                f"rows out of range: src_row {src_row} of {src.batch_size}, dst_rows {rows} of {self.batch_size}"
            )
        if not 0 < length <= int(src.lengths[src_row]):
            raise ValueError(
                f"prefix length {length} is not in 1..{int(src.lengths[src_row])} (the tokens row {src_row} of the source holds)"
            )
        if length > self.max_len:
            raise ValueError(
                f"prefix length {length} does not fit this cache (max_len {self.max_len})"
            )
        index = torch.tensor(rows, device=self.device)
        for mine, theirs in ((self.k, src.k), (self.v, src.v)):
            # [L, Hkv, P, hd] from the source row, broadcast into [L, R, Hkv, P, hd]
            prefix = theirs[:, src_row, :, :length].to(device=self.device, dtype=mine.dtype)
            mine[:, index, :, :length] = prefix[:, None]
        self.lengths[rows] = length

    def snapshot(self, length: int | None = None, row: int = 0) -> KVCache:
        """A new batch-1 cache holding exactly the first `length` positions of `row` (default: all
        it holds), to keep a prefix for later `copy_prefix` calls while this cache moves on."""
        length = int(self.lengths[row]) if length is None else length
        L, _, Hkv, _, hd = self.k.shape
        copy = KVCache(L, 1, Hkv, length, hd, dtype=self.k.dtype, device=self.device)
        copy.copy_prefix(self, row, [0], length)
        return copy


# --- the model ------------------------------------------------------------------------------


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

    def fuse(self) -> bool:
        """Replace q/k/v by one linear of their stacked outputs (see LlamaDecoder.fuse_projections)."""
        if self.qkv_proj is not None:
            return True
        fused = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
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

        k_cache[pos.rows, :, pos.input_pos] = k.transpose(1, 2)  # [B, T, Hkv, hd] into the slots
        v_cache[pos.rows, :, pos.input_pos] = v
        keys, values = k_cache[:, :, : pos.kv_len], v_cache[:, :, : pos.kv_len]  # [B, Hkv, S, hd]

        # Grouped-query attention without repeating K/V: the G = H / Hkv query heads that share a
        # KV head are folded into the query length (head h = j*G + r reads KV head j).
        q = q.reshape(B, Hkv, (H // Hkv) * T, hd)  # [B, Hkv, G*T, hd]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=pos.mask)
        # reshape, not view: CUDA's attention kernels may return [B, Hkv, G*T, hd] laid out
        # as [B, G*T, Hkv, hd] (seen on an H200 in fp32), which no view can split by head
        out = out.reshape(B, H, T, hd).transpose(1, 2).reshape(B * T, H * hd)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        D, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, inner, bias=False)
        self.up_proj = nn.Linear(D, inner, bias=False)
        self.down_proj = nn.Linear(inner, D, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one linear after fuse()

    def fuse(self) -> bool:
        """Replace gate/up by one linear of their stacked outputs."""
        if self.gate_up_proj is not None:
            return True
        fused = _concat_linears([self.gate_proj, self.up_proj])
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


class LlamaDecoder(nn.Module):
    """A LLaMA decoder whose module names are HF's without the "model." prefix, so a transformers
    state dict loads as is (`from_state`)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_inv_freq = rope_inv_freq(config)  # [hd/2] fp32, host; tables are built from it
        self.register_buffer("rope_cos", torch.empty(0, config.head_dim), persistent=False)
        self.register_buffer("rope_signed_sin", torch.empty(0, config.head_dim), persistent=False)
        self.use_cuda_graphs = True

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
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
        return cls.from_state(
            config, tensors, dtype=dtype, quant=quant, group_size=group_size, device=device
        )

    @classmethod
    def from_state(
        cls,
        config: LLMConfig,
        tensors: Mapping[str, Tensor],
        *,
        int4_weights: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        quant: str | None = None,
        group_size: int = 128,
        device: str | torch.device = "cpu",
    ) -> LlamaDecoder:
        """Build from HF-named tensors ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", ...).
        int4_weights: already-quantized linears by HF module name ("model.layers.0.mlp.up_proj" ->
        Int4Weight), e.g. from a bundle's llm.int4.safetensors; those need no fp tensor."""
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
            model = cls(config)
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
            setattr(
                model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False)
            )
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        for name, weight in int4_weights.items():
            _replace(model, name, _int4_linear_from_weight(weight).to(device))
        if quant == "int4":
            model.quantize_int4(group_size)
        model.rope_cos = torch.empty(0, config.head_dim, dtype=dtype, device=device)
        model.rope_signed_sin = torch.empty(0, config.head_dim, dtype=dtype, device=device)
        return model.eval()

    def quantize_int4(self, group_size: int = 128) -> None:
        """Replace every q/k/v/o/gate/up/down linear still in floating point by an Int4Linear."""
        # The INT4 format and kernels: the other half of issue 5.
        from rgpt_rt.quant import Int4Linear

        for name, module in list(self.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
                _replace(self, name, Int4Linear.from_linear(module, group_size))

    def fuse_projections(self) -> bool:
        """Per layer, q/k/v become one `qkv_proj` and gate/up one `gate_up_proj` (their weights
        stacked; INT4 rows are concatenated as they are, nothing is requantized): a decode step
        makes 4 linear calls per layer instead of 7. Same outputs up to float summation order.
        For inference only: the fused model no longer has HF's module names. Layers whose
        linears cannot be stacked (mixed kinds, act-order permutations) stay as they are.
        Returns whether every layer fused."""
        done = [part.fuse() for layer in self.layers for part in (layer.self_attn, layer.mlp)]
        return all(done)

    def weight_bytes(self) -> int:
        """Bytes a decode step reads from the weights: every parameter and buffer but the rope
        tables and the embedding table (of which it reads B rows), unless lm_head shares it."""
        skip = {id(self.rope_cos), id(self.rope_signed_sin)}
        if not self.config.tie_word_embeddings:
            skip.add(id(self.embed_tokens.weight))
        seen, total = set(), 0
        for t in (*self.parameters(), *self.buffers()):
            if id(t) not in skip and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    # --- the forward ------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [...] -> token embeddings [..., D] (what the Session splices image and region
        embeddings into)."""
        if input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                f"token ids must be in 0..{self.config.vocab_size - 1}; got {int(input_ids.min())}..{int(input_ids.max())} "
                "(placeholders such as <image> are spliced as embeddings, not passed as ids)"
            )
        return self.embed_tokens(input_ids.to(self.device))

    def forward(
        self, x: Tensor, input_pos: Tensor, cache: KVCache, kv_len: int, unmasked: bool = False
    ) -> Tensor:
        """x [B, T, D] input embeddings; input_pos [B, T] the position (= cache slot) of each token.
        Writes every layer's K/V at those slots, attends causally by position over slots [0, kv_len),
        and returns the final-normed hidden states [B, T, D]. unmasked: the caller knows that every
        query sees all kv_len slots (one token per row, each at position kv_len - 1)."""
        B, T, D = x.shape
        groups = self.config.num_heads // self.config.num_kv_heads
        mask = None
        if not unmasked:
            slots = torch.arange(kv_len, device=x.device)
            mask = slots[None, None, :] <= input_pos[:, :, None]  # [B, T, S]
            mask = mask[:, None].repeat(1, 1, groups, 1)  # [B, 1, G*T, S], query row r*T + t
        pos = Positions(
            input_pos=input_pos,
            rows=torch.arange(B, device=x.device)[:, None],
            cos=self.rope_cos[input_pos][:, None],
            signed_sin=self.rope_signed_sin[input_pos][:, None],
            mask=mask,
            kv_len=kv_len,
        )
        x = x.reshape(B * T, D)  # the layers see tokens as rows: 2-D linears, fewer ops per step
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cache.k[i], cache.v[i])
        return self.norm(x).view(B, T, D)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed static KV cache for `batch_size` rows of up to `max_len` positions."""
        c = self.config
        if rope_type(c.rope_scaling) == "dynamic" and max_len > c.max_position_embeddings:
            raise ValueError(
                f"dynamic NTK rope is supported up to max_position_embeddings ({c.max_position_embeddings}); "
                f"asked for a cache of {max_len} positions"
            )
        self._ensure_rope(max_len)
        return KVCache(
            c.num_layers, batch_size, c.num_kv_heads, max_len, c.head_dim,
            dtype=dtype or self.dtype, device=self.device,
        )  # fmt: skip

    @torch.no_grad()
    def prefill(
        self,
        cache: KVCache,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        all_logits: bool = False,
    ) -> Tensor:
        """Append each row's tokens to the cache, after what the row already holds.

        input_ids [B, T] or inputs_embeds [B, T, D], right-padded; lengths [B]: the real tokens of
        each row (default T), each in 1..T. B is the cache's batch size. Returns the logits [B, V]
        at each row's last real token ([B, T, V] for every token when all_logits)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs must be [B, T] ids or [B, T, {self.config.hidden_size}] embeddings; got {tuple(x.shape)}"
            )
        x = x.to(device=self.device, dtype=self.dtype)  # [B, T, D]
        B, T, _ = x.shape
        if cache.batch_size != B:
            raise ValueError(f"the inputs hold {B} rows but the cache has {cache.batch_size}")
        lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths).cpu().long()
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(
                f"lengths must be [B] = [{B}] values in 1..{T}; got {lengths.tolist()}"
            )
        start = cache.lengths.clone()  # [B] host
        kv_len = int(start.max()) + T
        if kv_len > cache.max_len:
            raise ValueError(
                f"the cache holds {int(start.max())} + {T} new positions > max_len {cache.max_len}; "
                "allocate a larger cache (new_cache) or prefill fewer tokens"
            )
        self._ensure_rope(cache.max_len)
        input_pos = (start[:, None] + torch.arange(T)).to(self.device)  # [B, T]
        h = self(x, input_pos, cache, kv_len)  # [B, T, D]
        cache.lengths += lengths
        if all_logits:
            return self.lm_head(h)  # [B, T, V]
        last = (lengths - 1).to(self.device)
        return self.lm_head(h[torch.arange(B, device=self.device), last])  # [B, V]

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """tokens [B]: one new token per row, at position lengths[b] -> logits [B, V].
        On CUDA this replays a CUDA graph captured for the cache (its batch size) and a key length
        bucket; elsewhere (or with use_cuda_graphs False) it runs eagerly."""
        B = cache.batch_size
        if tokens.shape != (B,):
            raise ValueError(
                f"decode_step takes one token per row: [{B}]; got {tuple(tokens.shape)}"
            )
        start = cache.lengths  # [B] host
        if int(start.max()) >= cache.max_len:
            raise ValueError(f"the cache is full (max_len {cache.max_len}); allocate a larger one")
        if int(start.min()) < 1:
            raise ValueError("every row must be prefilled before decode_step")
        self._ensure_rope(cache.max_len)
        input_pos = start.to(self.device)  # [B]
        tokens = tokens.to(self.device)
        if self.use_cuda_graphs and cache.device.type == "cuda":
            kv_len = min(
                cache.max_len, -(-(int(start.max()) + 1) // GRAPH_KV_BUCKET) * GRAPH_KV_BUCKET
            )
            logits = self._graph(cache, kv_len, tokens, input_pos)(tokens, input_pos)
        else:
            uniform = int(start.min()) == int(start.max())  # then no key is masked
            logits = self._step(tokens, input_pos, cache, int(start.max()) + 1, unmasked=uniform)
        cache.lengths += 1
        return logits

    def _step(
        self, tokens: Tensor, input_pos: Tensor, cache: KVCache, kv_len: int, unmasked: bool = False
    ) -> Tensor:
        """tokens [B], input_pos [B] (device) -> logits [B, V]: the decode step, graph-capturable."""
        x = self.embed_tokens(tokens[:, None])  # [B, 1, D]
        h = self(x, input_pos[:, None], cache, kv_len, unmasked)  # [B, 1, D]
        return self.lm_head(h[:, 0])  # [B, V]

    def _graph(
        self, cache: KVCache, kv_len: int, tokens: Tensor, input_pos: Tensor
    ) -> _DecodeGraph:
        if cache.graph_owner is not self:
            cache.graphs, cache.graph_owner = {}, self
            cache.graph_pool = torch.cuda.graph_pool_handle()
        if kv_len not in cache.graphs:
            cache.graphs[kv_len] = _DecodeGraph(
                self, cache, kv_len, tokens, input_pos, cache.graph_pool
            )
        return cache.graphs[kv_len]

    def _ensure_rope(self, length: int) -> None:
        """Grow the cos/sin tables [length, hd] to cover positions 0..length-1 (never shrinks; CUDA
        graphs keep a reference to the tables they were captured with)."""
        if self.rope_cos.shape[0] >= length:
            return
        positions = torch.arange(length, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, self.rope_inv_freq)  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        sign = torch.ones(emb.shape[-1])
        sign[: emb.shape[-1] // 2] = -1  # rotate-half's minus (see apply_rope)
        self.rope_cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self.rope_signed_sin = (emb.sin() * sign).to(device=self.device, dtype=self.dtype)


class _DecodeGraph:
    """The decode step of one cache (so one batch size) at one key length, captured as a CUDA graph.
    Static buffers: tokens [B], input_pos [B] in; logits [B, V] out."""

    def __init__(
        self,
        decoder: LlamaDecoder,
        cache: KVCache,
        kv_len: int,
        tokens: Tensor,
        input_pos: Tensor,
        pool,
    ):
        self.tokens, self.input_pos = tokens.clone(), input_pos.clone()
        # Warm up on a side stream with the real inputs: it writes the same K/V the replay will.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decoder._step(self.tokens, self.input_pos, cache, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = decoder._step(self.tokens, self.input_pos, cache, kv_len)  # [B, V]
        self.rope = (decoder.rope_cos, decoder.rope_signed_sin)  # keep the captured tables alive

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.input_pos.copy_(input_pos)
        self.graph.replay()
        return self.logits.clone()  # the static output is overwritten by the next replay


# --- helpers for loading --------------------------------------------------------------------


def _runtime_name(hf_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'layers.0.mlp.up_proj.weight'; lm_head is unchanged."""
    return hf_name.removeprefix("model.")


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _concat_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear computing `linears` side by side, or None when they are not all nn.Linear or
    all Int4Linear (without act-order) with the same input."""
    from rgpt_rt.quant import Int4Linear

    if all(type(m) is nn.Linear for m in linears):
        weight = torch.cat([m.weight for m in linears])
        has_bias = any(m.bias is not None for m in linears)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            bias = [
                m.bias if m.bias is not None else weight.new_zeros(m.out_features) for m in linears
            ]
            fused.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
        return fused
    int4 = all(type(m) is Int4Linear and m.perm is None for m in linears)
    if int4 and len({(m.in_features, m.group_size) for m in linears}) == 1:
        return Int4Linear.concat(linears)
    return None


def _int4_linear_from_weight(weight: Any) -> nn.Module:
    """An Int4Linear around an already-quantized Int4Weight (adapt to rgpt_rt.quant at merge)."""
    from rgpt_rt.quant import Int4Linear

    return Int4Linear(weight)
