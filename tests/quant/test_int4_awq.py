"""AWQ: it beats RTN where activations have outlier channels, and its scales fold into the
previous op without changing the float function."""

import torch

from rgpt_rt.ops.int4_format import dequantize
from rgpt_rt.quant import fold_into_linear, fold_into_norm, quantize_awq, quantize_rtn
from rgpt_rt.quant.awq import awq_search_clip

K, N = 256, 128
OUTLIERS = [5, 77, 130, 131]  # input channels whose activations are ~40× the others


def activations(tokens):
    x = torch.randn(tokens, K)
    x[:, OUTLIERS] *= 40
    return x


def output_mse(x, w, x_q, w_q):
    return float((x @ w.T - x_q @ dequantize(w_q).float().T).pow(2).mean())


def test_awq_beats_rtn_when_a_few_input_channels_carry_outliers():
    w = torch.randn(N, K) * 0.05
    calibration, held_out = activations(512), activations(512)
    result = quantize_awq([w], calibration, group_size=128)
    assert result.search.alpha > 0  # the search moved away from plain RTN
    assert result.search.loss <= result.search.rtn_loss
    rtn = output_mse(held_out, w, held_out, quantize_rtn(w, 128))
    awq = output_mse(held_out, w, held_out / result.scales, result.weights[0])
    print(f"held-out output MSE: RTN {rtn:.4g}, AWQ {awq:.4g}")
    assert awq < 0.5 * rtn


def test_awq_on_plain_gaussian_activations_is_no_worse_than_rtn_on_calibration():
    w = torch.randn(N, K) * 0.05
    x = torch.randn(256, K)
    result = quantize_awq([w, w[:64] * 2], x, group_size=64, clip=[False, True])
    assert len(result.weights) == 2 and result.weights[1].shape == (64, K)
    assert result.search.loss <= result.search.rtn_loss


def per_group_error(x, w, q):
    """[N, G]: mean over tokens of (x_g @ (w_g − w̃_g))², each group's share of the output error."""
    diff = (w - dequantize(q).float()).reshape(w.shape[0], -1, 128)
    return torch.einsum("tgc,ngc->ngt", x.reshape(x.shape[0], -1, 128), diff).pow(2).mean(-1)


def test_clip_search_never_increases_a_groups_error():
    w = torch.randn(32, K) * 0.05
    w[:, 3] = 1.0  # a weight outlier: clipping it can pay
    x = torch.randn(128, K)
    limit = awq_search_clip(w, x, group_size=128)
    full = w.reshape(32, 2, 128).abs().amax(-1)
    assert bool((limit <= full).all()) and bool((limit >= 0.5 * full).all())
    assert bool((limit < full).any())  # some group did clip
    clipped = per_group_error(x, w, quantize_rtn(w, 128, max_abs=limit))
    unclipped = per_group_error(x, w, quantize_rtn(w, 128))
    # the search keeps, per output channel and group, the limit with the smallest error (no clip
    # is a candidate); 1e-6 relative covers the einsum's summation order
    assert bool((clipped <= unclipped * (1 + 1e-6) + 1e-12).all())


def test_scales_fold_into_a_norm_and_a_previous_linear():
    torch.manual_seed(3)
    h = torch.randn(64, K)
    norm = torch.nn.RMSNorm(K)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = norm(h).detach()
    w = torch.randn(N, K) * 0.05
    result = quantize_awq([w], x, group_size=128, n_grid=5)
    expected = (x / result.scales) @ dequantize(result.weights[0]).float().T
    fold_into_norm(norm.weight.data, result.scales)
    got = norm(h).detach() @ dequantize(result.weights[0]).float().T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    previous = torch.nn.Linear(32, K)
    inputs = torch.randn(8, 32)
    before = previous(inputs).detach()
    fold_into_linear(previous.weight.data, previous.bias.data, result.scales)
    torch.testing.assert_close(previous(inputs).detach(), before / result.scales)


def test_one_grid_step_keeps_unit_scales():
    # for groups whose scales cannot be folded (o_proj under GQA): n_grid=1 is RTN + clip
    w = torch.randn(N, K) * 0.05
    result = quantize_awq([w], activations(128), group_size=128, n_grid=1, clip=False)
    assert torch.equal(result.scales, torch.ones(K))
    assert torch.equal(result.weights[0].qweight, quantize_rtn(w, 128).qweight)
