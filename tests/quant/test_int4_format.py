"""The INT4 format: packing against an independent unpacking written from the layout facts,
exact dequantization, RTN, files, and clear errors. Everything here is exact (torch.equal)."""

import pytest
import torch

from rgpt_rt.ops.int4_format import (
    Int4Weight,
    dequantize,
    dequantize_codes,
    load_int4,
    pack_nk8i,
    save_int4,
    unpack_nk8i,
)
from rgpt_rt.quant import quantize_rtn


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


def random_weight(n, k, group_size=128, max_zero=15):
    """An Int4Weight with random codes, scales and zeros (no quantizer involved)."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * 0.02 + 1e-4).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return Int4Weight(pack_nk8i(codes), scales, zeros, group_size, (n, k)), codes


def test_pack_matches_the_layout_description():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    qweight = pack_nk8i(codes)
    assert qweight.dtype == torch.int32 and qweight.shape == (5, 8)
    assert torch.equal(unpack_by_pairs(qweight), codes)
    assert torch.equal(unpack_nk8i(qweight), codes)


def test_pack_of_a_known_word():
    # k = 0..7 hold codes 1..8: nibble positions [0,2,4,6,1,3,5,7] get k = 0,2,4,6,1,3,5,7
    codes = torch.arange(1, 9, dtype=torch.uint8)[None]
    word = int(pack_nk8i(codes)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * p)) & 0xF for p in range(8)] == [1, 3, 5, 7, 2, 4, 6, 8]
    codes = torch.full((1, 8), 15, dtype=torch.uint8)  # all bits set: the int32 is -1
    assert int(pack_nk8i(codes)[0, 0]) == -1


def test_dequantize_is_the_fp16_product_for_every_scale_and_difference():
    # every finite fp16 scale bit pattern × every (q − z) in [−16, 15]: the fp16 multiply of
    # AutoAWQ/GPTQ (torch fp16 arithmetic) and Int4Weight's dequantize agree bit for bit
    scales = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    scales = scales[torch.isfinite(scales)][:, None]  # [S, 1]: one group of 32 per row
    for diff in range(-16, 16):
        code, zero = (diff, 0) if diff >= 0 else (diff + 16, 16)  # both 4-bit codes, zeros 0..16
        codes = torch.full((scales.shape[0], 32), code, dtype=torch.uint8)
        zeros = torch.full((scales.shape[0], 1), zero, dtype=torch.uint8)
        ours = dequantize_codes(codes, scales, zeros, 32)
        expected = torch.tensor(diff, dtype=torch.float16) * scales.expand(-1, 32)
        assert torch.equal(ours.view(torch.int16), expected.view(torch.int16)), diff


def test_dequantize_uses_groups_along_k():
    q, codes = random_weight(3, 256, group_size=64, max_zero=16)
    groups = torch.arange(256) // 64
    expected = (codes.to(torch.int32) - q.zeros.to(torch.int32)[:, groups]).half() * q.scales[
        :, groups
    ]
    assert torch.equal(dequantize(q), expected)


def test_rtn_codes_and_error_bound():
    w = torch.randn(64, 384) * 0.05
    w[3, :128] = 0.0  # an all-zero group
    w[5, 128:256] = torch.rand(128) + 1  # an all-positive group keeps its range (zero inside)
    q = quantize_rtn(w, group_size=128)
    assert q.shape == (64, 384) and q.group_size == 128
    deq = dequantize(q).float()
    step = q.scales.float().repeat_interleave(128, dim=1)
    # round to nearest: within half a step, plus the final fp16 rounding of the value
    assert bool(((deq - w).abs() <= step / 2 + w.abs() * 2**-11 + 1e-7).all())
    assert torch.equal(deq[3, :128], torch.zeros(128))
    assert int(q.zeros.max()) <= 15


def test_rtn_accepts_half_and_bfloat16_weights():
    w = torch.randn(16, 128)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(
            quantize_rtn(w.to(dtype)).qweight, quantize_rtn(w.to(dtype).float()).qweight
        )


def test_k_not_a_multiple_of_the_group_size_is_refused():
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        quantize_rtn(torch.randn(8, 4096 + 64), group_size=128)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rtn(torch.randn(8, 96), group_size=48)
    q = quantize_rtn(torch.randn(8, 256))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        Int4Weight(q.qweight, q.scales, q.zeros, 96, (8, 256))
    with pytest.raises(ValueError, match="nan or inf"):
        quantize_rtn(torch.full((2, 128), float("nan")))


def test_a_wrong_tensor_shape_is_named():
    q = quantize_rtn(torch.randn(8, 256))
    with pytest.raises(ValueError, match="Int4Weight.scales must be torch.float16"):
        Int4Weight(q.qweight, q.scales.float(), q.zeros, 128, (8, 256))


def test_save_and_load_round_trip(tmp_path):
    q, _ = random_weight(12, 256, max_zero=16)
    perm = torch.randperm(256)
    qp = Int4Weight(q.qweight, q.scales, q.zeros, 128, (12, 256), perm)
    norm = torch.randn(256).half()
    save_int4(tmp_path / "w.safetensors", {"a.proj": q, "b.proj": qp}, {"norm.weight": norm})
    weights, tensors = load_int4(tmp_path / "w.safetensors")
    assert set(weights) == {"a.proj", "b.proj"} and set(tensors) == {"norm.weight"}
    for name, original in (("a.proj", q), ("b.proj", qp)):
        loaded = weights[name]
        assert loaded.shape == original.shape and loaded.group_size == 128
        assert torch.equal(loaded.qweight, original.qweight)
        assert torch.equal(dequantize(loaded), dequantize(original))
    assert torch.equal(weights["b.proj"].perm, perm)
    assert torch.equal(tensors["norm.weight"], norm)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert "a.proj.qweight_nk8i" in handle.keys()  # noqa: SIM118
        assert handle.metadata()["layout"] == "nk8i"
