"""AutoAWQ GEMM and GPTQ imports: bit-exact against packings and unpackings written here from
the format facts of DESIGN.md §2 (not from the importer's code), and whole HF folders.

Bit-exact means: the codes, scales and zeros come over unchanged, the value is the exact
(q − z)·s (rgpt_rt's format version 2), and that value rounded to fp16 is the fp16 weight
AutoAWQ / GPTQ compute, bit for bit (the one rounding they apply and rgpt_rt does not)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rgpt_rt.ops import int4_linear
from rgpt_rt.ops.int4_format import dequantize
from rgpt_rt.quant import (
    convert_quantized_folder,
    from_awq,
    from_gptq,
    load_int4_checkpoint,
    load_quantized_folder,
)

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble p of a word holds output 8j + this[p]
AWQ_UNPACK_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # output 8j + i sits in nibble this[i]


def words_from_nibbles(nibbles: np.ndarray) -> torch.Tensor:
    """[..., 8] values 0..15, nibble p at bits 4p -> int32 [...] with those bits."""
    words = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for p in range(8):
        words |= nibbles[..., p].astype(np.uint32) << np.uint32(4 * p)
    return torch.from_numpy(words.view(np.int32).copy())


def nibbles_of(words: torch.Tensor) -> np.ndarray:
    """int32 [...] -> [..., 8]: nibble p of each word."""
    unsigned = words.numpy().view(np.uint32)
    return np.stack([(unsigned >> np.uint32(4 * p)) & 0xF for p in range(8)], axis=-1)


def awq_pack(values: np.ndarray) -> torch.Tensor:
    """[R, N] -> int32 [R, N/8], AutoAWQ GEMM order along the output dim."""
    rows, n = values.shape
    grouped = values.reshape(rows, n // 8, 8)
    return words_from_nibbles(grouped[..., AWQ_PACK_ORDER])


def awq_unpack(words: torch.Tensor) -> np.ndarray:
    """int32 [R, N/8] -> [R, N] with AutoAWQ's reverse order."""
    rows = words.shape[0]
    return nibbles_of(words)[..., AWQ_UNPACK_ORDER].reshape(rows, -1)


