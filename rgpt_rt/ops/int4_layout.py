"""INT4 layout "n16k64" (format version 2): pack, unpack and dequantize, as pure torch functions.

    W[n, k] = (q[n, k] − z[n, γ]) · s[n, γ]      γ = k // G        exactly (no rounding)

q are 4-bit codes, s fp16 scales and z integer zeros (0..16) per group of G inputs. (q − z) is
an integer in [−16, 15] and s an fp16 value, so the product has at most 16 significant bits:
float32 holds it exactly, and every path (CUDA, C++ CPU, this file) uses that exact value.
(Layout nk8i, format version 1, defined W as that product rounded to fp16.)

The weight is cut into tiles of 16 output rows × 64 inputs ("steps"), each stored as 32 chunks of
16 bytes: chunk l is exactly what lane l of a warp needs for the A operand of four
mma.m16n8k16 (16 rows × 16 inputs each). With T = ceil(N/16), S = ceil(K/64), lane l = 4g + t
(g = 0..7, t = 0..3):

  qweight  int32 [T, 128 S]     word (tile, s, l, j) is element [tile, 128 s + 4 l + j];
                                its nibble p (bits 4p..4p+3) holds q[n, k] with
                                  n = 16 tile + g + 8 (p & 1)
                                  k = 64 s + 32 (j >> 1) + 8 t + 4 (j & 1) + (0, 2, 1, 3)[p >> 1]
                                codes past N or past K are 0
  scales   fp16  [T, K/G, 16]   [tile, γ, 2g + r] = s[16 tile + g + 8r, γ]   (0 past N)
  zeros    uint8 [T, K/G, 16]   same order                                  (0 past N)

So in a word, (word & 0x000F000F) is rows g's inputs (+0, +1) as two 16-bit lanes and
(word & 0x00F000F0) row g+8's; the same after one shift by 8 gives inputs (+2, +3): one mask per
pair of codes turns them into fp16 values with the magic-number trick (csrc/int4/README.md).
G is a multiple of 32 and divides K; K % 64 == 32 leaves the second half of the last step as
padding.

Layout "nk8i" (format version 1, W = fp16((q − z)·s)) is kept below only for the previous kernels
(rgpt_rt/ops/int4_nk8i.py), which benchmarks time beside n16k64 until n16k64 is measured on a GPU
(issue 23): qweight int32 [N, K/8], word j of row n holding k = 8j..8j+7, nibble p holding
k = 8j + NK8I_ORDER[p]; scales fp16 [N, K/G] and zeros uint8 [N, K/G] in the plain form.

The Int4Weight that carries these tensors, and the files that hold it: rgpt_rt/ops/int4_format.py.
"""

from __future__ import annotations

import torch

LAYOUT = "n16k64"
LAYOUT_VERSION = 1  # of the n16k64 layout itself
FORMAT_VERSION = 2  # of the INT4 file format: 1 was nk8i with W = fp16((q − z)·s)
TILE_ROWS = 16
STEP_INPUTS = 64
GROUP_MULTIPLE = 32
K_OFFSET = (0, 2, 1, 3)  # nibble position p holds input offset K_OFFSET[p >> 1] (+ the word's base)


def check_shape(n: int, k: int, group_size: int) -> None:
    """Raise ValueError unless an [n, k] weight with groups of group_size fits the layout."""
    if n <= 0 or k <= 0:
        raise ValueError(f"an INT4 weight needs a non-empty shape; got ({n}, {k})")
    if group_size <= 0 or group_size % GROUP_MULTIPLE != 0:
        raise ValueError(
            f"group_size {group_size} is not supported; use a positive multiple of "
            f"{GROUP_MULTIPLE} (128 is the default)"
        )
    if k % group_size != 0:
        raise ValueError(
            f"the input dim K = {k} is not a multiple of group_size {group_size}; "
            f"pad K to a multiple of {group_size} or pick a group size that divides it"
        )


