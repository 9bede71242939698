"""The fused decode step's C++ twins (rgpt_rt/ops/decode.py over csrc/decode/decode_cpu.cpp)
against their torch references, on 7B shapes and awkward ones; tolerances in decode_cases.py.
The CUDA kernels run the same cases in tests/gpu/test_decode_fused_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decode_cases import (
    CACHE_PAIRS,
    CPU_ONLY_HEADS,
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

from rgpt_rt import _C
from rgpt_rt.ops import decode as ops

ALL_HEADS = {**HEADS, **CPU_ONLY_HEADS}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- add + RMSNorm -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "first-layer"])
def test_add_rms_norm(shape, dtype, with_residual):
    x, residual, weight = norm_inputs(*shape, dtype, "cpu")
    residual = residual if with_residual else None
    normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_summed = ops.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_summed)  # one add, rounded once: exact
    r = ref_summed.double()
    exact = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    baseline = F.rms_norm(ref_summed.float(), (shape[1],), weight.float(), 1e-5).to(dtype)
    assert_within_twice_torch(normed, baseline, exact, "normed")
    assert_within_twice_torch(ref_normed, baseline, exact, "the reference itself")


# --- rope + KV append --------------------------------------------------------------------------
def _rope_portable(qkv, k_cache, v_cache, positions, cos, sin, H, Hkv):
    """rope_kv_append without the F16C cache rows (the code other CPUs run)."""
    B, _, max_len, hd = k_cache.shape
    _C.decode_rope_kv_append(
        qkv.data_ptr(), qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.numel(), 1, B, H, Hkv,
        hd, max_len, cos.shape[0], ops.DTYPE_TAGS[qkv.dtype], ops.DTYPE_TAGS[k_cache.dtype],
        False, 0, use_simd=False,
    )  # fmt: skip


@pytest.mark.parametrize("pair", CACHE_PAIRS.values(), ids=CACHE_PAIRS.keys())
@pytest.mark.parametrize("heads", ALL_HEADS.values(), ids=ALL_HEADS.keys())
@pytest.mark.parametrize("path", ["simd", "portable"])
def test_rope_kv_append_is_the_unfused_arithmetic_bit_for_bit(heads, pair, path):
    H, Hkv, hd, lengths = heads
    qkv, k_cache, v_cache, positions, cos, sin = cache_inputs(H, Hkv, hd, lengths, *pair, "cpu")
    expected = [t.clone() for t in (qkv, k_cache, v_cache)]
    rope = ops.rope_kv_append if path == "simd" else _rope_portable
    rope(qkv, k_cache, v_cache, positions, cos, sin, H, Hkv)
    ops.rope_kv_append_reference(*expected, positions, cos, sin, H, Hkv)
    for ours, ref in zip((qkv, k_cache, v_cache), expected):
        assert torch.equal(ours, ref)


def test_rope_kv_append_several_tokens_per_row():
    # a prefill's shape: token n = b t + i at positions[b, i]; the extra qkv columns untouched
    H, Hkv, hd = 4, 2, 64
    qkv, k_cache, v_cache, _, cos, sin = cache_inputs(
        H, Hkv, hd, [20, 20], *CACHE_PAIRS["fp32-cache-fp16"], "cpu"
    )
    qkv = torch.randn(6, qkv.shape[1])
    positions = torch.tensor([[4, 5, 6], [10, 11, 12]])
    expected = [t.clone() for t in (qkv, k_cache, v_cache)]
    ops.rope_kv_append(qkv, k_cache, v_cache, positions, cos, sin, H, Hkv)
    ops.rope_kv_append_reference(*expected, positions, cos, sin, H, Hkv)
    for ours, ref in zip((qkv, k_cache, v_cache), expected):
        assert torch.equal(ours, ref)


# --- decode attention --------------------------------------------------------------------------
def _attention_case(heads, pair, seed=0):
    H, Hkv, hd, lengths = heads
    qkv, k_cache, v_cache, positions, _, _ = cache_inputs(H, Hkv, hd, lengths, *pair, "cpu", seed)
    return query_view(qkv, H, hd), k_cache, v_cache, positions


def _portable(q, k_cache, v_cache, positions):
    """decode_attention without the AVX2 path (the one other CPUs run)."""
    B, H, hd = q.shape
    out = q.new_empty(B, H * hd)
    _C.decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), positions.data_ptr(),
        out.data_ptr(), B, H, k_cache.shape[1], hd, k_cache.shape[2], 1 / math.sqrt(hd),
        ops.DTYPE_TAGS[q.dtype], ops.DTYPE_TAGS[k_cache.dtype], 1, 0, 0, False, 0, 1,
        use_simd=False,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("pair", CACHE_PAIRS.values(), ids=CACHE_PAIRS.keys())
@pytest.mark.parametrize("heads", ALL_HEADS.values(), ids=ALL_HEADS.keys())
@pytest.mark.parametrize("path", ["simd", "portable"])
def test_decode_attention_over_each_rows_length(heads, pair, path):
    q, k_cache, v_cache, positions = _attention_case(heads, pair)
    poison_past_lengths(k_cache, v_cache, positions)  # never read
    if path == "simd":
        out = ops.decode_attention(q, k_cache, v_cache, positions)
    else:
        out = _portable(q, k_cache, v_cache, positions)
    exact = ops.decode_attention_reference(q, k_cache, v_cache, positions, torch.float64)
    # the same-precision torch baseline: what the unfused step computes (SDPA in q's dtype)
    baseline = ops.decode_attention_reference(q, k_cache, v_cache, positions, q.dtype)
    assert out.shape == (q.shape[0], q.shape[1] * q.shape[2]) and out.dtype == q.dtype
    assert_within_twice_torch(out, baseline, exact, f"attention ({path})")


def test_decode_attention_threads_give_the_same_bits():
    heads = HEADS["gqa-32over8-hd128-3rows"]
    q, k_cache, v_cache, positions = _attention_case(heads, CACHE_PAIRS["fp32-cache-fp16"])
    one = ops.decode_attention(q, k_cache, v_cache, positions)
    torch.set_num_threads(2)  # large enough for threads: (row, kv head) pairs split, sums not
    assert torch.equal(ops.decode_attention(q, k_cache, v_cache, positions), one)


# --- SiLU · mul --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SILU_ROWS.values(), ids=SILU_ROWS.keys())
@pytest.mark.parametrize("path", ["simd", "portable"])
def test_silu_mul(shape, dtype, path):
    rows, inner = shape
    gate_up = (3 * torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(1))).to(
        dtype
    )
    ends = torch.tensor([-100.0, -88.5, -87.0, -20.0, 0.0, 30.0, 88.5, 100.0])  # exp's range
    gate_up[0, : min(8, inner)] = ends[: min(8, inner)]
    if path == "simd":
        out = ops.silu_mul(gate_up)
    else:
        out = gate_up.new_empty(rows, inner)
        _C.decode_silu_mul(
            gate_up.data_ptr(), out.data_ptr(), rows, inner, ops.DTYPE_TAGS[dtype], False, 0,
            use_simd=False,
        )  # fmt: skip
    gate, up = gate_up.chunk(2, dim=-1)
    baseline = F.silu(gate) * up  # the unfused step, in the dtype
    assert_within_twice_torch(out, baseline, ops.silu_mul_reference(gate_up), "silu_mul")


# --- the ops as torch.library ops --------------------------------------------------------------
def test_the_ops_pass_torch_library_opcheck():
    x, residual, weight = norm_inputs(2, 64, torch.float32, "cpu")
    torch.library.opcheck(ops.add_rms_norm_op, (x, residual, weight, 1e-5))
    torch.library.opcheck(ops.add_rms_norm_op, (x, None, weight, 1e-5))
    H, Hkv, hd, lengths = ALL_HEADS["tiny-4over2-hd64"]
    case = cache_inputs(H, Hkv, hd, lengths, *CACHE_PAIRS["fp32-cache-fp16"], "cpu")
    torch.library.opcheck(ops.rope_kv_append_op, (*case, H, Hkv))
    q = query_view(case[0], H, hd)
    torch.library.opcheck(ops.decode_attention_op, (q, case[1], case[2], case[3], None, 1))
    torch.library.opcheck(ops.silu_mul_op, (torch.randn(3, 40),))


def test_a_compiled_step_runs_the_same_ops():
    H, Hkv, hd, lengths = ALL_HEADS["tiny-4over2-hd64"]
    qkv, k_cache, v_cache, positions, cos, sin = cache_inputs(
        H, Hkv, hd, lengths, *CACHE_PAIRS["fp32-cache-fp32"], "cpu"
    )
    x, residual, weight = norm_inputs(2, H * hd, torch.float32, "cpu")

    def step(qkv, k_cache, v_cache, x, residual):
        normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
        ops.rope_kv_append(qkv, k_cache, v_cache, positions, cos, sin, H, Hkv)
        out = ops.decode_attention(query_view(qkv, H, hd), k_cache, v_cache, positions)
        return normed + out, summed, ops.silu_mul(torch.cat((out, summed), dim=-1))

    eager_args = [t.clone() for t in (qkv, k_cache, v_cache, x, residual)]
    compiled_args = [t.clone() for t in (qkv, k_cache, v_cache, x, residual)]
    expected = step(*eager_args)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_args)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for a, b in zip(eager_args, compiled_args):  # the in-place writes happened once, alike
        assert torch.equal(a, b)


# --- plans and errors --------------------------------------------------------------------------
def test_attention_plan():
    assert ops.attention_workspace(1, 32, 32, 128, 1024, "cpu") == (None, 1)
    # H100 (132 SMs), 7B batch 1: ~2 blocks per SM; never more than the longest row's tiles
    assert _C.decode_attention_splits(32, 1024, 132) == 9
    assert _C.decode_attention_splits(32, 100, 132) == 2
    assert _C.decode_attention_splits(8 * 32, 1024, 132) == 2
    assert _C.decode_attention_splits(32, 4096, 16) == 1  # Orin: 16 SMs
    assert _C.decode_attention_workspace_bytes(1, 32, 32, 128, 1) == 0
    assert _C.decode_attention_workspace_bytes(2, 32, 8, 128, 9) == 64 + 4 * 16 * 9 * 4 * 130
    assert ops.cuda_supports(32, 8, 128, torch.float16, torch.float16)
    assert ops.cuda_supports(32, 32, 128, torch.float32, torch.float16)
    assert not ops.cuda_supports(4, 2, 16, torch.float32, torch.float32)  # head_dim 16
    assert not ops.cuda_supports(64, 4, 128, torch.float16, torch.float16)  # 16 heads per kv head
    assert not ops.cuda_supports(32, 32, 128, torch.float16, torch.float32)


def test_errors_say_what_is_wrong():
    H, Hkv, hd, lengths = ALL_HEADS["tiny-4over2-hd64"]
    qkv, k_cache, v_cache, positions, cos, sin = cache_inputs(
        H, Hkv, hd, lengths, *CACHE_PAIRS["fp32-cache-fp32"], "cpu"
    )
    x, residual, weight = norm_inputs(2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        ops.add_rms_norm(x, residual, weight[:4], 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        ops.add_rms_norm(x, residual.half(), weight, 1e-5)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.silu_mul(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"qkv must be \[B·t"):
        ops.rope_kv_append(qkv[:, :10], k_cache, v_cache, positions, cos, sin, H, Hkv)
    with pytest.raises(ValueError, match="kv heads"):
        ops.rope_kv_append(qkv, k_cache, v_cache, positions, cos, sin, H, 1)
    with pytest.raises(ValueError, match="outside the cache's slots"):
        ops.rope_kv_append(qkv, k_cache, v_cache, positions + 100, cos, sin, H, Hkv)
    q = query_view(qkv, H, hd)
    with pytest.raises(ValueError, match="outside the cache's slots"):
        ops.decode_attention(q, k_cache, v_cache, positions - 61)
    with pytest.raises(ValueError, match="positions must be int64"):
        ops.decode_attention(q, k_cache, v_cache, positions.int())
    with pytest.raises(ValueError, match="heads must be contiguous"):
        ops.decode_attention(torch.randn(2, hd, H).transpose(1, 2), k_cache, v_cache, positions)