def make_awq(k, n, group_size):
    codes = np.random.randint(0, 16, (k, n))
    zeros = np.random.randint(0, 16, (k // group_size, n))
    scales = (torch.rand(k // group_size, n) * 0.01 + 1e-4).half()
    return codes, zeros, scales


def awq_reference(codes, zeros, scales, group_size):
    """w [N, K] as AutoAWQ dequantizes: (q − z) · s in fp16, groups along the input dim."""
    groups = np.arange(codes.shape[0]) // group_size
    diff = torch.from_numpy(codes - zeros[groups]).half()  # [K, N]
    return (diff * scales[groups]).T


def exact_reference(codes, zeros, scales, groups):
    """w [N, K] = (q − z) · s in float64 (exact), from [K, N] codes and the group of each input."""
    diff = torch.from_numpy(codes - zeros[groups]).double()  # [K, N]
    return (diff * scales[torch.from_numpy(groups)].double()).T


def check_value(q, exact, fp16_reference):
    """dequantize(q) is the exact product; rounded to fp16 it is the source's fp16 weight."""
    ours = dequantize(q)
    assert ours.dtype == torch.float32 and torch.equal(ours.double(), exact)
    assert torch.equal(ours.half().view(torch.int16), fp16_reference.view(torch.int16))


def test_awq_test_packing_agrees_with_the_documented_unpack_order():
    values = np.random.randint(0, 16, (3, 32))
    assert np.array_equal(awq_unpack(awq_pack(values)), values)


@pytest.mark.parametrize("k,n,group_size", [(256, 64, 128), (4096 + 128, 24, 128), (128, 16, -1)])
def test_from_awq_is_bit_exact(k, n, group_size):
    group = k if group_size == -1 else group_size
    codes, zeros, scales = make_awq(k, n, group)
    q = from_awq(awq_pack(codes), awq_pack(zeros), scales, group_size)
    assert q.shape == (n, k) and q.group_size == group
    ours_codes, ours_scales, ours_zeros = q.unpack()
    assert torch.equal(ours_codes, torch.from_numpy(codes.T).to(torch.uint8))
    assert torch.equal(ours_scales, scales.T) and torch.equal(
        ours_zeros, torch.from_numpy(zeros.T).to(torch.uint8)
    )
    groups = np.arange(k) // group
    check_value(
        q, exact_reference(codes, zeros, scales, groups), awq_reference(codes, zeros, scales, group)
    )


def gptq_pack_k(codes: np.ndarray) -> torch.Tensor:
    """[K, N] -> int32 [K/8, N], natural order along the input dim (nibble p = input 8i + p)."""
    k, n = codes.shape
    return words_from_nibbles(codes.reshape(k // 8, 8, n).transpose(0, 2, 1))


def gptq_pack_n(values: np.ndarray) -> torch.Tensor:
    """[G, N] -> int32 [G, N/8], natural order along the output dim."""
    rows, n = values.shape
    return words_from_nibbles(values.reshape(rows, n // 8, 8))


def make_gptq(k, n, group_size, sym, act_order):
    codes = np.random.randint(0, 16, (k, n))
    groups = k // group_size
    stored = np.full((groups, n), 7) if sym else np.random.randint(0, 16, (groups, n))  # zero − 1
    scales = (torch.rand(groups, n) * 0.01 + 1e-4).half()
    if act_order:  # GPTQ desc_act: channels quantized in some order, groups follow that order
        order = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // group_size).to(torch.int32)
    return codes, stored, scales, g_idx


def gptq_reference(codes, stored, scales, g_idx):
    """w [N, K] as GPTQ v1 dequantizes: scales[g_idx] · (q − (stored + 1)), in fp16."""
    g = g_idx.numpy()
    diff = torch.from_numpy(codes - (stored[g] + 1)).half()  # [K, N]
    return (scales[g_idx.long()] * diff).T


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_from_gptq_is_bit_exact(sym, act_order):
    k, n, group_size = 512, 48, 128
    codes, stored, scales, g_idx = make_gptq(k, n, group_size, sym, act_order)
    qzeros = gptq_pack_n(stored)
    if sym:
        assert bool((qzeros == 0x77777777).all())
    q = from_gptq(gptq_pack_k(codes), qzeros, scales, g_idx, group_size, sym)
    assert q.shape == (n, k) and (q.perm is not None) == act_order
    exact = exact_reference(codes, stored + 1, scales, g_idx.numpy())
    check_value(q, exact, gptq_reference(codes, stored, scales, g_idx))
    ours_zeros = q.unpack()[2]
    assert torch.equal(ours_zeros, torch.from_numpy(stored.T + 1).to(torch.uint8))
    if sym:
        assert bool((ours_zeros == 8).all())
    # the matmul sees the same (exact) weights: x @ W.T through the permuted layout
    x = torch.randn(3, k)
    expected = x.double() @ exact.T
    torch.testing.assert_close(int4_linear(x, q).double(), expected, rtol=1e-5, atol=1e-4)


def test_gptq_zero_of_zero_wraps_to_sixteen_like_gptq_v1():
    # a real zero of 0 is stored as 0 − 1 = 15 in 4 bits; GPTQ v1 reads it back as 15 + 1 = 16
    k, n = 128, 8
    codes = np.random.randint(0, 16, (k, n))
    stored = np.full((1, n), 15)
    scales = torch.full((1, n), 0.5, dtype=torch.float16)
    g_idx = torch.zeros(k, dtype=torch.int32)
    q = from_gptq(gptq_pack_k(codes), gptq_pack_n(stored), scales, g_idx, 128, sym=False)
    assert bool((q.unpack()[2] == 16).all())
    exact = exact_reference(codes, stored + 1, scales, g_idx.numpy())
    check_value(q, exact, gptq_reference(codes, stored, scales, g_idx))
    v2 = from_gptq(gptq_pack_k(codes), gptq_pack_n(stored), scales, g_idx, 128, False, "gptq_v2")
    assert bool((v2.unpack()[2] == 15).all())


def test_gptq_groups_of_uneven_size_are_refused():
    k, n = 256, 8
    codes, stored, scales, _ = make_gptq(k, n, 128, sym=True, act_order=False)
    g_idx = torch.zeros(k, dtype=torch.int32)
    g_idx[200:] = 1  # 200 and 56 channels
    with pytest.raises(ValueError, match="exactly group_size = 128"):
        from_gptq(gptq_pack_k(codes), gptq_pack_n(stored), scales, g_idx, 128, True)


def write_folder(folder, quant_config, tensors):
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 256, "quantization_config": quant_config}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))


def test_an_awq_folder_loads_without_autoawq(tmp_path):
    codes, zeros, scales = make_awq(256, 64, 128)
    embed = torch.randn(100, 256).half()
    write_folder(
        tmp_path / "awq",
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "version": "gemm",
            "zero_point": True,
        },
        {
            "model.layers.0.mlp.up_proj.qweight": awq_pack(codes),
            "model.layers.0.mlp.up_proj.qzeros": awq_pack(zeros),
            "model.layers.0.mlp.up_proj.scales": scales,
            "model.embed_tokens.weight": embed,
        },
    )
    folder = load_quantized_folder(tmp_path / "awq")
    assert set(folder.int4) == {"model.layers.0.mlp.up_proj"}
    assert set(folder.tensors) == {"model.embed_tokens.weight"}
    exact = exact_reference(codes, zeros, scales, np.arange(256) // 128)
    fp16 = awq_reference(codes, zeros, scales, 128)
    check_value(folder.int4["model.layers.0.mlp.up_proj"], exact, fp16)

    convert_quantized_folder(tmp_path / "awq", tmp_path / "out")
    checkpoint = load_int4_checkpoint(tmp_path / "out")
    check_value(checkpoint.int4["model.layers.0.mlp.up_proj"], exact, fp16)
    assert checkpoint.config["rgpt_quantization"]["format_version"] == 2
    assert torch.equal(checkpoint.tensors["model.embed_tokens.weight"], embed)
    assert checkpoint.config["rgpt_quantization"]["method"] == "import:awq"


def test_a_gptq_act_order_folder_loads_without_autogptq(tmp_path):
    codes, stored, scales, g_idx = make_gptq(256, 32, 128, sym=False, act_order=True)
    bias = torch.randn(32).half()
    write_folder(
        tmp_path / "gptq",
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False},
        {
            "model.layers.0.self_attn.q_proj.qweight": gptq_pack_k(codes),
            "model.layers.0.self_attn.q_proj.qzeros": gptq_pack_n(stored),
            "model.layers.0.self_attn.q_proj.scales": scales,
            "model.layers.0.self_attn.q_proj.g_idx": g_idx,
            "model.layers.0.self_attn.q_proj.bias": bias,
            "model.norm.weight": torch.ones(256).half(),
        },
    )
    folder = load_quantized_folder(tmp_path / "gptq")
    q = folder.int4["model.layers.0.self_attn.q_proj"]
    exact = exact_reference(codes, stored + 1, scales, g_idx.numpy())
    check_value(q, exact, gptq_reference(codes, stored, scales, g_idx))
    assert torch.equal(folder.biases["model.layers.0.self_attn.q_proj"], bias)
    assert set(folder.tensors) == {"model.norm.weight"}


def test_unsupported_quantization_configs_are_named(tmp_path):
    for name, config, message in [
        ("gemv", {"quant_method": "awq", "bits": 4, "version": "gemv"}, "only AutoAWQ 'gemm'"),
        ("8bit", {"quant_method": "gptq", "bits": 8}, "only 4-bit"),
        ("bnb", {"quant_method": "bitsandbytes", "bits": 4}, "only 'awq' and 'gptq'"),
    ]:
        write_folder(tmp_path / name, config, {"x": torch.zeros(1)})
        with pytest.raises(ValueError, match=message):
            load_quantized_folder(tmp_path / name)
