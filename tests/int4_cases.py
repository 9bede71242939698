"""The tolerance shared by the INT4 linear tests (CPU: tests/test_int4_linear.py,
tests/ops/test_int4_nk8i.py; CUDA: tests/gpu/test_int4_cuda.py, tests/gpu/test_int4_gemv_v2.py),
against the fp64 reference x @ W.T + bias on the weights the kernel multiplies by (STYLE.md §4):

- by default, the max error is at most 2× that of torch's own same-precision matmul of the same
  weights (x @ W.to(x.dtype).T, fp32 accumulation; cuBLAS on a GPU);
- tensor_cores=True (the CUDA n16k64 GEMV with fp32 x, which splits x into three bf16 parts and
  sums on the tensor cores, whose fp32 accumulation is not IEEE round-to-nearest): at most
  2^-20 × (Σ_k |x_k · W[n, k]| + |bias[n]|) per output, 16× fp32's unit roundoff.

Also the random packed weights and the one-hot read-back the CUDA GEMV and GEMM tests share.
"""

from __future__ import annotations


def check_int4_output(out, x, weight, bias=None, tensor_cores=False):
    """Assert out [M, N] is within the tolerance above of x [M, K] @ weight [N, K].T + bias."""
    reference = x.double() @ weight.double().T
    if bias is not None:
        reference = reference + bias.double()
    ours = (out.double() - reference).abs()
    if tensor_cores:
        mass = x.double().abs() @ weight.double().abs().T
        if bias is not None:
            mass = mass + bias.double().abs()
        assert (ours <= 2**-20 * mass + 1e-30).all(), f"fp32: max error {ours.max().item():.3g}"
        return
    baseline = x @ weight.to(x.dtype).T
    if bias is not None:
        baseline = baseline + bias.to(x.dtype)
    torch_error = (baseline.double() - reference).abs().max().item()
    assert ours.max().item() <= 2 * torch_error, (
        f"{x.dtype} {tuple(x.shape)}: ours {ours.max().item():.3g}, torch {torch_error:.3g}"
    )


def random_packed(n, k, group_size=128, max_zero=16, scale=0.02, device="cuda"):
    """Random codes, scales and zeros packed on `device`: (packed tensors, exact W fp32 [N, K])."""
    import torch

    from rgpt_rt.ops import int4_layout as layout

    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // group_size, device=device) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8, device=device)
    packed = layout.pack(codes, scales, zeros, group_size)
    return packed, layout.dequantize(*packed, n, k, group_size)


def one_hot_readback(linear, n, k, group, dtype, rows, device="cuda"):
    """One-hot rows of x through `linear(x, packed, n, k, group)`, `rows` at a time, with
    subnormal and large scales (and zero = 16) in the first group: (outputs [K, N], the exact
    W [N, K]). Each output is 1·W[n, k] = (q − z)·s, so the outputs are W.T exactly."""
    import torch

    from rgpt_rt.ops import int4_layout as layout

    packed, _ = random_packed(n, k, group, device=device)
    qweight, scales, zeros = packed
    scales[0, 0, :4] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16)
    weight = layout.dequantize(qweight, scales, zeros, n, k, group)
    eye = torch.eye(k, device=device).to(dtype)
    out = torch.cat([linear(eye[i : i + rows], packed, n, k, group) for i in range(0, k, rows)])
    return out, weight
