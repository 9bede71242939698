"""Round-to-nearest INT4 quantization, asymmetric, one (scale, zero) per group of the input dim.

    quantize_rtn(w[N, K], group_size=128) -> Int4Weight

Per group: the range [min(w, 0), max(w, 0)] (zero always inside, so the integer zero is in
0..15 and an all-positive group is not clamped away) is cut into 15 steps:
s = fp16((max − min) / 15), z = round(−min / s), q = clamp(round(w / s) + z, 0, 15).
The code is computed with the stored fp16 scale, so dequantize() gives (q − z)·s exactly.
`max_abs` [N, K/G] (from the AWQ clip search) first clamps each group to [−max_abs, max_abs].
The codes, scales and zeros are then packed into layout n16k64 (Int4Weight.pack).
"""

from __future__ import annotations

import torch

from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.ops.int4_layout import check_shape, dequantize_plain

MIN_RANGE = 1e-5  # an all-zero group still gets a positive scale


def rtn_codes(
    w: torch.Tensor, group_size: int, max_abs: torch.Tensor | None = None, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes uint8 [N, K], scales fp16 [N, K/G], zeros uint8 [N, K/G]).
    check=False skips the finiteness checks (for searches over weights already checked)."""
    if w.dim() != 2:
        raise ValueError(f"quantize a 2-D [N, K] weight; got shape {list(w.shape)}")
    n, k = w.shape
    check_shape(n, k, group_size)
    # one fp32 working copy (never the caller's tensor), then in-place steps: bounded memory
    groups = w.to(torch.float32, copy=True).reshape(n, k // group_size, group_size)  # [N, G, group]
    if check and not bool(torch.isfinite(groups).all()):
        raise ValueError(
            "the weight holds nan or inf values; INT4 quantization needs finite weights"
        )
    if max_abs is not None:
        if tuple(max_abs.shape) != (n, k // group_size):
            raise ValueError(f"max_abs must be [{n}, {k // group_size}]; got {list(max_abs.shape)}")
        limit = max_abs.to(torch.float32)[..., None]
        groups.clamp_(min=-limit, max=limit)
    high = groups.amax(dim=-1).clamp(min=0)  # [N, G]
    low = groups.amin(dim=-1).clamp(max=0)
    scales = ((high - low).clamp(min=MIN_RANGE) / 15).to(torch.float16)
    if check and not bool(torch.isfinite(scales).all()):
        raise ValueError("a weight group spans more than fp16 scales can hold (|w| > ~1e6)")
    step = scales.to(torch.float32)
    zeros = torch.round(-low / step).clamp(0, 15)  # [N, G]
    codes = groups.div_(step[..., None]).round_().add_(zeros[..., None]).clamp_(0, 15)
    return codes.to(torch.uint8).reshape(n, k), scales, zeros.to(torch.uint8)


def quantize_rtn(
    w: torch.Tensor, group_size: int = 128, max_abs: torch.Tensor | None = None
) -> Int4Weight:
    """w [N, K] (any float dtype) -> Int4Weight by round-to-nearest (module docstring)."""
    return Int4Weight.pack(*rtn_codes(w, group_size, max_abs), group_size)


def fake_quantize(
    w: torch.Tensor, group_size: int = 128, max_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 [N, K]: w quantized by RTN and dequantized ((q − z)·s exactly, as dequantize()
    gives), without packing (for searches)."""
    return dequantize_plain(*rtn_codes(w, group_size, max_abs, check=False), group_size)
