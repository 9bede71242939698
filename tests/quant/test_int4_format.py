"""The INT4 format (version 2, layout n16k64): Int4Weight, exact dequantization, RTN, stacking,
files, version-1 files refused, and clear errors. Everything here is exact (torch.equal).
The bit layout itself is tested in tests/ops/test_int4_layout.py."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rgpt_rt.ops.int4_format import (
    Int4Weight,
    concat_int4,
    dequantize,
    int4_entries,
    int4_tensors,
    load_int4,
    save_int4,
    split_int4_tensors,
)
from rgpt_rt.ops.int4_layout import dequantize_plain
from rgpt_rt.quant import quantize_rtn


def random_weight(n, k, group_size=128, max_zero=15):
    """An Int4Weight from random codes, scales and zeros (no quantizer involved), and its codes."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * 0.02 + 1e-4).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    return Int4Weight.pack(codes, scales, zeros, group_size), codes


def test_dequantize_is_the_exact_product_for_every_scale_and_difference():
    # every finite fp16 scale bit pattern × every (q − z) in [−16, 15]: the value is the exact
    # product, and rounded to fp16 it is the fp16 multiply AutoAWQ/GPTQ compute, bit for bit
    scales = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    scales = scales[torch.isfinite(scales)][:, None]  # [S, 1]: one group of 32 per row
    for diff in range(-16, 16):
        code, zero = (diff, 0) if diff >= 0 else (diff + 16, 16)  # both 4-bit codes, zeros 0..16
        codes = torch.full((scales.shape[0], 32), code, dtype=torch.uint8)
        zeros = torch.full((scales.shape[0], 1), zero, dtype=torch.uint8)
        ours = dequantize_plain(codes, scales, zeros, 32)
        assert torch.equal(ours.double(), diff * scales.double().expand(-1, 32)), diff
        fp16_product = torch.tensor(diff, dtype=torch.float16) * scales.expand(-1, 32)
        assert torch.equal(ours.half().view(torch.int16), fp16_product.view(torch.int16)), diff


def test_dequantize_uses_groups_along_k_and_undoes_the_permutation():
    q, codes = random_weight(19, 256, group_size=64, max_zero=16)
    groups = torch.arange(256) // 64
    plain_codes, scales, zeros = q.unpack()
    assert torch.equal(plain_codes, codes)
    expected = (codes.double() - zeros.double()[:, groups]) * scales.double()[:, groups]
    assert dequantize(q).dtype == torch.float32
    assert torch.equal(dequantize(q).double(), expected)
    perm = torch.randperm(256)
    permuted = Int4Weight(q.qweight, q.scales, q.zeros, 64, q.shape, perm)
    assert torch.equal(dequantize(permuted)[:, perm], dequantize(q))


def test_rtn_codes_and_error_bound():
    w = torch.randn(64, 384) * 0.05
    w[3, :128] = 0.0  # an all-zero group
    w[5, 128:256] = torch.rand(128) + 1  # an all-positive group keeps its range (zero inside)
    q = quantize_rtn(w, group_size=128)
    assert q.shape == (64, 384) and q.group_size == 128
    codes, scales, zeros = q.unpack()
    deq = dequantize(q)
    step = scales.float().repeat_interleave(128, dim=1)
    # round to nearest: within half a step (plus the fp32 rounding of w / s; the value is exact)
    assert bool(((deq - w).abs() <= step / 2 + w.abs() * 2**-22).all())
    assert torch.equal(deq[3, :128], torch.zeros(128))
    assert int(zeros.max()) <= 15 and int(codes.max()) <= 15


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


def test_a_wrong_tensor_is_named_with_the_shape_it_needs():
    q = quantize_rtn(torch.randn(8, 256))
    with pytest.raises(ValueError, match=r"Int4Weight.scales must be torch.float16 \[1, 2, 16\]"):
        Int4Weight(q.qweight, q.scales.float(), q.zeros, 128, (8, 256))
    plain_scales = q.unpack()[1]  # the plain [N, K/G] form is not the packed one
    with pytest.raises(ValueError, match="layout n16k64"):
        Int4Weight(q.qweight, plain_scales, q.zeros, 128, (8, 256))


CONCATS = {  # id: output rows of the stacked weights
    "whole-tiles-qkv": (64, 32, 32),
    "last-partial": (48, 21),
    "partial-first-repacks": (37, 16, 5),
}


@pytest.mark.parametrize("rows", list(CONCATS.values()), ids=list(CONCATS))
def test_concat_stacks_output_rows(rows):
    parts = [random_weight(n, 192, group_size=64, max_zero=16) for n in rows]
    stacked = concat_int4([q for q, _ in parts])
    expected = Int4Weight.pack(
        torch.cat([codes for _, codes in parts]),
        torch.cat([q.unpack()[1] for q, _ in parts]),
        torch.cat([q.unpack()[2] for q, _ in parts]),
        64,
    )
    assert stacked.shape == (sum(rows), 192)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(stacked, name), getattr(expected, name)), name
    with pytest.raises(ValueError, match="same K and group size"):
        concat_int4([parts[0][0], random_weight(8, 128, 64)[0]])


def test_entries_declare_what_int4_tensors_writes():
    q, _ = random_weight(40, 320, group_size=32)
    entries = int4_entries("m.proj", q.shape, 32)
    tensors = int4_tensors("m.proj", q)
    assert [(e.name, e.dtype, tuple(e.shape)) for e in entries] == [
        (name, t.dtype, tuple(t.shape)) for name, t in tensors.items()
    ]


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
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert {"a.proj.qweight_n16k64", "a.proj.scales_n16k64", "a.proj.zeros_n16k64"} <= names
    assert "b.proj.perm" in names
    assert {k: metadata[k] for k in ("format", "format_version", "layout", "layout_version")} == {
        "format": "rgpt_rt.int4",
        "format_version": "2",
        "layout": "n16k64",
        "layout_version": "1",
    }


def test_a_version_1_file_is_refused_with_what_to_do(tmp_path):
    # what rgpt_rt wrote before format version 2: layout nk8i, no format_version
    table = json.dumps({"m.proj": {"shape": [8, 128], "group_size": 128}})
    old = {
        "m.proj.qweight_nk8i": torch.zeros(8, 16, dtype=torch.int32),
        "m.proj.scales": torch.ones(8, 1, dtype=torch.float16),
        "m.proj.zeros": torch.zeros(8, 1, dtype=torch.uint8),
    }
    metadata = {"format": "rgpt_rt.int4", "layout": "nk8i", "rgpt_int4": table}
    save_file(old, str(tmp_path / "old.safetensors"), metadata)
    with pytest.raises(ValueError, match=r"format version 1 \(layout nk8i.*re-export it"):
        load_int4(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="re-export it"):  # the names alone give it away
        split_int4_tensors(old, None)
    newer = {**metadata, "format_version": "3", "layout": "n32k128"}
    with pytest.raises(ValueError, match="format version 3, layout 'n32k128'"):
        split_int4_tensors({}, newer)
    assert split_int4_tensors({"norm": torch.ones(2)}, None)[0] == {}  # a plain file
    unquantized = {**metadata, "rgpt_int4": "{}"}  # version 1 metadata, but no INT4 weight
    assert split_int4_tensors({"norm": torch.ones(2)}, unquantized)[0] == {}
