"""AWQ over a LLaMA layer: the folded float layer computes what the original computes (the scales
cancel exactly, up to fp32 rounding), and the AWQ layer beats RTN when the residual stream has
a few outlier channels. The layer here is a plain float LLaMA block (RMSNorm, causal attention
with GQA, SwiGLU; RoPE left out: it acts after the projections and cannot see input scales)."""

import pytest
import torch
import torch.nn.functional as F

from rgpt_rt.ops.int4_format import dequantize
from rgpt_rt.quant import quantize_rtn
from rgpt_rt.quant.awq_llama import LINEARS, quantize_llama_layer_awq

D, INTER, HEAD = 128, 256, 32


def random_layer(heads, kv_heads):
    shapes = {
        "self_attn.q_proj": (heads * HEAD, D),
        "self_attn.k_proj": (kv_heads * HEAD, D),
        "self_attn.v_proj": (kv_heads * HEAD, D),
        "self_attn.o_proj": (D, heads * HEAD),
        "mlp.gate_proj": (INTER, D),
        "mlp.up_proj": (INTER, D),
        "mlp.down_proj": (D, INTER),
    }
    weights = {
        f"{name}.weight": torch.randn(shape) / shape[1] ** 0.5 for name, shape in shapes.items()
    }
    weights["input_layernorm.weight"] = torch.rand(D) + 0.5
    weights["post_attention_layernorm.weight"] = torch.rand(D) + 0.5
    return weights


def layer_forward(w, h, heads, kv_heads):
    """h [T, D] -> (output [T, D], {first linear of each group: its input})."""

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

    def linear(name, x):
        return x @ w[f"{name}.weight"].T

    t = h.shape[0]
    x_attn = rms(h, w["input_layernorm.weight"])
    q = linear("self_attn.q_proj", x_attn).view(t, heads, HEAD).transpose(0, 1)
    k = linear("self_attn.k_proj", x_attn).view(t, kv_heads, HEAD).transpose(0, 1)
    v = linear("self_attn.v_proj", x_attn).view(t, kv_heads, HEAD).transpose(0, 1)
    k, v = (z.repeat_interleave(heads // kv_heads, dim=0) for z in (k, v))
    x_o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, -1)
    h = h + linear("self_attn.o_proj", x_o)
    x_mlp = rms(h, w["post_attention_layernorm.weight"])
    x_down = F.silu(linear("mlp.gate_proj", x_mlp)) * linear("mlp.up_proj", x_mlp)
    out = h + linear("mlp.down_proj", x_down)
    inputs = {
        "self_attn.q_proj": x_attn,
        "self_attn.o_proj": x_o,
        "mlp.gate_proj": x_mlp,
        "mlp.down_proj": x_down,
    }
    return out, inputs


def residual_stream(tokens):
    h = torch.randn(tokens, D)
    h[:, [3, 40, 41, 100]] *= 30  # a few outlier channels, as in trained LLMs
    return h


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_folded_float_layer_is_the_original(heads, kv_heads):
    weights = random_layer(heads, kv_heads)
    h = residual_stream(96)
    reference, inputs = layer_forward(weights, h, heads, kv_heads)
    result = quantize_llama_layer_awq(weights, inputs, group_size=64, n_grid=10)
    assert set(result.int4) == set(LINEARS)
    folded = {f"{name}.weight": w for name, w in result.scaled.items()} | result.tensors
    out, _ = layer_forward(folded, h, heads, kv_heads)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-3)
    if kv_heads != heads:  # o_proj's input is not v_proj's output: unit scales
        assert torch.equal(result.scaled["self_attn.o_proj"], weights["self_attn.o_proj.weight"])


def test_awq_layer_beats_rtn_with_outlier_channels():
    heads = kv_heads = 4
    weights = random_layer(heads, kv_heads)
    _, inputs = layer_forward(weights, residual_stream(256), heads, kv_heads)  # calibration
    result = quantize_llama_layer_awq(weights, inputs, group_size=64)
    awq = {
        f"{name}.weight": dequantize(q).float() for name, q in result.int4.items()
    } | result.tensors
    rtn = dict(weights)
    rtn.update(
        {
            f"{name}.weight": dequantize(quantize_rtn(weights[f"{name}.weight"], 64)).float()
            for name in LINEARS
        }
    )
    h = residual_stream(256)  # held out
    reference, _ = layer_forward(weights, h, heads, kv_heads)
    error = {
        name: float((layer_forward(w, h, heads, kv_heads)[0] - reference).pow(2).mean())
        for name, w in (("awq", awq), ("rtn", rtn))
    }
    print(f"layer output MSE on held-out tokens: {error}")
    assert error["awq"] < 0.8 * error["rtn"]
