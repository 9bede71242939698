"""Swapping a model's nn.Linear layers for Int4Linear (rgpt_rt/runtime/int4_linear.py), in place:

quantize_linears(model, group_size=128, exclude=("lm_head",))   # every nn.Linear, by RTN
load_int4_linears(model, {name: Int4Weight}, biases={})          # swap in loaded weights
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.runtime.int4_linear import Int4Linear


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
