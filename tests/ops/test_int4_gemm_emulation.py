"""The CUDA GEMM's data flow (csrc/int4/int4_n16k64_gemm_cuda.cu), emulated step by step on the
CPU, since no GPU is at hand where it is written: which thread copies which 16 bytes of x to which
swizzled chunk of shared memory, which chunk each lane reads back as its B fragments, the groups
read one stage ahead and the flushes at group ends, the epilogue's shared-memory transpose,
split-K and the last block's sum. A and B fragments are placed where the PTX ISA puts them for
mma.m16n8k16 (groupID g = lane / 4, t = lane % 4: a0,a1 row g cols 2t,2t+1; a2,a3 row g+8; a4..a7
the same at cols +8; b0,b1 rows 2t,2t+1 of column g; b2,b3 rows 2t+8,2t+9); the bit-level
dequantization of a word into A fragments is checked in tests/ops/test_int4_layout.py. With
integer x the emulation is exact in float64, so it must equal the formula bit for bit."""

import numpy as np
import pytest
import torch

from rgpt_rt.ops import int4_layout as layout

WARPS, ROWS, STAGES = 8, 64, 3  # kN16K64GemmWarps, kN16K64GemmBlockRows, kStages


def swizzle(row: int, chunk: int) -> int:
    return chunk ^ ((row & 1) << 2)