def packed_shapes(n: int, k: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the packed tensors of an [n, k] weight: {"qweight", "scales", "zeros"}."""
    check_shape(n, k, group_size)
    tiles, steps = -(-n // TILE_ROWS), -(-k // STEP_INPUTS)
    groups = k // group_size
    return {
        "qweight": (tiles, 128 * steps),
        "scales": (tiles, groups, 16),
        "zeros": (tiles, groups, 16),
    }


def pack(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] (0..15), scales fp16 [N, K/G], zeros uint8 [N, K/G] (0..16) ->
    (qweight int32 [T, 128 S], scales fp16 [T, K/G, 16], zeros uint8 [T, K/G, 16]).
    Reshapes and permutations only: memory stays a few bytes per weight."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K]; got {list(codes.shape)}")
    n, k = codes.shape
    shapes = packed_shapes(n, k, group_size)
    groups = k // group_size
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"scales must be float16 [{n}, {groups}]; got {scales.dtype} {list(scales.shape)}"
        )
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n, groups):
        raise ValueError(
            f"zeros must be uint8 [{n}, {groups}]; got {zeros.dtype} {list(zeros.shape)}"
        )
    if zeros.numel() and int(zeros.max()) > 16:
        raise ValueError(f"zeros must be in 0..16; got {int(zeros.max())}")
    tiles, steps = shapes["qweight"][0], shapes["qweight"][1] // 128
    padded = torch.zeros(
        tiles * TILE_ROWS, steps * STEP_INPUTS, dtype=torch.uint8, device=codes.device
    )
    padded[:n, :k] = codes.to(torch.uint8) & 0xF
    # row = 16 tile + 8 r + g; input = 64 s + 32 h + 8 t + 4 e + K_OFFSET[b]
    v = padded.view(tiles, 2, 8, steps, 2, 4, 2, 4)[..., list(K_OFFSET)]  # [T, r, g, S, h, t, e, b]
    nibbles = v.permute(0, 3, 2, 5, 4, 6, 7, 1).reshape(tiles, steps, 32, 4, 8)  # lane 4g + t,
    # word 2h + e, nibble 2b + r
    words = torch.zeros(tiles, steps, 32, 4, dtype=torch.int32, device=codes.device)
    for p in range(8):  # int32 arithmetic: bit 31 wraps to the sign, as the packed word wants
        words |= nibbles[..., p].to(torch.int32) << (4 * p)
    return (
        words.reshape(shapes["qweight"]),
        _pack_rows(scales, tiles),
        _pack_rows(zeros, tiles),
    )


def _pack_rows(values: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, groups] -> [T, groups, 16] with position 2g + r holding row 16 tile + g + 8r (0 past N)."""
    n, groups = values.shape
    padded = torch.zeros(tiles * TILE_ROWS, groups, dtype=values.dtype, device=values.device)
    padded[:n] = values
    return padded.view(tiles, 2, 8, groups).permute(0, 3, 2, 1).reshape(tiles, groups, 16)


def _unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    tiles, groups, _ = packed.shape
    rows = packed.view(tiles, groups, 8, 2).permute(0, 3, 2, 1).reshape(tiles * TILE_ROWS, groups)
    return rows[:n].contiguous()


def unpack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack: (codes uint8 [N, K], scales fp16 [N, K/G], zeros uint8 [N, K/G])."""
    _check_packed(qweight, scales, zeros, n, k, group_size)
    tiles, steps = qweight.shape[0], qweight.shape[1] // 128
    words = qweight.reshape(tiles, steps, 32, 4)
    # int32 shifts are arithmetic, but the 4-bit mask drops the sign bits they bring in
    nibbles = torch.stack([(words >> (4 * p)) & 0xF for p in range(8)], dim=-1).to(torch.uint8)
    v = nibbles.view(tiles, steps, 8, 4, 2, 2, 4, 2)  # [T, S, g, t, h, e, b, r]
    v = v.permute(0, 7, 2, 1, 4, 3, 5, 6)[..., list(K_OFFSET)]  # [T, r, g, S, h, t, e, kk]
    codes = v.reshape(tiles * TILE_ROWS, steps * STEP_INPUTS)[:n, :k].contiguous()
    return codes, _unpack_rows(scales, n), _unpack_rows(zeros, n)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
) -> torch.Tensor:
    """float32 [N, K]: W = (q − z)·s exactly (the value every kernel uses)."""
    return dequantize_plain(*unpack(qweight, scales, zeros, n, k, group_size), group_size)


def dequantize_plain(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes [N, K], scales fp16 [N, K/G], zeros [N, K/G] (the plain form) -> float32 [N, K]:
    (q − z)·s exactly, groups of group_size along K."""
    n, k = codes.shape
    values = codes.to(torch.float32).reshape(n, k // group_size, group_size)
    values -= zeros.to(torch.float32)[..., None]  # q − z: small integers, exact
    values *= scales.to(torch.float32)[..., None]  # ≤ 16 significant bits: exact
    return values.reshape(n, k)


def _check_packed(qweight, scales, zeros, n, k, group_size) -> None:
    shapes = packed_shapes(n, k, group_size)
    expect = {
        "qweight": (qweight, torch.int32),
        "scales": (scales, torch.float16),
        "zeros": (zeros, torch.uint8),
    }
    for name, (tensor, dtype) in expect.items():
        if tensor.dtype != dtype or tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"n16k64 {name} must be {dtype} {list(shapes[name])} for an [{n}, {k}] weight "
                f"with group_size {group_size}; got {tensor.dtype} {list(tensor.shape)}"
            )


# --- layout nk8i (format version 1): the previous kernels' layout ------------------------------
NK8I = "nk8i"
NK8I_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble position p holds k offset NK8I_ORDER[p]
NK8I_POSITION = tuple(NK8I_ORDER.index(i) for i in range(8))  # k offset i sits at this position


def pack_nk8i(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes in 0..15 (K a multiple of 8) -> int32 [N, K/8] in layout nk8i, where
    `(word >> 4i) & 0x000F000F` holds the pair (k = 8j + 2i, 8j + 2i + 1)."""
    if codes.dim() != 2 or codes.shape[1] % 8 != 0:
        raise ValueError(f"codes must be [N, K] with K a multiple of 8; got {list(codes.shape)}")
    n, k = codes.shape
    c = (codes.to(torch.uint8) & 0xF).reshape(n, k // 8, 8)  # [N, word, k offset]
    # byte b of a (little-endian) word holds nibble positions 2b and 2b + 1
    order = NK8I_ORDER
    pairs = [c[..., order[2 * b]] | (c[..., order[2 * b + 1]] << 4) for b in range(4)]
    return torch.stack(pairs, dim=-1).view(torch.int32).reshape(n, k // 8)


def unpack_nk8i(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] in layout nk8i -> uint8 [N, K] codes."""
    n, words = qweight.shape
    # int32 shifts are arithmetic, but the 4-bit mask drops the sign bits they bring in
    parts = [((qweight >> (4 * position)) & 0xF).to(torch.uint8) for position in NK8I_POSITION]
    return torch.stack(parts, dim=-1).reshape(n, words * 8)


def dequantize_nk8i(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """fp16 [N, K]: layout nk8i's W = fp16((q − z)·s), the exact product rounded once (what
    AutoAWQ and GPTQ compute in fp16, and what the nk8i kernels use)."""
    return dequantize_plain(unpack_nk8i(qweight), scales, zeros, group_size).half()
