"""Int4Linear: the nn.Module the runtime decoder uses in place of nn.Linear.

    layer = Int4Linear(weight: Int4Weight, bias=None)            # from a file, an importer, AWQ
    layer = Int4Linear.from_linear(linear, group_size=128)      # quantize by RTN (offline tool)
    y = layer(x)                                                 # x [..., K] -> [..., N], x's dtype

Buffers carry the file names (ops/int4_format.int4_tensors): qweight_nk8i, scales, zeros, perm,
bias, so a module's state_dict and llm.safetensors use the same keys.
"""

from __future__ import annotations

import torch
from torch import nn

from rgpt_rt.ops.int4 import aligned, int4_linear_packed
from rgpt_rt.ops.int4_format import Int4Weight


class Int4Linear(nn.Module):
    """y = x @ dequantize(weight).T + bias through rgpt_rt.ops.int4_linear (no fp weight kept)."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, Int4Weight):
            raise ValueError(
                f"Int4Linear takes an Int4Weight; got {type(weight).__name__} (use Int4Linear.from_linear for nn.Linear)"
            )
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}]; got {list(bias.shape)}")
        # aligned and contiguous once here, not copied again on every call (the kernels load
        # 16 bytes at a time; tensors read from a file may start anywhere)
        self.register_buffer("qweight_nk8i", aligned(weight.qweight))
        self.register_buffer("scales", weight.scales.contiguous())
        self.register_buffer("zeros", weight.zeros.contiguous())
        self.register_buffer("perm", weight.perm)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """Quantize an nn.Linear by RTN (in_features must be a multiple of group_size)."""
        from rgpt_rt.quant.rtn import quantize_rtn  # an offline tool: loaded only when used

        weight = quantize_rtn(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, bias)

    @property
    def weight_int4(self) -> Int4Weight:
        """The weight as an Int4Weight (sharing this module's buffers)."""
        return Int4Weight(
            self.qweight_nk8i,
            self.scales,
            self.zeros,
            self.group_size,
            (self.out_features, self.in_features),
            self.perm,
        )

    @classmethod
    def concat(cls, layers: list[Int4Linear]) -> Int4Linear:
        """One Int4Linear whose outputs are those of `layers` side by side (they share the input:
        q/k/v, gate/up), so one kernel call does the work of several. Rows of the nk8i layout are
        independent, so this is a concatenation of the packed rows; nothing is requantized."""
        first = layers[0]
        for layer in layers:
            if (layer.in_features, layer.group_size) != (first.in_features, first.group_size):
                raise ValueError(
                    "only INT4 linears with the same in_features and group_size concatenate; got "
                    f"{[(m.in_features, m.group_size) for m in layers]}"
                )
            if layer.perm is not None:
                raise ValueError(
                    "INT4 linears with an input permutation (act-order) do not concatenate"
                )
        biases = [m.bias for m in layers]
        if any(b is not None for b in biases):
            given = next(b for b in biases if b is not None)
            bias = torch.cat([
                torch.zeros(m.out_features, dtype=given.dtype, device=given.device)
                if b is None else b.to(given.dtype)
                for m, b in zip(layers, biases)
            ])  # fmt: skip
        else:
            bias = None
        weight = Int4Weight(
            torch.cat([m.qweight_nk8i for m in layers]),
            torch.cat([m.scales for m in layers]),
            torch.cat([m.zeros for m in layers]),
            first.group_size,
            (sum(m.out_features for m in layers), first.in_features),
            None,
        )
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return int4_linear_packed(
            x, self.qweight_nk8i, self.scales, self.zeros, self.group_size, self.bias, self.perm
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, bias={self.bias is not None}"


def concat_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear computing `linears` side by side, or None when they are not all nn.Linear or
    all Int4Linear (without act-order) with the same input."""
    if all(type(m) is nn.Linear for m in linears):
        weight = torch.cat([m.weight for m in linears])
        has_bias = any(m.bias is not None for m in linears)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            bias = [
                m.bias if m.bias is not None else weight.new_zeros(m.out_features) for m in linears
            ]
            fused.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
        return fused
    int4 = all(type(m) is Int4Linear and m.perm is None for m in linears)
    if int4 and len({(m.in_features, m.group_size) for m in linears}) == 1:
        return Int4Linear.concat(linears)
    return None
