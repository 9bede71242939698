"""AWQ: activation-aware INT4 quantization (Lin et al., 2023), driven one linear group at a time.

A linear group is the set of linears that read the same input x (q/k/v after input_layernorm;
gate/up after post_attention_layernorm; o_proj alone; down_proj alone). For each group:

1. scale search: s = mean|x|^α per input channel, α over a grid (n_grid = 20 steps in [0, 1)),
   normalised by sqrt(max(s)·min(s)); the α whose RTN-quantized W·diag(s), fed x / s, gives the
   smallest mean squared error of the group's outputs against fp32 is kept (α = 0 is plain RTN,
   so the search never does worse than RTN on the calibration data).
2. clip search (per linear; skip q and k): each group's range is shrunk to max|w|·(1 − i/n_grid)
   for i < n_grid·max_shrink, keeping per output channel and group the shrink with the smallest
   output error on the calibration tokens.
3. quantize W·diag(s) by RTN within the clipped ranges.

The returned `scales` must then be divided out of the group's input — fold them into the
previous op: `fold_into_norm(norm.weight, s)` for an RMSNorm, `fold_into_linear(prev.weight,
prev.bias, s)` for a previous linear (v_proj before o_proj when heads == kv heads, up_proj before
down_proj). A group whose scales cannot be folded (o_proj under GQA) is quantized with n_grid=1,
which keeps s = 1 (RTN plus the clip search).

A decoder-level caller runs layer by layer. Capture each group's input on the fp layer from the
calibration prompts (~128 × 512 tokens; a few thousand tokens are enough):
x_attn = input_layernorm(h), x_o = the attention output before o_proj,
x_mlp = post_attention_layernorm(h'), x_down = silu(gate(x_mlp)) · up(x_mlp). Then quantize a
group only after the scales that fold into its weights are folded:

    r = quantize_awq([o.weight], x_o);        fold_into_linear(v.weight, v.bias, r.scales)
    r = quantize_awq([q.weight, k.weight, v.weight], x_attn, clip=[False, False, True])
    fold_into_norm(input_layernorm.weight, r.scales)
    r = quantize_awq([down.weight], x_down);  fold_into_linear(up.weight, None, r.scales)
    r = quantize_awq([gate.weight, up.weight], x_mlp)
    fold_into_norm(post_attention_layernorm.weight, r.scales)
    # r.weights replace the linears (Int4Linear(r.weights[i])); the next layer reads this one's output

awq_llama.quantize_llama_layer_awq does exactly this for a LLaMA layer's HF-named weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.quant.rtn import fake_quantize, quantize_rtn

TOKEN_CHUNK = 2048  # tokens per matmul of the quantized outputs in the loss


@dataclass
class AwqScales:
    scales: torch.Tensor  # float32 [K]: the group's input is divided by these
    alpha: float  # the exponent that was kept
    loss: float  # output MSE at that alpha on the calibration tokens
    rtn_loss: float  # output MSE of plain RTN (alpha = 0)


@dataclass
class AwqResult:
    weights: list[Int4Weight]  # quantized W_i · diag(scales), in the order given
    scales: torch.Tensor  # float32 [K]: fold 1/scales into the previous op
    search: AwqScales


def _check_inputs(weights: Sequence[torch.Tensor], x: torch.Tensor) -> int:
    if len(weights) == 0:
        raise ValueError("give at least one weight to quantize_awq")
    if x.dim() != 2:
        raise ValueError(
            f"calibration activations x must be [T, K] (tokens × input dim); got {list(x.shape)}"
        )
    k = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(
                f"weight {i} has shape {list(w.shape)}; every weight must be [N_i, {k}] to read x [T, {k}]"
            )
    if x.shape[0] == 0:
        raise ValueError("x has no calibration tokens")
    return k


def _spread_tokens(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """At most max_tokens rows of x, evenly spaced (deterministic)."""
    if x.shape[0] <= max_tokens:
        return x
    index = torch.linspace(0, x.shape[0] - 1, max_tokens).round().to(torch.int64)
    return x[index]


def _output_mse(reference: torch.Tensor, x_test: torch.Tensor, w_test: torch.Tensor) -> float:
    """mean((reference − x_test @ w_test.T)²), in token chunks."""
    total = 0.0
    for start in range(0, x_test.shape[0], TOKEN_CHUNK):
        test = x_test[start : start + TOKEN_CHUNK] @ w_test.T
        total += float((reference[start : start + TOKEN_CHUNK] - test).pow(2).sum())
    return total / reference.numel()


def awq_search_scales(
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    group_size: int = 128,
    n_grid: int = 20,
    max_tokens: int = 4096,
) -> AwqScales:
    """Step 1 (module docstring): weights [N_i, K] sharing the input x [T, K] -> AwqScales."""
    _check_inputs(weights, x)
    x = _spread_tokens(x, max_tokens).to(torch.float32)
    w = torch.cat([wi.to(torch.float32) for wi in weights])  # [ΣN, K]
    x_mean = x.abs().mean(dim=0)  # [K]
    reference = x @ w.T  # [T, ΣN] fp32 outputs (T ≤ max_tokens bounds the memory)
    best = None
    rtn_loss = float("nan")
    for step in range(n_grid):
        alpha = step / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = _output_mse(reference, x / s, fake_quantize(w * s, group_size))
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    return AwqScales(scales=s, alpha=alpha, loss=loss, rtn_loss=rtn_loss)


def awq_search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    rows_per_batch: int = 256,
) -> torch.Tensor:
    """Step 2: weight [N, K] (already scaled) read by x [T, K] (already divided by the scales)
    -> max_abs [N, K/G]: the clip limit of each output channel's group (pass to quantize_rtn)."""
    _check_inputs([weight], x)
    n, k = weight.shape
    groups = k // group_size
    x = _spread_tokens(x, max_tokens).to(torch.float32)
    xg = x.reshape(x.shape[0], groups, group_size)  # [T, G, group]
    best_limit = torch.empty(n, groups, dtype=torch.float32, device=weight.device)
    for start in range(0, n, rows_per_batch):
        w = weight[start : start + rows_per_batch].to(torch.float32)  # [n, K]
        wg = w.reshape(w.shape[0], groups, group_size)
        reference = torch.einsum("tgc,ngc->ngt", xg, wg)  # each group's share of each output
        full = wg.abs().amax(dim=-1)  # [n, G]
        best_err = torch.full_like(full, float("inf"))
        limit_kept = full.clone()
        for step in range(max(1, int(max_shrink * n_grid))):
            limit = full * (1 - step / n_grid)
            wq = fake_quantize(w, group_size, max_abs=limit).reshape_as(wg)
            err = (torch.einsum("tgc,ngc->ngt", xg, wq) - reference).pow(2).mean(dim=-1)  # [n, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            limit_kept = torch.where(better, limit, limit_kept)
        best_limit[start : start + w.shape[0]] = limit_kept
    return best_limit


