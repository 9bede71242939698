"""The previous INT4 kernels (layout nk8i, W = fp16((q − z)·s); rgpt_rt/ops/int4_nk8i.py), kept
for timing beside n16k64: the layout against its description, and the CPU kernels against the
fp16 weights they use.

Exact where the math allows (STYLE.md §4): packing and a one-hot x reading the weights back are
compared with torch.equal; products: at most 2× the error of torch's same-precision matmul of the
same fp16 weights against fp64."""

import pytest
import torch
from int4_cases import check_int4_output

from rgpt_rt import _C
from rgpt_rt.ops import int4 as int4_ops
from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.ops.int4_layout import dequantize_nk8i, pack_nk8i, unpack_nk8i
from rgpt_rt.ops.int4_nk8i import gemv_splits_nk8i, int4_linear_nk8i, nk8i_tensors

PATHS = [True, False] if _C.int4_cpu_has_simd() else [False]
PATH_IDS = ["avx2", "portable"] if _C.int4_cpu_has_simd() else ["portable"]


def unpack_by_pairs(qweight: torch.Tensor) -> torch.Tensor:
    """Layout nk8i from its stated property, not the packer's table: `(word >> 4i) & 0x000F000F`
    holds k = 8j + 2i in the low 16 bits and k = 8j + 2i + 1 in the high 16 bits."""
    n, words = qweight.shape
    codes = torch.empty(n, words * 8, dtype=torch.uint8)
    for row in range(n):
        for j in range(words):
            word = int(qweight[row, j]) & 0xFFFFFFFF
            for i in range(4):
                pair = (word >> (4 * i)) & 0x000F000F
                codes[row, 8 * j + 2 * i] = pair & 0xF
                codes[row, 8 * j + 2 * i + 1] = pair >> 16
    return codes


def random_nk8i(n, k, group_size=128, max_zero=16, scale=0.02):
    """Random nk8i tensors (qweight, scales, zeros) and their fp16 weight [N, K]."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32)
    scales = (torch.rand(n, k // group_size) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return (qweight, scales, zeros), dequantize_nk8i(qweight, scales, zeros, group_size)


def test_pack_matches_the_layout_description():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    qweight = pack_nk8i(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (5, 8)
    assert torch.equal(unpack_by_pairs(qweight), codes)
    assert torch.equal(unpack_nk8i(qweight), codes)
    # k = 0..7 hold codes 1..8: nibble positions [0,2,4,6,1,3,5,7] get k = 0,2,4,6,1,3,5,7
    word = int(pack_nk8i(torch.arange(1, 9, dtype=torch.uint8)[None])[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * p)) & 0xF for p in range(8)] == [1, 3, 5, 7, 2, 4, 6, 8]
    assert int(pack_nk8i(torch.full((1, 8), 15, dtype=torch.uint8))[0, 0]) == -1  # all bits set


def test_an_int4_weight_repacks_to_the_same_codes():
    codes = torch.randint(0, 16, (37, 256), dtype=torch.uint8)
    scales = torch.rand(37, 2).half()
    zeros = torch.randint(0, 17, (37, 2), dtype=torch.uint8)
    qweight, old_scales, old_zeros = nk8i_tensors(Int4Weight.pack(codes, scales, zeros, 128))
    assert torch.equal(unpack_nk8i(qweight), codes)
    assert torch.equal(old_scales, scales) and torch.equal(old_zeros, zeros)


CASES = {  # id: (M, N, K, group_size)
    "llama-up-K4096+128-M2": (2, 11008, 4096 + 128, 128),
    "odd-N113-K4224-M5": (5, 113, 4096 + 128, 128),
    "tiny-N7-K96-g32-M1": (1, 7, 96, 32),
    "prefill-M40-N113-K512": (int4_ops.CPU_GEMM_MIN_ROWS + 8, 113, 512, 128),
}


@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cpu_matches_the_reference(case, simd, monkeypatch):
    monkeypatch.setattr(int4_ops, "CPU_GEMM_TILE_BYTES", 40 * 4 * 512)  # several GEMM tiles
    m, n, k, group = CASES[case]
    packed, weight = random_nk8i(n, k, group)
    for dtype in (torch.float32, torch.bfloat16):
        x, bias = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
        out = int4_linear_nk8i(x, *packed, group, bias, num_threads=2)
        assert out.dtype == dtype and out.shape == (m, n)
        check_int4_output(out, x, weight, bias)


def test_one_hot_rows_read_the_fp16_weight_back_exactly():
    k = 256
    (qweight, scales, zeros), weight = random_nk8i(10, k, 64)
    scales[0] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16)
    weight = dequantize_nk8i(qweight, scales, zeros, 64)
    eye = torch.eye(k)
    gemm = int4_linear_nk8i(eye, qweight, scales, zeros, 64)
    gemv = torch.cat(
        [int4_linear_nk8i(eye[i : i + 4], qweight, scales, zeros, 64) for i in range(0, k, 4)]
    )
    assert torch.equal(gemm.T, weight.float()) and torch.equal(gemv.T, weight.float())


def test_leading_dims_permutation_and_errors():
    (qweight, scales, zeros), weight = random_nk8i(16, 256)
    perm = torch.randperm(256)
    x = torch.randn(2, 3, 256)
    out = int4_linear_nk8i(x, qweight, scales, zeros, 128, perm=perm)
    assert out.shape == (2, 3, 16)
    check_int4_output(out.reshape(6, 16), x.reshape(6, 256)[:, perm], weight)
    with pytest.raises(ValueError, match="takes K = 256"):
        int4_linear_nk8i(torch.randn(1, 255), qweight, scales, zeros, 128)
    with pytest.raises(ValueError, match="nk8i scales must be torch.float16"):
        int4_linear_nk8i(torch.randn(1, 256), qweight, scales.float(), zeros, 128)


def test_gemv_splits_fill_the_gpu_and_give_every_lane_a_chunk():
    sms = 132  # an H100 / H200
    assert gemv_splits_nk8i(11008, 4096, sms) == 1  # 1376 blocks: enough already
    assert gemv_splits_nk8i(4096, 4096, sms) == 2  # 512 blocks < 4 per SM
    assert gemv_splits_nk8i(64, 4096 + 128, sms) == 4  # 132 chunks // 32 lanes
    assert gemv_splits_nk8i(64, 1 << 20, sms) == 16  # MAX_SPLITS
