"""Importers: AutoAWQ (GEMM) and GPTQ checkpoints -> Int4Weight, bit-exact, without their packages.

    from_awq(qweight, qzeros, scales, group_size) -> Int4Weight
    from_gptq(qweight, qzeros, scales, g_idx, group_size, sym) -> Int4Weight
    load_quantized_folder(folder) -> QuantizedFolder(int4={linear: Int4Weight}, tensors={name: fp16}, ...)

Source formats (DESIGN.md §2), for a linear with K inputs and N outputs, G = group_size:
  AutoAWQ GEMM: qweight int32 [K, N/8], 8 codes of one input row along the output dim per word,
                nibble position p holds output 8j + AWQ_ORDER[p] (AWQ_ORDER = [0,2,4,6,1,3,5,7]);
                qzeros int32 [K/G, N/8] packed the same way, zeros stored as is;
                scales fp16 [K/G, N];  w[k, n] = (q − z[k // G]) · s[k // G]  in fp16.
  GPTQ v1:      qweight int32 [K/8, N], 8 codes of one output column along the input dim per
                word in natural order (nibble p holds input 8i + p);
                qzeros int32 [n_groups, N/8] packed along the output dim in natural order,
                storing zero − 1 (the real zero is stored + 1: 1..16, sym 4-bit = 0x77777777 → 8);
                scales fp16 [n_groups, N]; g_idx int32 [K] the group of each input channel;
                w[k, n] = (q − z[g_idx[k]]) · s[g_idx[k]]  in fp16.
  GPTQ v2 (checkpoint_format "gptq_v2"): as v1 with zeros stored as is.
Import is bit-exact in what is stored: the codes, scales and zeros come over unchanged (only
their arrangement changes, to layout n16k64), which tests/quant/test_int4_importers.py checks
against an independent unpacking. The value differs by one rounding: AutoAWQ and GPTQ compute
(q − z) × s in fp16, i.e. the exact product rounded to fp16, where rgpt_rt's format (version 2)
uses the exact product (q − z)·s itself (at most 16 significant bits, exact in fp32). So
dequantize(w).half() is AutoAWQ's / GPTQ's fp16 weight bit for bit, and dequantize(w) differs from
it by at most half an fp16 ulp per weight (|fp16(v) − v| ≤ 2^-11 |v|, 2^-25 below fp16's normal
range): rgpt_rt's kernels multiply by the more precise value.

g_idx that is not the trivial k // G (GPTQ desc_act): the input channels are sorted by group
(stable), giving a permutation `perm` with every group contiguous; the codes are packed in that
order and Int4Weight.perm = perm, so the runtime computes x[..., perm] @ W_packed.T, and
dequantize() scatters the columns back to the original order. Each group must then hold exactly
G channels (true of GPTQ act order); anything else is refused with an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rgpt_rt.ops.int4_format import Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble position p holds output 8j + AWQ_ORDER[p]
PROJ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int64 [..., W, 8]: nibble p of each word (bits 4p..4p+3)."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=words.device)
    return (unsigned[..., None] >> shifts) & 0xF


def _check(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if (
        not isinstance(tensor, torch.Tensor)
        or tensor.dtype != dtype
        or tuple(tensor.shape) != shape
    ):
        got = (
            f"{tensor.dtype} {list(tensor.shape)}"
            if isinstance(tensor, torch.Tensor)
            else type(tensor).__name__
        )
        raise ValueError(f"{name} must be {dtype} {list(shape)}; got {got}")


def from_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> Int4Weight:
    """AutoAWQ GEMM tensors (module docstring) -> Int4Weight [N, K]."""
    if qweight.dim() != 2:
        raise ValueError(f"AWQ qweight must be int32 [K, N/8]; got {list(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if group_size == -1:
        group_size = k
    if k % group_size != 0:
        raise ValueError(
            f"AWQ weight has K = {k} inputs, not a multiple of group_size {group_size}"
        )
    groups = k // group_size
    _check("AWQ qweight", qweight, torch.int32, (k, n // 8))
    _check("AWQ qzeros", qzeros, torch.int32, (groups, n // 8))
    _check("AWQ scales", scales, torch.float16, (groups, n))
    inverse = torch.tensor([AWQ_ORDER.index(i) for i in range(8)], device=qweight.device)
    codes = _nibbles(qweight)[..., inverse].reshape(k, n)  # [K, N] natural output order
    zeros = _nibbles(qzeros)[..., inverse].reshape(groups, n)  # [G, N]
    return Int4Weight.pack(codes.T, scales.T.contiguous(), zeros.T.to(torch.uint8), group_size)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    sym: bool,
    checkpoint_format: str = "gptq",
) -> Int4Weight:
    """GPTQ tensors (module docstring) -> Int4Weight [N, K].

    `sym` does not change the arithmetic (GPTQ kernels read the stored zeros either way);
    checkpoint_format "gptq" (v1: zeros stored as zero − 1) or "gptq_v2" (stored as is)."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"GPTQ checkpoint_format {checkpoint_format!r} is unknown; use 'gptq' or 'gptq_v2'"
        )
    if qweight.dim() != 2:
        raise ValueError(f"GPTQ qweight must be int32 [K/8, N]; got {list(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if group_size == -1:
        group_size = k
    if k % group_size != 0:
        raise ValueError(
            f"GPTQ weight has K = {k} inputs, not a multiple of group_size {group_size}"
        )
    groups = scales.shape[0] if scales.dim() == 2 else -1
    _check("GPTQ qweight", qweight, torch.int32, (k // 8, n))
    _check("GPTQ scales", scales, torch.float16, (groups, n))
    _check("GPTQ qzeros", qzeros, torch.int32, (groups, n // 8))
    codes = _nibbles(qweight.T).reshape(n, k)  # [N, K]: nibble p of word i is input 8i + p
    zeros = _nibbles(qzeros).reshape(groups, n).T  # [N, groups]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    zeros = zeros.to(torch.uint8)
    scales_nk = scales.T  # [N, groups]

    trivial = torch.arange(k, device=qweight.device) // group_size
    if g_idx is None or torch.equal(g_idx.to(torch.int64), trivial):
        if groups != k // group_size:
            raise ValueError(
                f"GPTQ scales have {groups} groups but K / group_size = {k // group_size}"
            )
        return Int4Weight.pack(codes, scales_nk.contiguous(), zeros, group_size)

    g_idx = g_idx.to(torch.int64)
    if tuple(g_idx.shape) != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(
            f"GPTQ g_idx must be [{k}] with values in [0, {groups}); got {list(g_idx.shape)}"
        )
    counts = torch.bincount(g_idx, minlength=groups)
    if groups * group_size != k or not bool((counts == group_size).all()):
        raise ValueError(
            f"GPTQ g_idx gives groups of sizes {sorted(set(counts.tolist()))}; this importer needs "
            f"every group to hold exactly group_size = {group_size} input channels (GPTQ act order does)"
        )
    perm = torch.sort(g_idx, stable=True).indices  # packed column j = input channel perm[j]
    # after sorting, packed column j belongs to group j // group_size, so scales keep their order
    return Int4Weight.pack(codes[:, perm], scales_nk.contiguous(), zeros, group_size, perm)


# --- a whole HF folder -------------------------------------------------------------------------
@dataclass
class QuantizedFolder:
    int4: dict[str, Int4Weight]  # linear name (e.g. model.layers.0.self_attn.q_proj) -> weight
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # every other tensor, as stored
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> bias
    config: dict = field(default_factory=dict)  # config.json
    quant_method: str = ""


def read_quantization_config(folder: str | Path) -> dict:
    """config.json's quantization_config of an HF folder, checked for what the importers read."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a folder saved by transformers")
    config = json.loads(path.read_text())
    quant = config.get("quantization_config")
    if not quant:
        raise ValueError(f"{path} has no quantization_config: it is not an AWQ or GPTQ checkpoint")
    method = str(quant.get("quant_method", "")).lower()
    bits = quant.get("bits", quant.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"{path}: {bits}-bit {method} weights; only 4-bit AWQ/GPTQ import")
    if method == "awq":
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"{path}: AWQ version {version!r}; only AutoAWQ 'gemm' checkpoints import"
            )
        if quant.get("zero_point", True) is False:
            raise ValueError(f"{path}: AWQ without zero points is not supported")
    elif method == "gptq":
        fmt = quant.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"{path}: GPTQ checkpoint_format {fmt!r}; 'gptq' (v1) and 'gptq_v2' import"
            )
    else:
        raise ValueError(f"{path}: quant_method {method!r}; only 'awq' and 'gptq' import")
    return config


def load_quantized_folder(
    folder: str | Path, device: str | torch.device = "cpu"
) -> QuantizedFolder:
    """Read every *.safetensors in an HF AWQ/GPTQ folder into Int4Weights plus plain tensors.

    A linear is any prefix with {prefix}.qweight; its qzeros, scales (and g_idx, bias) go with it.
    Needs neither autoawq nor auto-gptq."""
    from safetensors import safe_open

    folder = Path(folder)
    config = read_quantization_config(folder)
    quant = config["quantization_config"]
    method = quant["quant_method"].lower()
    group_size = int(quant.get("group_size", quant.get("q_group_size", 128)))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 (not a dict)
                raw[key] = handle.get_tensor(key)
    linears = sorted(key[: -len(".qweight")] for key in raw if key.endswith(".qweight"))
    out = QuantizedFolder(int4={}, config=config, quant_method=method)
    for name in linears:
        parts = {suffix: raw.pop(f"{name}.{suffix}", None) for suffix in PROJ_SUFFIXES}
        for needed in ("qzeros", "scales"):
            if parts[needed] is None:
                raise ValueError(f"{folder}: {name}.qweight has no {name}.{needed}")
        if method == "awq":
            out.int4[name] = from_awq(
                parts["qweight"], parts["qzeros"], parts["scales"], group_size
            )
        else:
            out.int4[name] = from_gptq(
                parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], group_size,
                bool(quant.get("sym", True)), quant.get("checkpoint_format", "gptq"),
            )  # fmt: skip
        if parts["bias"] is not None:
            out.biases[name] = parts["bias"]
    out.tensors = raw
    return out
