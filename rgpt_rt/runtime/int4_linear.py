"""Int4Linear: the nn.Module the runtime decoder uses in place of nn.Linear.

    layer = Int4Linear(weight: Int4Weight, bias=None)            # from a file, an importer, AWQ
    layer = Int4Linear.from_linear(linear, group_size=128)      # quantize by RTN (offline tool)
    y = layer(x)                                                 # x [..., K] -> [..., N], x's dtype

Buffers carry the file names (ops/int4_format.int4_tensors): qweight_n16k64, scales_n16k64,
zeros_n16k64, perm, bias, so a module's state_dict and llm.safetensors use the same keys. Made on
a CUDA device, a layer reserves the INT4 GEMV's workspace there (ops/int4.py), so a CUDA graph
captured later allocates nothing.

With RGPT_INT4_KERNEL=nk8i (read when a layer is made) the layer repacks its weight to layout
nk8i and runs the previous kernels instead (ops/int4_nk8i.py; buffers qweight_nk8i, scales_nk8i,
zeros_nk8i; W = fp16((q − z)·s)): for timing old beside new (issue 23), not for deployment.
"""

from __future__ import annotations

import torch
from torch import nn

from rgpt_rt.ops.int4 import aligned, int4_kernel, int4_linear_packed, reserve_gemv_workspace
from rgpt_rt.ops.int4_format import Int4Weight, concat_int4


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
        self.kernel = int4_kernel()
        if self.kernel == "nk8i":
            from rgpt_rt.ops.int4_nk8i import nk8i_tensors

            packed = dict(zip(("qweight", "scales", "zeros"), nk8i_tensors(weight)))
        else:
            # aligned and contiguous once here, not copied again on every call (the kernels load
            # 16 bytes at a time; tensors read from a file may start anywhere)
            packed = {
                "qweight": aligned(weight.qweight),
                "scales": weight.scales.contiguous(),
                "zeros": weight.zeros.contiguous(),
            }
        for name, tensor in packed.items():
            self.register_buffer(f"{name}_{self.kernel}", tensor)
        self.register_buffer("perm", weight.perm)
        self.register_buffer("bias", None if bias is None else bias.detach())
        if weight.device.type == "cuda" and self.kernel == "n16k64":
            reserve_gemv_workspace(
                self.out_features, self.in_features, weight.device, group_size=self.group_size
            )

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """Quantize an nn.Linear by RTN (in_features must be a multiple of group_size)."""
        from rgpt_rt.quant.rtn import quantize_rtn  # an offline tool: loaded only when used

        weight = quantize_rtn(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, bias)

    @property
    def weight_int4(self) -> Int4Weight:
        """The weight as an Int4Weight (sharing this module's buffers; repacked under nk8i)."""
        if self.kernel == "nk8i":
            from rgpt_rt.ops.int4_layout import unpack_nk8i

            codes = unpack_nk8i(self.qweight_nk8i)
            return Int4Weight.pack(
                codes, self.scales_nk8i, self.zeros_nk8i, self.group_size, self.perm
            )
        return Int4Weight(
            self.qweight_n16k64,
            self.scales_n16k64,
            self.zeros_n16k64,
            self.group_size,
            (self.out_features, self.in_features),
            self.perm,
        )

    @classmethod
    def concat(cls, layers: list[Int4Linear]) -> Int4Linear:
        """One Int4Linear whose outputs are those of `layers` side by side (they share the input:
        q/k/v, gate/up), so one kernel call does the work of several; nothing is requantized
        (ops/int4_format.concat_int4)."""
        if any(layer.perm is not None for layer in layers):
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
        return cls(concat_int4([m.weight_int4 for m in layers]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if self.kernel == "nk8i":
            from rgpt_rt.ops.int4_nk8i import int4_linear_nk8i

            return int4_linear_nk8i(
                x, self.qweight_nk8i, self.scales_nk8i, self.zeros_nk8i, self.group_size,
                self.bias, self.perm,
            )  # fmt: skip
        return int4_linear_packed(
            x, self.qweight_n16k64, self.scales_n16k64, self.zeros_n16k64,
            (self.out_features, self.in_features), self.group_size, self.bias, self.perm,
        )  # fmt: skip

    def extra_repr(self) -> str:
        kernel = "" if self.kernel == "n16k64" else f", kernel={self.kernel}"
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, bias={self.bias is not None}{kernel}"


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
