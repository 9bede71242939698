"""Int4Linear: the nn.Module the decoder uses in place of nn.Linear.

    layer = Int4Linear.from_linear(linear, group_size=128)      # quantize by RTN
    layer = Int4Linear(weight: Int4Weight, bias=None)            # from a file / an importer / AWQ
    y = layer(x)                                                 # x [..., K] -> [..., N], x's dtype
    quantize_linears(model, group_size=128, exclude=("lm_head",))   # every nn.Linear, in place
    load_int4_linears(model, {name: Int4Weight}, biases={})          # swap in loaded weights

Buffers carry the file names (format.int4_tensors): qweight_nk8i, scales, zeros, perm, bias,
so a module's state_dict and llm.int4.safetensors use the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rgpt_rt.ops.int4 import aligned, int4_linear_packed
from rgpt_rt.quant.format import Int4Weight
from rgpt_rt.quant.rtn import quantize_rtn


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


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_linears(
    model: nn.Module, group_size: int = 128, exclude: Iterable[str] = ("lm_head",)
) -> list[str]:
    """Replace every nn.Linear in `model` (in place) by Int4Linear.from_linear, except those whose
    qualified name or last name part is in `exclude`. Returns the replaced names.
    Raises ValueError (before changing anything) when a linear's in_features is not a multiple
    of group_size, naming it so it can be excluded."""
    exclude = set(exclude)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name not in exclude
        and name.rpartition(".")[2] not in exclude
    ]
    for name, module in chosen:
        if module.in_features % group_size != 0:
            raise ValueError(
                f"{name} has in_features {module.in_features}, not a multiple of group_size {group_size}; "
                f"add it to exclude or use another group size"
            )
    for name, module in chosen:
        _set_submodule(model, name, Int4Linear.from_linear(module, group_size))
    return [name for name, _ in chosen]


def load_int4_linears(
    model: nn.Module, weights: dict[str, Int4Weight], biases: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """Replace the nn.Linear at each name of `weights` by Int4Linear(weights[name], bias), where the
    bias comes from `biases` or else from the replaced linear. Returns the replaced names."""
    biases = biases or {}
    for name, weight in weights.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} for INT4 weight {name!r}") from None
        if not isinstance(module, (nn.Linear, Int4Linear)):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
        if (module.out_features, module.in_features) != tuple(weight.shape):
            raise ValueError(
                f"{name} is [{module.out_features}, {module.in_features}] but the INT4 weight is {list(weight.shape)}"
            )
        bias = biases.get(name, module.bias)
        _set_submodule(model, name, Int4Linear(weight.to(module_device(module)), bias))
    return list(weights)


def module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
