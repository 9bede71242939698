"""The fused decode step on CUDA (csrc/decode/decode_cuda.cu): each kernel against its torch
reference and its C++ twin on the cases of tests/decode_cases.py; split-KV attention at several
split counts (rows shorter than the splits included), deterministic, its counters reset, in a
CUDA graph replayed at new lengths; the fused decoder against transformers and the unfused
step, one graph per cache, and at most 9 kernels per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decode_cases import (
    CACHE_PAIRS,
    DTYPES,
    HEADS,
    ROWS,
    SILU_ROWS,
    assert_within_twice_torch,
    cache_inputs,
    norm_inputs,
    poison_past_lengths,
    query_view,
)
from transformers import LlamaConfig, LlamaForCausalLM

from rgpt_rt import _C
from rgpt_rt.ops import decode as ops
from rgpt_rt.runtime import generate
from rgpt_rt.runtime.loading import load_decoder

CUDA = "cuda"
MAX_LAUNCHES_PER_LAYER = 9  # issue 23


# --- the kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "first-layer"])
def test_add_rms_norm_cuda(shape, dtype, with_residual):
    x, residual, weight = norm_inputs(*shape, dtype, CUDA)
    residual = residual if with_residual else None
    normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
    _, ref_summed = ops.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_summed)
    r = ref_summed.double()
    exact = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    baseline = F.rms_norm(
        ref_summed, (shape[1],), weight, 1e-5
    )  # CUDA's: fp32 inside, one rounding
    assert_within_twice_torch(normed, baseline, exact, "normed")
    twin, _ = ops.add_rms_norm(
        *(t.cpu() if t is not None else None for t in (x, residual, weight)), 1e-5
    )
    assert_within_twice_torch(normed.cpu(), twin, exact.cpu(), "against the C++ twin")


@pytest.mark.parametrize("pair", CACHE_PAIRS.values(), ids=CACHE_PAIRS.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_rope_kv_append_cuda_is_exact(heads, pair):
    H, Hkv, hd, lengths = heads
    case = cache_inputs(H, Hkv, hd, lengths, *pair, CUDA)
    qkv, k_cache, v_cache, positions, cos, sin = case
    expected = [t.clone() for t in (qkv, k_cache, v_cache)]
    twin = [t.cpu() for t in (qkv, k_cache, v_cache)]
    ops.rope_kv_append(qkv, k_cache, v_cache, positions, cos, sin, H, Hkv)
    ops.rope_kv_append_reference(*expected, positions, cos, sin, H, Hkv)
    ops.rope_kv_append(*twin, positions.cpu(), cos.cpu(), sin.cpu(), H, Hkv)
    for ours, ref, cpu in zip((qkv, k_cache, v_cache), expected, twin):
        assert torch.equal(ours, ref) and torch.equal(ours.cpu(), cpu)


def _workspace(q, k_cache, splits):
    B, H, hd = q.shape
    nbytes = _C.decode_attention_workspace_bytes(B, H, k_cache.shape[1], hd, splits)
    return torch.zeros(max(nbytes, 16), dtype=torch.uint8, device=CUDA)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("pair", CACHE_PAIRS.values(), ids=CACHE_PAIRS.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_decode_attention_cuda(heads, pair, splits):
    H, Hkv, hd, lengths = heads
    qkv, k_cache, v_cache, positions, _, _ = cache_inputs(H, Hkv, hd, lengths, *pair, CUDA)
    poison_past_lengths(k_cache, v_cache, positions)  # never read: no mask, no padding
    q = query_view(qkv, H, hd)
    workspace = _workspace(q, k_cache, splits)
    out = ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits)
    exact = ops.decode_attention_reference(q, k_cache, v_cache, positions, torch.float64)
    baseline = ops.decode_attention_reference(q, k_cache, v_cache, positions, q.dtype)
    assert_within_twice_torch(out, baseline, exact, f"attention, {splits} splits")
    # deterministic, and the last block left the counters at zero for the next launch
    assert torch.equal(ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits), out)
    counters = workspace[: 4 * q.shape[0] * Hkv].view(torch.int32)
    assert not counters.any()
    twin = ops.decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), positions.cpu())
    assert_within_twice_torch(out.cpu(), twin, exact.cpu(), "against the C++ twin")


def test_decode_attention_in_a_cuda_graph_serves_every_length():
    H, Hkv, hd, _ = HEADS["gqa-32over8-hd128-3rows"]
    pair = CACHE_PAIRS["fp16-cache-fp16"]
    qkv, k_cache, v_cache, positions, _, _ = cache_inputs(H, Hkv, hd, [800, 800, 800], *pair, CUDA)
    q = query_view(qkv, H, hd)
    workspace, splits = ops.attention_workspace(3, H, Hkv, hd, k_cache.shape[2], CUDA)
    assert splits > 1  # an H100/H200: 3 rows × 8 kv heads fill few SMs
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits)
    for lengths in ([1, 2, 3], [800, 64, 65], [257, 799, 1]):
        positions.copy_(torch.tensor([n - 1 for n in lengths]))
        graph.replay()
        eager = ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits)
        assert torch.equal(out, eager), lengths


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SILU_ROWS.values(), ids=SILU_ROWS.keys())
def test_silu_mul_cuda(shape, dtype):
    rows, inner = shape
    gate_up = (3 * torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(1))).to(
        CUDA, dtype
    )
    out = ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_twice_torch(out, F.silu(gate) * up, ops.silu_mul_reference(gate_up), "silu_mul")


# --- the decoder -------------------------------------------------------------------------------
VOCAB = 256


@pytest.fixture(scope="module")
def llama_hd64(tmp_path_factory):
    """A tiny GQA LLaMA whose heads the CUDA kernels take (head_dim 64)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama_hd64")
    model.save_pretrained(str(folder))
    return model, folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _ids(n: int, rows: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def test_fused_cuda_decoder_matches_transformers(llama_hd64):
    model, folder = llama_hd64
    decoder = load_decoder(folder, device=CUDA)  # fp32
    ids = _ids(300).to(CUDA)
    with torch.no_grad():
        ref = model.to(CUDA)(ids).logits[0]
    model.cpu()
    cache = decoder.new_cache(1, 320)
    assert decoder.runs_fused_step(cache)
    decoder.prefill(cache, input_ids=ids[:, :240])
    steps = torch.stack([decoder.decode_step(ids[:, t], cache)[0] for t in range(240, 300)])
    assert list(cache.graphs) == [320]  # one graph across the 256-slot bucket's end
    assert _rel(steps, ref[240:]) <= 1e-5


@pytest.mark.parametrize("quant", [None, "int4"])
def test_fused_cuda_decoder_equals_unfused(llama_hd64, quant):
    decoder = load_decoder(
        llama_hd64[1], dtype=torch.float16, quant=quant, group_size=64, device=CUDA
    )
    decoder.fuse_projections()
    ids, lengths = _ids(40, rows=3, seed=3).to(CUDA), [5, 40, 17]
    logits = {}
    for kind in ("fused", "unfused"):  # teacher-forced: the same tokens into both
        decoder.decode_step_kind = kind
        cache = decoder.new_cache(3, 64)
        decoder.prefill(cache, input_ids=ids, lengths=lengths)
        logits[kind] = torch.stack([decoder.decode_step(ids[:, t], cache) for t in range(20)])
        assert list(cache.graphs) == [64]  # the fused: one per cache; unfused: one bucket
    # fp16: the fused kernels round once where the unfused ops round per op
    assert _rel(logits["fused"], logits["unfused"]) <= 5e-3
    assert (logits["fused"].argmax(-1) == logits["unfused"].argmax(-1)).float().mean() >= 0.9


def test_heads_the_kernels_do_not_take_run_the_unfused_step(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    decoder = load_decoder(tmp_path, device=CUDA)  # head_dim 32
    cache = decoder.new_cache(1, 16)
    assert decoder.decode_step_kind == "fused" and not decoder.runs_fused_step(cache)
    assert generate(decoder, input_ids=[1, 2, 3], max_new_tokens=4)


def count_step_kernels(decoder, cache, tokens, positions) -> int:
    """CUDA kernels of one fused decode step body (what its graph holds), from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decoder.step_logits(tokens, positions, cache, cache.max_len)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.step_logits(tokens, positions, cache, cache.max_len)
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    )


def test_a_fused_int4_step_launches_at_most_9_kernels_per_layer(llama_hd64, record_property):
    decoder = load_decoder(
        llama_hd64[1], dtype=torch.float16, quant="int4", group_size=64, device=CUDA
    )
    decoder.fuse_projections()
    cache = decoder.new_cache(2, 64)
    decoder.prefill(cache, input_ids=_ids(20, rows=2))
    tokens = torch.tensor([1, 2], device=CUDA)
    positions = cache.lengths.to(CUDA)
    launches = count_step_kernels(decoder, cache, tokens, positions)
    layers = len(decoder.layers)
    record_property("fused_step_launches", launches)
    # per layer 9; per step the embedding, the final norm and lm_head
    assert launches <= MAX_LAUNCHES_PER_LAYER * layers + 3, launches
    decoder.decode_step_kind = "unfused"
    record_property("unfused_step_launches", count_step_kernels(decoder, cache, tokens, positions))