def quantize_awq(
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    group_size: int = 128,
    n_grid: int = 20,
    clip: bool | Sequence[bool] = True,
    max_tokens: int = 4096,
) -> AwqResult:
    """Quantize one linear group by AWQ (module docstring).

    weights: [N_i, K] fp weights that all read x; x: [T, K] calibration inputs of the group;
    clip: one flag for all, or one per weight (False for q_proj and k_proj).
    Returns AwqResult: Int4Weights of W_i·diag(s) and s [K]; at run time the group must see
    x / s, so fold s into the previous op (fold_into_norm / fold_into_linear)."""
    _check_inputs(weights, x)
    flags = [bool(clip)] * len(weights) if isinstance(clip, bool) else [bool(c) for c in clip]
    if len(flags) != len(weights):
        raise ValueError(
            f"clip has {len(flags)} flags for {len(weights)} weights; give one per weight"
        )
    search = awq_search_scales(weights, x, group_size, n_grid, max_tokens)
    s = search.scales
    x_scaled = x.to(torch.float32) / s
    quantized = []
    for w, do_clip in zip(weights, flags):
        w_scaled = w.to(torch.float32) * s
        limit = awq_search_clip(w_scaled, x_scaled, group_size, n_grid) if do_clip else None
        quantized.append(quantize_rtn(w_scaled, group_size, max_abs=limit))
    return AwqResult(weights=quantized, scales=s, search=search)


@torch.no_grad()
def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor) -> None:
    """An RMSNorm/LayerNorm weight [K] that feeds an AWQ group: divide it by the scales, in place."""
    if norm_weight.shape != scales.shape:
        raise ValueError(
            f"norm weight {list(norm_weight.shape)} and scales {list(scales.shape)} differ in shape"
        )
    norm_weight.div_(scales.to(norm_weight))


@torch.no_grad()
def fold_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor) -> None:
    """A previous linear [K, K_in] whose output feeds an AWQ group: divide its output rows (and
    bias) by the scales, in place. Do this before that linear is itself quantized."""
    if weight.dim() != 2 or weight.shape[0] != scales.shape[0]:
        raise ValueError(
            f"previous linear weight {list(weight.shape)} must have {scales.shape[0]} output rows"
        )
    weight.div_(scales.to(weight)[:, None])
    if bias is not None:
        bias.div_(scales.to(bias))