def emulate(x, codes, scales, zeros, group, splits):
    """out [M, N] float64 as the kernel computes it (grid and plan as the host entry makes)."""
    m, k = x.shape
    n = codes.shape[0]
    tiles, steps, groups = -(-n // 16), -(-k // 64), k // group
    _, packed_scales, packed_zeros = layout.pack(codes, scales, zeros, group)
    pscales = packed_scales.double().numpy()  # [T, groups, 16]: [tile, γ, 2g + r]
    pzeros = packed_zeros.double().numpy()
    padded = np.zeros((tiles * 16, steps * 64))
    padded[:n, :k] = codes.double().numpy()  # codes past N or K are 0, as packed
    xs = x.double().numpy()
    k_steps = 2 if group % 128 == 0 else 1
    halves_groups = 2 if group % 64 != 0 else 1  # kHalves
    # the host entry's plan: whole groups per split, no empty split
    steps_per_group = group // 64 if group % 64 == 0 else 1
    per_split = -(-steps // splits)
    per_split = -(-per_split // steps_per_group) * steps_per_group
    splits = -(-steps // per_split)
    mb = -(-min(m, ROWS) // 8)
    out = np.zeros((m, n))
    partial = np.zeros((splits, m, n))
    group_halves = group // 32
    for bz in range(-(-m // ROWS)):
        m0 = bz * ROWS
        for bx in range(-(-tiles // WARPS)):
            for by in range(splits):
                step_begin = by * per_split
                count = (min(steps, step_begin + per_split) - step_begin) // k_steps
                total = np.zeros((WARPS, mb, 16, 8))  # the warps' C fragments, as matrices
                for warp in range(WARPS):
                    tile = min(bx * WARPS + warp, tiles - 1)
                    meta_group = (2 * step_begin) // group_halves
                    meta_left = group_halves - (2 * step_begin) % group_halves
                    left = meta_left

                    def read_meta():  # the next stage's group(s), one stage ahead
                        nonlocal meta_group, meta_left
                        metas = []
                        for h in range(2 * k_steps):
                            if h < halves_groups:
                                metas.append(meta_group)
                            meta_left -= 1
                            if meta_left == 0:
                                meta_group, meta_left = (
                                    min(meta_group + 1, groups - 1),
                                    group_halves,
                                )
                        return metas

                    metas = read_meta()
                    c = np.zeros((mb, 16, 8))
                    for i in range(count):
                        now = metas
                        if i + 1 < count:
                            metas = read_meta()
                        for sub in range(k_steps):
                            step = step_begin + i * k_steps + sub
                            # shared memory: x rows × 8 chunks of 8 inputs, filled by the copies
                            smem = np.zeros((mb * 8 * 8, 8))
                            for tid in range(WARPS * 32):
                                row0, chunk = tid >> 3, tid & 7
                                x_k = step * 64 + chunk * 8
                                for j in range(-(-mb * 64 // (WARPS * 32))):
                                    if tid + j * WARPS * 32 >= mb * 64:
                                        continue
                                    dst = row0 * 8 + swizzle(row0, chunk) + 256 * j
                                    live = m0 + row0 + 32 * j < m and x_k < k
                                    smem[dst] = xs[m0 + row0 + 32 * j, x_k : x_k + 8] if live else 0
                            smem = smem.reshape(mb * 8, 8, 8)
                            for h in range(2):
                                meta = now[h if halves_groups == 2 else 0]
                                zero = pzeros[tile, meta]  # [16]: [2g + r]
                                for e in range(2):  # word 2h + e: tile of inputs 8t + 4e + 0..3
                                    a = np.zeros((16, 16))
                                    b = np.zeros((mb, 16, 8))
                                    for lane in range(32):
                                        g, t = divmod(lane, 4)
                                        base = step * 64 + 32 * h + 8 * t + 4 * e
                                        for r in range(2):
                                            q = padded[16 * tile + g + 8 * r, base : base + 4]
                                            vals = q - zero[2 * g + r]
                                            a[g + 8 * r, 2 * t : 2 * t + 2] = vals[0:2]
                                            a[g + 8 * r, 2 * t + 8 : 2 * t + 10] = vals[2:4]
                                        for blk in range(mb):
                                            xb = smem[8 * blk + g, swizzle(g, 4 * h + t)]
                                            b[blk, 2 * t : 2 * t + 2, g] = xb[4 * e : 4 * e + 2]
                                            b[blk, 2 * t + 8 : 2 * t + 10, g] = xb[
                                                4 * e + 2 : 4 * e + 4
                                            ]
                                    c += a[None] @ b
                                if halves_groups == 2:
                                    left -= 1
                                    if left == 0 or (h == 1 and i + 1 == count):
                                        s = pscales[tile, meta]  # row g: [2g], row g + 8: [2g + 1]
                                        rows_scale = np.concatenate([s[0::2], s[1::2]])
                                        total[warp] += rows_scale[None, :, None] * c
                                        c[:] = 0
                                        left = group_halves
                        if halves_groups == 1:
                            left -= 2 * k_steps
                            if left == 0 or i + 1 == count:
                                s = pscales[tile, now[0]]
                                total[warp] += np.concatenate([s[0::2], s[1::2]])[None, :, None] * c
                                c[:] = 0
                                left = group_halves
                # epilogue: lane (g, t) writes its C fragment to sums[row of x][output of the block]
                sums = np.zeros((mb * 8, WARPS * 16))
                for warp in range(WARPS):
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        for blk in range(mb):
                            row, col = 8 * blk + 2 * t, warp * 16 + g
                            fragment = total[warp, blk]
                            sums[row, col] = fragment[g, 2 * t]
                            sums[row + 1, col] = fragment[g, 2 * t + 1]
                            sums[row, col + 8] = fragment[g + 8, 2 * t]
                            sums[row + 1, col + 8] = fragment[g + 8, 2 * t + 1]
                rows, n0 = min(mb * 8, m - m0), bx * WARPS * 16
                target = out if splits == 1 else partial[by]
                for r in range(rows * WARPS * 2):
                    row, col = r // (WARPS * 2), (r % (WARPS * 2)) * 8
                    live = min(8, n - n0 - col)
                    if live > 0:
                        target[m0 + row, n0 + col : n0 + col + live] = sums[row, col : col + live]
    return out if splits == 1 else partial.sum(axis=0)  # the last block adds splits in order


CASES = {  # id: (M, N, K, group_size, splits)
    "M20-N40-K640-g128": (20, 40, 640, 128, 1),  # 2-step stages, dead warps (3 tiles of 8)
    "M20-N40-K640-g128-3-splits": (20, 40, 640, 128, 3),
    "M9-N17-K256-g256-2-splits": (9, 17, 512, 256, 2),  # a group spans two stages
    "M33-N16-K320-g64-2-splits": (33, 16, 320, 64, 2),  # 1-step stages, one group each
    "M12-N20-K480-g96-2-splits": (12, 20, 480, 96, 2),  # half-step groups, K % 64 == 32, a
    # split boundary inside a group
    "M12-N20-K288-g96": (12, 20, 288, 96, 1),
    "M70-N24-K128-g32": (70, 24, 128, 32, 1),  # two blocks of rows in z, the second of 6
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_kernels_data_flow_gives_the_formula_exactly(case):
    m, n, k, group, splits = CASES[case]
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.02 + 2e-4).half()
    zeros = torch.randint(0, 17, (n, k // group), dtype=torch.uint8)
    x = torch.randint(-8, 9, (m, k)).double()
    weight = layout.dequantize(*layout.pack(codes, scales, zeros, group), n, k, group).double()
    expected = (x @ weight.T).numpy()
    assert np.array_equal(emulate(x, codes, scales, zeros, group, splits), expected)
