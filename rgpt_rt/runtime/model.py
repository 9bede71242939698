"""The runtime's LLaMA decoder: its layers (layers.py: RoPE, RMSNorm, grouped-query attention
over a static KV cache, SwiGLU) stacked, the token embeddings, the head, prefill and the decode
step.

    decoder = load_decoder("ckpt/llm", dtype=torch.float16, device="cuda")   # loading.py
    cache = decoder.new_cache(batch_size=1, max_len=1024)                     # kv_cache.py
    logits = decoder.prefill(cache, inputs_embeds=embeds)    # [1, V] at the last token
    logits = decoder.decode_step(next_token, cache)          # [1, V]; a CUDA graph on CUDA (graphs.py)

The decode step is fused by default (`decoder.decode_step_kind`, or RGPT_DECODE_STEP=unfused for
the previous one, kept to time old beside new): per layer add+RMSNorm, the qkv linear, rope +
KV-cache append, attention over each row's own length, the o linear, add+RMSNorm, the gate_up
linear, SiLU·mul and the down linear: 9 kernels on CUDA (rgpt_rt/ops/decode.py; the residual adds
ride in the norms), the same C++ twins on a CPU. Prefill, and heads the CUDA kernels do not take,
run the unfused layers.

Module names are HF's without the "model." prefix, so HF-named weights map one to one.
No transformers here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rgpt_rt.config import LLMConfig
from rgpt_rt.ops.decode import add_rms_norm, attention_workspace, cuda_supports
from rgpt_rt.runtime.graphs import decode_graph, graph_kv_len
from rgpt_rt.runtime.hf_llama import rope_type
from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.layers import DecoderLayer, Positions, RMSNorm, rope_inv_freq
from rgpt_rt.runtime.table_in_file import TableInFile

# The linears that become INT4; embeddings, norms and lm_head stay in floating point.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Which decode step a decoder runs (read when it is made; `decode_step_kind` changes it later):
# "fused" (the kernels of rgpt_rt/ops/decode.py) or "unfused" (the previous torch ops, kept to
# time old beside new, issue 23).
DECODE_STEP_ENV = "RGPT_DECODE_STEP"
DECODE_STEPS = ("fused", "unfused")


def decode_step_from_env() -> str:
    kind = os.environ.get(DECODE_STEP_ENV, DECODE_STEPS[0]) or DECODE_STEPS[0]
    if kind not in DECODE_STEPS:
        raise ValueError(f"{DECODE_STEP_ENV}={kind!r} is unknown; use one of {DECODE_STEPS}")
    return kind


class LlamaDecoder(nn.Module):
    """A LLaMA decoder whose module names are HF's without the "model." prefix, so a transformers
    state dict loads as is (loading.py: `decoder_from_state`, `load_decoder`)."""

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
        self.decode_step_kind = decode_step_from_env()  # "fused" or "unfused"
        # the KV cache's dtype (None: the activations'); a bundle's INT4 decoder keeps it in
        # fp16 on a CPU too, for half the memory (loading.py)
        self.kv_dtype: torch.dtype | None = None
        # prefill long prompts this many tokens at a time (None: at once); loading.py sets it on
        # a CPU, where memory is tighter and the GEMMs lose nothing at 128 rows (2 cores, 4096 ->
        # 22016: 1.16 ms a token at 64, 128 or 256 rows)
        self.prefill_chunk: int | None = None
        # the embedding table when it stayed in the bundle's file (a CPU Session: loading.py);
        # embed_tokens is then None
        self.embed_file: TableInFile | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms'): fp32 on a CPU, fp16 on CUDA. The embedding
        table and lm_head may be stored in fp16 on a CPU too (half the memory)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # --- preparing for inference ---------------------------------------------------------------
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
        if self.embed_tokens is not None and not self.config.tie_word_embeddings:
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
        return self.token_rows(input_ids.to(self.device)).to(self.dtype)

    def token_rows(self, tokens: Tensor) -> Tensor:
        """tokens [...] (on the decoder's device) -> their rows of the embedding table [..., D]
        in the table's dtype: from memory, or read from the bundle's file where it stayed."""
        if self.embed_file is not None:
            return self.embed_file.rows(tokens).to(tokens.device)
        return self.embed_tokens.weight.index_select(0, tokens.reshape(-1)).view(*tokens.shape, -1)

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

    def head(self, h: Tensor) -> Tensor:
        """Logits [..., V] of final hidden states [..., D]. An fp16 lm_head under fp32
        activations (a CPU session) multiplies in fp16, as CUDA does: it reads half the bytes."""
        weight = self.lm_head.weight
        if weight.dtype == h.dtype:
            return self.lm_head(h)
        return self.lm_head(h.to(weight.dtype)).to(h.dtype)

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
            dtype=dtype or self.kv_dtype or self.dtype, device=self.device,
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
        chunk = self.prefill_chunk or T
        last = lengths - 1  # [B] host: each row's last real token
        # chunks of a long prompt, each attending to what the cache holds by then: the same
        # function, with activations (attention scores, MLP intermediates) bounded by the chunk;
        # of each chunk's hidden states only the rows' last tokens are kept (unless all_logits)
        parts, h_last = [], x.new_empty(B, self.config.hidden_size)
        for s in range(0, T, chunk):
            h = self(
                x[:, s : s + chunk],
                input_pos[:, s : s + chunk],
                cache,
                kv_len - T + min(T, s + chunk),
            )
            if all_logits:
                parts.append(h)
                continue
            rows = torch.nonzero((last >= s) & (last < s + chunk)).flatten()
            if len(rows):
                at = rows.to(self.device)
                h_last[at] = h[at, (last[rows] - s).to(self.device)]
        cache.lengths += lengths
        if all_logits:
            return self.head(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))  # [B, T, V]
        return self.head(h_last)  # [B, V]

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
        fused = self.runs_fused_step(cache)
        if fused:
            self._attention_workspace(cache)  # made outside any graph capture
        if self.use_cuda_graphs and cache.device.type == "cuda":
            # the fused step attends over each row's own length: one graph per cache
            kv_len = cache.max_len if fused else graph_kv_len(cache)
            logits = decode_graph(self, cache, kv_len, tokens, input_pos)(tokens, input_pos)
        elif fused:
            logits = self.fused_step_logits(tokens, input_pos, cache)
        else:
            uniform = int(start.min()) == int(start.max())  # then no key is masked
            logits = self.step_logits(tokens, input_pos, cache, int(start.max()) + 1, uniform)
        cache.lengths += 1
        return logits

    def runs_fused_step(self, cache: KVCache) -> bool:
        """Whether decode_step runs the fused step for this cache: decode_step_kind is "fused",
        and on CUDA the kernels take the heads (ops/decode.cuda_supports; else unfused)."""
        if self.decode_step_kind not in DECODE_STEPS:
            raise ValueError(
                f"decode_step_kind {self.decode_step_kind!r} is unknown; use one of {DECODE_STEPS}"
            )
        if self.decode_step_kind != "fused":
            return False
        if cache.device.type != "cuda":
            return True
        c = self.config
        return cuda_supports(c.num_heads, c.num_kv_heads, c.head_dim, self.dtype, cache.k.dtype)

    def _attention_workspace(self, cache: KVCache) -> tuple[Tensor | None, int]:
        """The decode attention's (workspace, splits) of this cache, made on first use."""
        if cache.attention_workspace is None:
            c = self.config
            cache.attention_workspace = attention_workspace(
                cache.batch_size, c.num_heads, c.num_kv_heads, c.head_dim, cache.max_len,
                cache.device,
            )  # fmt: skip
        return cache.attention_workspace

    def fused_step_logits(self, tokens: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
        """tokens [B], input_pos [B] (device) -> logits [B, V]: the fused decode step. Row b's
        token goes to slot input_pos[b] and attends over slots 0..input_pos[b]: no mask, no key
        length (a CUDA graph of it serves every length). The residual stream is added inside the
        norms: add_rms_norm(layer output, residual) -> (normed, new residual)."""
        eps = self.config.rms_norm_eps
        rope = (self.rope_cos, self.rope_signed_sin)
        attention = self._attention_workspace(cache)
        x = self.token_rows(tokens).to(self.dtype)  # [B, D]
        residual = None  # the first norm starts the stream with the embeddings
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = cache.layer(i)  # [B, Hkv, T_max, hd]
            h, residual = add_rms_norm(x, residual, layer.input_layernorm.weight, eps)
            x = layer.self_attn.decode(h, input_pos, k_cache, v_cache, rope, attention)
            h, residual = add_rms_norm(x, residual, layer.post_attention_layernorm.weight, eps)
            x = layer.mlp.decode(h)
        h, _ = add_rms_norm(x, residual, self.norm.weight, eps)
        return self.head(h)

    def step_logits(
        self, tokens: Tensor, input_pos: Tensor, cache: KVCache, kv_len: int, unmasked: bool = False
    ) -> Tensor:
        """tokens [B], input_pos [B] (device) -> logits [B, V]: the body of a decode step, without
        its checks or bookkeeping, so a CUDA graph can capture it (graphs.py). The fused step
        when it runs for this cache (kv_len and unmasked then unused), else the layers over the
        first kv_len slots."""
        if self.runs_fused_step(cache):
            return self.fused_step_logits(tokens, input_pos, cache)
        x = self.token_rows(tokens[:, None]).to(self.dtype)  # [B, 1, D]
        h = self(x, input_pos[:, None], cache, kv_len, unmasked)  # [B, 1, D]
        return self.head(h[:, 0])  # [B, V]

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
