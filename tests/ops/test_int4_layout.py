"""INT4 layout n16k64 (rgpt_rt/ops/int4_layout.py) against plain loops over its definition, and
the C++ CPU kernels that read it (rgpt_rt._C int4_*_n16k64_cpu) against the exact weights.

Exact where the math allows (STYLE.md §4): packing, unpacking and dequantization are compared with
torch.equal; a one-hot x reads W = (q − z)·s back bit for bit. The GEMV's tolerance: at most 2×
the error of torch's own float32 matmul of the same weights against a float64 reference."""

import pytest
import torch

from rgpt_rt import _C
from rgpt_rt.ops import int4_layout as layout

SHAPES = {  # id: (N, K, group_size)
    "tile-16x64-g64": (16, 64, 64),
    "odd-N37-K192-g64": (37, 192, 64),
    "g128-N40-K256": (40, 256, 128),
    "g32-K96-half-step": (7, 96, 32),  # K % 64 == 32: the last step's second half is padding
    "g96-N20-K288": (20, 288, 96),  # groups that straddle steps
    "per-channel-g192": (18, 192, 192),
}


def random_weight(n, k, group_size, max_zero=16, scale=0.02):
    """Random codes, scales and zeros in the plain [N, K] / [N, K/G] form."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return codes, scales, zeros


def pack_by_loops(codes, scales, zeros, group_size):
    """The layout's definition, one nibble at a time (the module docstring, read literally)."""
    n, k = codes.shape
    tiles, steps, groups = -(-n // 16), -(-k // 64), k // group_size
    qweight = [[0] * (128 * steps) for _ in range(tiles)]
    for tile in range(tiles):
        for step in range(steps):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for j in range(4):
                    word = 0
                    for p in range(8):
                        row = 16 * tile + g + 8 * (p & 1)
                        col = 64 * step + 32 * (j >> 1) + 8 * t + 4 * (j & 1) + (0, 2, 1, 3)[p >> 1]
                        if row < n and col < k:
                            word |= int(codes[row, col]) << (4 * p)
                    qweight[tile][128 * step + 4 * lane + j] = word - (1 << 32) * (word >> 31)
    packed_scales = torch.zeros(tiles, groups, 16, dtype=torch.float16)
    packed_zeros = torch.zeros(tiles, groups, 16, dtype=torch.uint8)
    for tile in range(tiles):
        for group in range(groups):
            for position in range(16):
                row = 16 * tile + position // 2 + 8 * (position % 2)
                if row < n:
                    packed_scales[tile, group, position] = scales[row, group]
                    packed_zeros[tile, group, position] = zeros[row, group]
    return torch.tensor(qweight, dtype=torch.int32), packed_scales, packed_zeros


def exact_weight(codes, scales, zeros, group_size):
    """float64 [N, K]: (q − z)·s, one element at a time."""
    n, k = codes.shape
    weight = torch.empty(n, k, dtype=torch.float64)
    for row in range(n):
        for col in range(k):
            group = col // group_size
            q, z = int(codes[row, col]), int(zeros[row, group])
            weight[row, col] = (q - z) * float(scales[row, group])
    return weight


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_pack_matches_the_definition_and_unpacks(shape):
    n, k, group = SHAPES[shape]
    codes, scales, zeros = random_weight(n, k, group)
    packed = layout.pack(codes, scales, zeros, group)
    expected = pack_by_loops(codes, scales, zeros, group)
    for name, ours, theirs in zip(("qweight", "scales", "zeros"), packed, expected, strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
        assert tuple(ours.shape) == layout.packed_shapes(n, k, group)[name]
    back = layout.unpack(*packed, n, k, group)
    for ours, original in zip(back, (codes, scales, zeros), strict=True):
        assert torch.equal(ours, original)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_dequantize_is_the_exact_product(shape):
    n, k, group = SHAPES[shape]
    codes, scales, zeros = random_weight(n, k, group)
    scales[0, 0] = 2**-24  # subnormal fp16 scales and large ones are exact too
    scales[-1, -1] = 1000.0
    weight = layout.dequantize(*layout.pack(codes, scales, zeros, group), n, k, group)
    assert weight.dtype == torch.float32
    assert torch.equal(weight.double(), exact_weight(codes, scales, zeros, group))


def test_the_exact_product_differs_from_its_fp16_rounding():
    # why the formula changed from nk8i's fp16((q − z)·s): 15 × an 11-bit scale needs 15 bits
    codes = torch.full((1, 64), 15, dtype=torch.uint8)
    scales = torch.tensor([[1 + 2**-10]], dtype=torch.float16)
    zeros = torch.zeros(1, 1, dtype=torch.uint8)
    weight = layout.dequantize(*layout.pack(codes, scales, zeros, 64), 1, 64, 64)
    assert weight[0, 0].item() == 15 * (1 + 2**-10)
    assert weight[0, 0].half().float().item() != weight[0, 0].item()


def test_wrong_inputs_are_refused_clearly():
    codes, scales, zeros = random_weight(8, 128, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        layout.pack(codes, scales[:, :1].repeat(1, 1), zeros[:, :1], 128 + 16)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        layout.packed_shapes(8, 100, 32)
    with pytest.raises(ValueError, match="zeros must be in 0..16"):
        layout.pack(codes, scales, zeros + 17, 64)
    with pytest.raises(ValueError, match="scales must be float16"):
        layout.pack(codes, scales.float(), zeros, 64)
    packed = layout.pack(codes, scales, zeros, 64)
    with pytest.raises(ValueError, match="qweight must be torch.int32"):
        layout.unpack(packed[0][:, :-1], packed[1], packed[2], 8, 128, 64)


# --- the CUDA kernel's arithmetic, emulated: fragments of mma.m16n8k16 from one chunk per lane ----
def _pairs(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 32-bit patterns [...] -> float64 [..., 2]: the low and high 16-bit lanes as dtype."""
    halves = torch.stack([bits & 0xFFFF, bits >> 16], dim=-1).to(torch.int32)
    halves = halves.where(halves < 2**15, halves - 2**16).to(torch.int16)
    return halves.view(dtype).to(torch.float64)


def _a_fragments(word: int, zero_g: int, zero_g8: int, bf16: bool) -> list[tuple[float, float]]:
    """What int4_n16k64_cuda.cu's dequant_word computes from one word: a[0..3] as pairs."""
    w = torch.tensor(word & 0xFFFFFFFF, dtype=torch.int64)
    if bf16:  # (word >> 4i & 0x000F000F) | 0x43004300 is 128 + q; minus 128 + z
        zeros = (zero_g, zero_g8, zero_g, zero_g8)
        return [
            tuple(
                (
                    _pairs(((w >> (4 * i)) & 0x000F000F) | 0x43004300, torch.bfloat16)
                    - (128 + zeros[i])
                ).tolist()
            )
            for i in range(4)
        ]
    shifted = w >> 8  # fp16: 0x000F000F -> 1024 + q; 0x00F000F0 -> 1024 + 16 q, × 1/16 − (64 + z)
    low = [
        _pairs((v & 0x000F000F) | 0x64006400, torch.float16) - (1024 + zero_g) for v in (w, shifted)
    ]
    high = [
        _pairs((v & 0x00F000F0) | 0x64006400, torch.float16) / 16 - (64 + zero_g8)
        for v in (w, shifted)
    ]
    return [
        tuple(low[0].tolist()),
        tuple(high[0].tolist()),
        tuple(low[1].tolist()),
        tuple(high[1].tolist()),
    ]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
def test_mma_fragments_built_from_the_chunks_multiply_to_the_tile(bf16):
    # Every lane dequantizes its chunk as the kernel does; the A and B fragments are placed where
    # the PTX ISA puts them for mma.m16n8k16 (row-major A, column B; groupID g = lane / 4, t =
    # lane % 4: a0,a1 row g cols 2t,2t+1; a2,a3 row g+8; a4..a7 the same at cols +8; b0,b1 rows
    # 2t, 2t+1 of column g; b2,b3 rows 2t+8, 2t+9). The four MMAs of a step must give the tile's
    # 16 × M products with x exactly (integer-valued x keeps float64 exact).
    n, k, group, m = 16, 128, 64, 3
    codes, scales, zeros = random_weight(n, k, group)
    qweight, _, packed_zeros = layout.pack(codes, scales, zeros, group)
    x = torch.randint(-8, 9, (m, k)).to(torch.float64)
    for step in range(k // 64):
        words = qweight[0, 128 * step : 128 * (step + 1)].view(32, 4)
        zero_pairs = packed_zeros[0, (64 * step) // group].view(8, 2)
        products = torch.zeros(16, 8, dtype=torch.float64)
        for j in range(4):  # tile j: inputs 64 step + 32 (j >> 1) + 8 t + 4 (j & 1) + 0..3
            a = torch.zeros(16, 16, dtype=torch.float64)
            b = torch.zeros(16, 8, dtype=torch.float64)
            for lane in range(32):
                g, t = divmod(lane, 4)
                frags = _a_fragments(int(words[lane, j]), *map(int, zero_pairs[g]), bf16)
                a[g, 2 * t : 2 * t + 2] = torch.tensor(frags[0])
                a[g + 8, 2 * t : 2 * t + 2] = torch.tensor(frags[1])
                a[g, 2 * t + 8 : 2 * t + 10] = torch.tensor(frags[2])
                a[g + 8, 2 * t + 8 : 2 * t + 10] = torch.tensor(frags[3])
                base = 64 * step + 32 * (j >> 1) + 8 * t + 4 * (j & 1)
                row_of_x = min(g, m - 1)  # B column g is row g of x; extra columns repeat the last
                b[2 * t : 2 * t + 2, g] = x[row_of_x, base : base + 2]
                b[2 * t + 8 : 2 * t + 10, g] = x[row_of_x, base + 2 : base + 4]
            products += a @ b
        q_minus_z = (
            codes[:, 64 * step : 64 * (step + 1)].double()
            - zeros[:, (64 * step) // group, None].double()
        )
        expected = q_minus_z @ x[:, 64 * step : 64 * (step + 1)].T  # [16, M]
        assert torch.equal(products[:, :m], expected)


# --- the C++ CPU kernels -----------------------------------------------------------------------------
needs_kernels = pytest.mark.skipif(
    not hasattr(_C, "int4_linear_n16k64_cpu"),
    reason="rgpt_rt._C predates the n16k64 kernels: rebuild with `make install`",
)
PATHS = [True, False] if _C.int4_cpu_has_simd() else [False]
PATH_IDS = ["avx2", "portable"] if _C.int4_cpu_has_simd() else ["portable"]


def linear_cpu(x, packed, n, k, group, bias=None, threads=1, simd=True):
    """The n16k64 CPU GEMV through the binding: x float32 [M, K] -> [M, N]."""
    qweight, scales, zeros = packed
    x = x.contiguous()
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    _C.int4_linear_n16k64_cpu(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        0 if bias is None else bias.data_ptr(), out.data_ptr(),
        x.shape[0], n, k, group, threads, simd,
    )  # fmt: skip
    return out


def dequant_cpu(packed, n, k, group, rows, simd=True, threads=1):
    qweight, scales, zeros = packed
    out = torch.empty(rows[1] - rows[0], k, dtype=torch.float32)
    _C.int4_dequant_n16k64_cpu(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
        n, k, group, rows[0], rows[1], threads, simd,
    )  # fmt: skip
    return out


CPU_CASES = {  # id: (M, N, K, group_size)
    "llama-K4096-N300-M1": (1, 300, 4096, 128),
    "M2-N113-K4224": (2, 113, 4096 + 128, 128),
    "M5-N64-K512-g64": (5, 64, 512, 64),
    "M9-N30-K512-g256": (9, 30, 512, 256),
    "M3-N7-K96-g32": (3, 7, 96, 32),
    "M4-N20-K288-g96": (4, 20, 288, 96),
}


@needs_kernels
@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_cpu_gemv_matches_the_reference(case, simd):
    m, n, k, group = CPU_CASES[case]
    codes, scales, zeros = random_weight(n, k, group)
    packed = layout.pack(codes, scales, zeros, group)
    weight = layout.dequantize(*packed, n, k, group)
    x, bias = torch.randn(m, k), torch.randn(n)
    out = linear_cpu(x, packed, n, k, group, bias, threads=2, simd=simd)
    reference = x.double() @ weight.double().T + bias.double()
    baseline = x @ weight.T + bias
    ours = (out.double() - reference).abs().max().item()
    torch_error = (baseline.double() - reference).abs().max().item()
    # at most 2× the error of torch's float32 matmul of the same (exact) weights against fp64
    assert ours <= 2 * torch_error, f"ours {ours:.3g}, torch float32 {torch_error:.3g}"


@needs_kernels
@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cpu_gemv_reads_the_exact_weight_back(simd, group):
    # one-hot rows of x: each output is 1·W[n, k] = (q − z)·s, bit for bit (subnormal and large
    # scales, zero = 16 included)
    n, k = 24, 256
    codes, scales, zeros = random_weight(n, k, group)
    scales[0, :2] = torch.tensor([2**-24, 1000.0], dtype=torch.float16)
    packed = layout.pack(codes, scales, zeros, group)
    out = linear_cpu(torch.eye(k), packed, n, k, group, simd=simd)
    assert torch.equal(out.T, layout.dequantize(*packed, n, k, group))


@needs_kernels
@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
def test_cpu_dequantize_is_exact_for_any_row_range(simd):
    n, k, group = 53, 320, 64
    packed = layout.pack(*random_weight(n, k, group), group)
    expected = layout.dequantize(*packed, n, k, group)
    for rows in ((0, n), (5, 30), (16, 32), (50, 53), (7, 7)):
        assert torch.equal(
            dequant_cpu(packed, n, k, group, rows, simd), expected[rows[0] : rows[1]]
        )
    assert torch.equal(dequant_cpu(packed, n, k, group, (0, n), simd, threads=2), expected)
    with pytest.raises(ValueError, match="rows must satisfy"):
        dequant_cpu(packed, n, k, group, (10, 60), simd)


@needs_kernels
def test_cpu_threads_split_rows_not_sums():
    n, k, group = 200, 1024, 128
    packed = layout.pack(*random_weight(n, k, group), group)
    x = torch.randn(3, k)
    one = linear_cpu(x, packed, n, k, group, threads=1)
    assert torch.equal(one, linear_cpu(x, packed, n, k, group, threads=2))


@needs_kernels
def test_cpu_kernel_refuses_bad_sizes():
    packed = layout.pack(*random_weight(8, 128, 64), 64)
    with pytest.raises(ValueError, match="multiple of group_size"):
        linear_cpu(torch.randn(1, 128), packed, 8, 128, 96)


@needs_kernels
def test_gemv_launch_plan():
    sms = 132  # an H100 / H200
    assert _C.int4_gemv_n16k64_splits(32000, 4096, sms) == 1  # 2000 tiles: 95% of 16 per SM
    assert _C.int4_gemv_n16k64_splits(11008, 4096, sms) == 2  # 688 tiles: 6 per SM, 87% full
    assert _C.int4_gemv_n16k64_splits(4096, 4096, sms) == 3  # 256 tiles: < 4 blocks per SM
    assert _C.int4_gemv_n16k64_splits(64, 4096, sms) == 4  # capped: >= 16 steps per split
    assert _C.int4_gemv_n16k64_splits(4096, 4096, 16) == 1  # AGX Orin: 256 tiles fill 16 SMs
    assert _C.int4_gemv_n16k64_workspace_bytes(1, 4096, 1) == 0
    assert _C.int4_gemv_n16k64_workspace_bytes(2, 100, 3) == 32 + 4 * 3 * 2 * 100  # 7 counters
