"""rgpt_rt.ops.int4_linear on the CPU against its reference (dequantize + matmul in fp64).

Tolerance (STYLE.md §4): the kernel's max error against the fp64 reference is at most 2× the
error of torch's own same-precision path (x @ dequantize(w).to(x.dtype).T) against the same
reference. The dequantized weights themselves are exact: a one-hot x reads them back bit for bit."""

import pytest
import torch

from rgpt_rt import _C
from rgpt_rt.ops import int4 as int4_ops
from rgpt_rt.ops import int4_linear, int4_linear_reference
from rgpt_rt.ops.int4 import linear_cpu
from rgpt_rt.ops.int4_format import Int4Weight, dequantize
from rgpt_rt.quant import load_int4_linears, quantize_linears
from rgpt_rt.runtime.int4_linear import Int4Linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = (
    [True, False] if _C.int4_cpu_has_simd() else [False]
)  # AVX2 path where the CPU has it, portable


def random_weight(n, k, group_size=128, max_zero=15, scale=0.02):
    """Random codes (any 32-bit pattern), scales and zeros: no quantizer needed."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32)
    scales = (torch.rand(n, k // group_size) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return Int4Weight(qweight, scales, zeros, group_size, (n, k))


def max_error(value, reference):
    return (value.to(torch.float64) - reference).abs().max().item()


def check_against_reference(out, x, w, bias=None):
    weight = dequantize(w)
    reference = x.to(torch.float64) @ weight.to(torch.float64).T
    baseline = x @ weight.to(x.dtype).T
    if bias is not None:
        reference = reference + bias.to(torch.float64)
        baseline = baseline + bias.to(x.dtype)
    ours, torch_error = max_error(out, reference), max_error(baseline, reference)
    # at most 2× the error of the same-precision torch baseline against fp64
    assert ours <= 2 * torch_error, (
        f"int4_linear error {ours:.3g} vs torch {x.dtype} {torch_error:.3g}"
    )


CASES = {  # id: (M, N, K, group_size)
    "llama-up-K4096+128-M2": (2, 11008, 4096 + 128, 128),
    "vocab-N32000-M3": (3, 32000, 512, 128),
    "odd-N113-K4224-M5": (5, 113, 4096 + 128, 128),
    "tiny-N7-K96-g32-M1": (1, 7, 96, 32),
    "M9-N30-K512-g64": (9, 30, 512, 64),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_int4_linear_matches_the_reference(case):
    m, n, k, group = CASES[case]
    w = random_weight(n, k, group)
    x = torch.randn(m, k)
    check_against_reference(int4_linear(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("simd", PATHS, ids=lambda s: "avx2" if s else "portable")
def test_dtypes_paths_and_bias(dtype, simd):
    w = random_weight(61, 768, 128, max_zero=16)
    x = torch.randn(6, 768).to(dtype)
    bias = torch.randn(61).to(dtype)
    out = linear_cpu(x, w.qweight, w.scales, w.zeros, bias, 128, 2, use_simd=simd)
    assert out.dtype == dtype and out.shape == (6, 61)
    check_against_reference(out, x, w, bias)


@pytest.mark.parametrize("simd", PATHS, ids=lambda s: "avx2" if s else "portable")
def test_one_hot_rows_read_the_dequantized_weight_back_exactly(simd):
    # subnormal, tiny and large scales, and zero = 16 (GPTQ v1): the in-register dequantization
    # must give fp16((q − z)·s) bit for bit
    k = 256
    w = random_weight(10, k, 64, max_zero=16)
    w.scales[0] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16)
    out = linear_cpu(torch.eye(k), w.qweight, w.scales, w.zeros, None, 64, 2, use_simd=simd)
    assert torch.equal(out.T, dequantize(w).float())


@pytest.mark.parametrize("simd", PATHS, ids=lambda s: "avx2" if s else "portable")
def test_prefill_rows_take_the_tiled_gemm_path(simd, monkeypatch):
    # from CPU_GEMM_MIN_ROWS rows on, W is dequantized a tile at a time for torch's GEMM; a small
    # tile makes 113 rows span several tiles, the last one partial
    monkeypatch.setattr(int4_ops, "CPU_GEMM_TILE_BYTES", 40 * 4 * 512)
    w = random_weight(113, 512, 128, max_zero=16)
    for dtype in DTYPES:
        x = torch.randn(int4_ops.CPU_GEMM_MIN_ROWS + 5, 512).to(dtype)
        bias = torch.randn(113).to(dtype)
        out = linear_cpu(x, w.qweight, w.scales, w.zeros, bias, 128, 1, use_simd=simd)
        assert out.dtype == dtype and out.shape == (x.shape[0], 113)
        check_against_reference(out, x, w, bias)


def test_the_dequantized_weight_is_exact_for_any_row_range():
    w = random_weight(37, 256, 64, max_zero=16)
    expected = dequantize(w).float()
    assert torch.equal(int4_ops.dequantize_cpu(w.qweight, w.scales, w.zeros, 64), expected)
    part = int4_ops.dequantize_cpu(w.qweight, w.scales, w.zeros, 64, rows=(5, 30))
    assert torch.equal(part, expected[5:30])


def test_the_module_gives_the_ops_result():
    # Int4Linear, with and without bias, for decode-sized and prefill-sized inputs, gives the
    # bits of the int4_linear op
    for bias in (False, True):
        layer = Int4Linear.from_linear(torch.nn.Linear(256, 72, bias=bias), group_size=64)
        for shape in ((1, 256), (2, 3, 256), (int4_ops.CPU_GEMM_MIN_ROWS, 256)):
            x = torch.randn(shape)
            via_op = int4_linear(x, layer.weight_int4, layer.bias)
            assert torch.equal(layer(x), via_op)
    with pytest.raises(ValueError, match="takes K = 256"):
        layer(torch.randn(2, 255))
    with pytest.raises(ValueError, match="scales must be float16"):
        layer.float()(torch.randn(1, 256))  # cast scales are refused, never misread


def test_leading_dims_threads_and_empty_batch():
    w = random_weight(40, 256)
    x = torch.randn(2, 3, 256)
    out = int4_linear(x, w)
    assert out.shape == (2, 3, 40)
    two = int4_linear(x, w, num_threads=2)
    assert torch.equal(two, int4_linear(x, w, num_threads=1))  # rows are split, not sums
    assert torch.equal(out, two)
    check_against_reference(out.reshape(6, 40), x.reshape(6, 256), w)
    assert int4_linear(torch.randn(0, 256), w).shape == (0, 40)


def test_act_order_permutation_is_applied_to_x():
    w = random_weight(16, 256)
    perm = torch.randperm(256)
    wp = Int4Weight(w.qweight, w.scales, w.zeros, 128, (16, 256), perm)
    x = torch.randn(3, 256)
    check_against_reference(int4_linear(x, wp), x, wp)  # dequantize(wp) is in the original order
    torch.testing.assert_close(int4_linear_reference(x, wp), int4_linear(x[:, perm], w))


def test_gemv_splits_fill_the_gpu_and_give_every_lane_a_chunk():
    sms = 132  # an H100 / H200
    assert int4_ops.gemv_splits(11008, 4096, sms) == 1  # 1376 blocks: enough already
    assert int4_ops.gemv_splits(4096, 4096, sms) == 2  # 512 blocks < 4 per SM
    assert int4_ops.gemv_splits(64, 4096 + 128, sms) == 4  # 132 chunks // 32 lanes
    assert int4_ops.gemv_splits(64, 1 << 20, sms) == int4_ops.MAX_SPLITS


def test_wrong_inputs_are_refused_clearly():
    w = random_weight(8, 256)
    with pytest.raises(ValueError, match="takes K = 256"):
        int4_linear(torch.randn(2, 255), w)
    with pytest.raises(ValueError, match="not supported"):
        int4_linear(torch.randn(2, 256, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="K = 256 is not a multiple of group_size 96"):
        torch.ops.rgpt_rt.int4_linear(
            torch.randn(2, 256), w.qweight, w.scales, w.zeros, None, 96, 0
        )
    with pytest.raises(ValueError, match="multiple of 32"):
        torch.ops.rgpt_rt.int4_linear(
            torch.randn(2, 256), w.qweight, w.scales, w.zeros, None, 48, 0
        )


def test_opcheck():
    w = random_weight(24, 256, 64)
    for x, bias in (
        (torch.randn(3, 256), None),
        (torch.randn(1, 256).half(), torch.randn(24).half()),
    ):
        torch.library.opcheck(
            torch.ops.rgpt_rt.int4_linear.default, (x, w.qweight, w.scales, w.zeros, bias, 64, 0)
        )


def test_int4_linear_module():
    linear = torch.nn.Linear(256, 48, bias=True)
    layer = Int4Linear.from_linear(linear, group_size=128)
    assert set(layer.state_dict()) == {"qweight_nk8i", "scales", "zeros", "bias"}
    x = torch.randn(4, 256)
    expected = x @ dequantize(layer.weight_int4).float().T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes an Int4Weight"):
        Int4Linear(linear.weight)


def test_quantize_linears_and_load_int4_linears():
    def make():
        torch.manual_seed(1)
        model = torch.nn.Sequential()
        model.add_module("up", torch.nn.Linear(128, 256, bias=False))
        model.add_module("down", torch.nn.Linear(256, 128, bias=False))
        model.add_module("lm_head", torch.nn.Linear(128, 300, bias=False))
        return model

    model = make()
    replaced = quantize_linears(model, group_size=128)
    assert replaced == ["up", "down"]
    assert isinstance(model.up, Int4Linear) and isinstance(model.lm_head, torch.nn.Linear)
    fresh = make()
    load_int4_linears(fresh, {name: getattr(model, name).weight_int4 for name in replaced})
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(100, 8)), group_size=128)
