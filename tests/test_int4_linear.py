"""rgpt_rt.ops.int4_linear (layout n16k64) on the CPU against its reference (dequantize +
matmul in fp64), and the Int4Linear module.

Tolerance (STYLE.md §4, tests/int4_cases.py): the kernel's max error against the fp64 reference
is at most 2× the error of torch's own same-precision path (x @ dequantize(w).to(x.dtype).T)
against the same reference. The dequantized weights themselves are exact: a one-hot x reads (q − z)·s back bit
for bit. The previous kernels (layout nk8i) are tested in tests/ops/test_int4_nk8i.py."""

import pytest
import torch
from int4_cases import check_int4_output

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
    """Random codes, scales and zeros, packed: no quantizer needed."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return Int4Weight.pack(codes, scales, zeros, group_size)


def check_against_reference(out, x, w, bias=None):
    check_int4_output(out, x, dequantize(w), bias)


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
    out = linear_cpu(x, w.qweight, w.scales, w.zeros, bias, 61, 128, 2, use_simd=simd)
    assert out.dtype == dtype and out.shape == (6, 61)
    check_against_reference(out, x, w, bias)


@pytest.mark.parametrize("simd", PATHS, ids=lambda s: "avx2" if s else "portable")
def test_one_hot_rows_read_the_dequantized_weight_back_exactly(simd):
    # subnormal, tiny and large scales, and zero = 16 (GPTQ v1): the in-register dequantization
    # must give (q − z)·s bit for bit, through the GEMV (few rows) and the tiled GEMM (many)
    k = 256
    w = random_weight(10, k, 64, max_zero=16)
    w.scales[0, 0, 0:4] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16)
    eye = torch.eye(k)
    gemv = torch.cat([
        linear_cpu(eye[i : i + 8], w.qweight, w.scales, w.zeros, None, 10, 64, 2, use_simd=simd)
        for i in range(0, k, 8)
    ])  # fmt: skip
    assert torch.equal(gemv.T, dequantize(w))
    gemm = linear_cpu(eye, w.qweight, w.scales, w.zeros, None, 10, 64, 2, use_simd=simd)
    assert torch.equal(gemm.T, dequantize(w))


@pytest.mark.parametrize("simd", PATHS, ids=lambda s: "avx2" if s else "portable")
def test_prefill_rows_take_the_tiled_gemm_path(simd, monkeypatch):
    # from CPU_GEMM_MIN_ROWS rows on, W is dequantized a tile at a time for torch's GEMM; a small
    # tile makes 113 rows span several tiles, the last one partial
    monkeypatch.setattr(int4_ops, "CPU_GEMM_TILE_BYTES", 40 * 4 * 512)
    w = random_weight(113, 512, 128, max_zero=16)
    for dtype in DTYPES:
        x = torch.randn(int4_ops.CPU_GEMM_MIN_ROWS + 5, 512).to(dtype)
        bias = torch.randn(113).to(dtype)
        out = linear_cpu(x, w.qweight, w.scales, w.zeros, bias, 113, 128, 1, use_simd=simd)
        assert out.dtype == dtype and out.shape == (x.shape[0], 113)
        check_against_reference(out, x, w, bias)


def test_the_dequantized_weight_is_exact_for_any_row_range():
    w = random_weight(37, 256, 64, max_zero=16)
    expected = dequantize(w)
    packed = (w.qweight, w.scales, w.zeros, 37, 256, 64)
    assert torch.equal(int4_ops.dequantize_cpu(*packed), expected)
    assert torch.equal(int4_ops.dequantize_cpu(*packed, rows=(5, 30)), expected[5:30])


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
    with pytest.raises(ValueError, match="scales must be torch.float16"):
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


def test_wrong_inputs_are_refused_clearly():
    w = random_weight(8, 256)
    op = torch.ops.rgpt_rt.int4_linear
    with pytest.raises(ValueError, match="takes K = 256"):
        int4_linear(torch.randn(2, 255), w)
    with pytest.raises(ValueError, match="not supported"):
        int4_linear(torch.randn(2, 256, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="K = 256 is not a multiple of group_size 96"):
        op(torch.randn(2, 256), w.qweight, w.scales, w.zeros, None, 8, 96, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        op(torch.randn(2, 256), w.qweight, w.scales, w.zeros, None, 8, 48, 0)
    with pytest.raises(ValueError, match=r"qweight must be torch.int32 \[2, 512\]"):
        op(torch.randn(2, 256), w.qweight, w.scales, w.zeros, None, 24, 128, 0)  # N 24, not 8


def test_opcheck():
    w = random_weight(24, 256, 64)
    for x, bias in (
        (torch.randn(3, 256), None),
        (torch.randn(1, 256).half(), torch.randn(24).half()),
        (torch.randn(40, 256), torch.randn(24)),  # the tiled GEMM path
    ):
        torch.library.opcheck(
            torch.ops.rgpt_rt.int4_linear.default,
            (x, w.qweight, w.scales, w.zeros, bias, 24, 64, 0),
        )


def test_int4_linear_module():
    linear = torch.nn.Linear(256, 48, bias=True)
    layer = Int4Linear.from_linear(linear, group_size=128)
    assert set(layer.state_dict()) == {"qweight_n16k64", "scales_n16k64", "zeros_n16k64", "bias"}
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


def test_the_previous_kernels_run_when_asked(monkeypatch):
    # RGPT_INT4_KERNEL=nk8i: the layer repacks its weight and runs the nk8i kernels, whose
    # weight is fp16((q − z)·s); for timing old beside new (issue 23)
    linear = torch.nn.Linear(256, 40, bias=True)
    new = Int4Linear.from_linear(linear, group_size=64)
    monkeypatch.setenv("RGPT_INT4_KERNEL", "nk8i")
    old = Int4Linear(new.weight_int4, new.bias)
    assert set(old.state_dict()) == {"qweight_nk8i", "scales_nk8i", "zeros_nk8i", "bias"}
    assert "kernel=nk8i" in repr(old)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(old.weight_int4, name), getattr(new.weight_int4, name))
    x = torch.randn(3, 256)
    fp16_weight = dequantize(new.weight_int4).half().float()
    torch.testing.assert_close(old(x), x @ fp16_weight.T + new.bias, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("RGPT_INT4_KERNEL", "nk9")
    with pytest.raises(ValueError, match="RGPT_INT4_KERNEL='nk9' is unknown"):
        Int4Linear(new.weight_int4)
