"""AWQ for one LLaMA decoder layer, given its HF-named weights and its captured calibration inputs.

    result = quantize_llama_layer_awq(weights, inputs, group_size=128)
    result.int4     {"self_attn.q_proj": Int4Weight, ...}      the seven linears
    result.tensors  {"input_layernorm.weight": ..., "post_attention_layernorm.weight": ...}
                    the norms with the scales folded in (and v/up biases when there are any)

The caller (the decoder) runs the float model over calibration prompts and captures, for each
layer, the input of the first linear of each group (a forward pre-hook on that module):

    inputs = {"self_attn.q_proj": x_attn,   # input_layernorm(h)              [T, D]
              "self_attn.o_proj": x_o,      # attention output before o_proj  [T, H·d]
              "mlp.gate_proj": x_mlp,       # post_attention_layernorm(h')    [T, D]
              "mlp.down_proj": x_down}      # silu(gate(x_mlp)) · up(x_mlp)   [T, I]

then loads result.int4 into Int4Linears and result.tensors into the norms; the next layer's
inputs come from this layer's output. The order below is the one in awq.py: a group is quantized
only after the scales that fold into its weights are folded (o's into v_proj, down's into
up_proj). o_proj's scales fold into v_proj only when heads == kv heads (v's output is o's
input); under GQA o_proj is quantized with unit scales (RTN + clip search).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.quant.awq import AwqScales, fold_into_linear, fold_into_norm, quantize_awq

LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(
    f"mlp.{p}_proj" for p in ("gate", "up", "down")
)
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


@dataclass
class AwqLayer:
    int4: dict[str, Int4Weight]  # linear name -> quantized W · diag(s)
    tensors: dict[str, torch.Tensor]  # the norms (and v/up biases) with the scales folded in
    scaled: dict[str, torch.Tensor] = field(default_factory=dict)  # the float W · diag(s) (checks)
    searches: dict[str, AwqScales] = field(default_factory=dict)  # per group, by its first linear


def quantize_llama_layer_awq(
    weights: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    group_size: int = 128,
    n_grid: int = 20,
) -> AwqLayer:
    """AWQ for one LLaMA layer (module docstring). `weights` holds the seven "<linear>.weight"
    tensors and the two norms (HF names relative to the layer; biases optional); it is not
    modified. `inputs` holds the four captured group inputs [T, K]."""
    missing = [f"{n}.weight" for n in LINEARS if f"{n}.weight" not in weights]
    missing += [n for n in NORMS if n not in weights] + [n for n in INPUTS if n not in inputs]
    if missing:
        raise ValueError(f"quantize_llama_layer_awq is missing {missing}")
    w = {name: t.detach().to(torch.float32).clone() for name, t in weights.items()}

    def bias(linear: str) -> torch.Tensor | None:
        return w.get(f"{linear}.bias")

    int4, scaled, searches = {}, {}, {}

    def group(names: list[str], x: torch.Tensor, clip=True, grid=n_grid) -> torch.Tensor:
        result = quantize_awq([w[f"{n}.weight"] for n in names], x, group_size, grid, clip)
        for name, q in zip(names, result.weights):
            int4[name] = q
            scaled[name] = w[f"{name}.weight"] * result.scales
        searches[names[0]] = result.search
        return result.scales

    v, o = "self_attn.v_proj", "self_attn.o_proj"
    foldable = w[f"{v}.weight"].shape[0] == w[f"{o}.weight"].shape[1]
    s = group([o], inputs[o], grid=n_grid if foldable else 1)
    if foldable:
        fold_into_linear(w[f"{v}.weight"], bias(v), s)
    s = group(
        [f"self_attn.{p}_proj" for p in "qkv"],
        inputs["self_attn.q_proj"],
        clip=[False, False, True],
    )
    fold_into_norm(w["input_layernorm.weight"], s)
    up = "mlp.up_proj"
    s = group(["mlp.down_proj"], inputs["mlp.down_proj"])
    fold_into_linear(w[f"{up}.weight"], bias(up), s)
    s = group(["mlp.gate_proj", up], inputs["mlp.gate_proj"])
    fold_into_norm(w["post_attention_layernorm.weight"], s)

    tensors = {name: w[name] for name in NORMS}
    tensors.update({f"{n}.bias": w[f"{n}.bias"] for n in LINEARS if f"{n}.bias" in w})
    return AwqLayer(int4=int4, tensors=tensors, scaled=scaled, searches=searches)
