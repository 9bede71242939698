"""The INT4 weight format: 4-bit codes, fp16 scales, integer zeros, groups along the input dim.

    w[n, k] = (q[n, k] − z[n, g]) · s[n, g]      g = k // group_size      (DESIGN.md §2)

The dequantised value is the fp16 rounding of that product, exactly what AutoAWQ and GPTQ
compute in fp16 (the product of a 5-bit integer and an fp16 scale is exact in fp32, so
rounding it once to fp16 is the fp16 multiplication).

Layout "nk8i" (the one csrc/int4 kernels read; the name is in every saved tensor name):
  qweight  int32 [N, K/8]   row n holds the K codes of output n, 8 per 32-bit word;
                            word j holds k = 8j..8j+7, nibble position p (bits 4p..4p+3)
                            holds k = 8j + NK8I_ORDER[p], NK8I_ORDER = [0, 2, 4, 6, 1, 3, 5, 7],
                            so `(word >> 4i) & 0x000F000F` is the pair (k = 8j+2i, 8j+2i+1)
                            in the low and high 16-bit halves (one mask per two fp16 values).
  scales   fp16  [N, K/G]
  zeros    uint8 [N, K/G]   0..15 for our quantizers; 16 occurs in imported GPTQ v1
                            checkpoints (a stored zero−1 of 15), and is kept as is.
  perm     int64 [K] | None  GPTQ act-order only: packed column k holds input channel perm[k],
                            so y = x[..., perm] @ dequantize_packed(q).T.
K must be a multiple of group_size, and group_size a multiple of 32 (a 16-byte load of 32 codes
never straddles a group).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

LAYOUT = "nk8i"
NK8I_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble position p holds k offset NK8I_ORDER[p]
NK8I_POSITION = tuple(NK8I_ORDER.index(i) for i in range(8))  # k offset i sits at this position
GROUP_MULTIPLE = 32


def check_group_shape(n: int, k: int, group_size: int) -> None:
    """Raise ValueError unless a [n, k] weight can be grouped by group_size along k."""
    if n <= 0 or k <= 0:
        raise ValueError(f"an INT4 weight needs a non-empty shape; got ({n}, {k})")
    if group_size <= 0 or group_size % GROUP_MULTIPLE != 0:
        raise ValueError(
            f"group_size {group_size} is not supported; use a positive multiple of {GROUP_MULTIPLE} (128 is the default)"
        )
    if k % group_size != 0:
        raise ValueError(
            f"the input dim K = {k} is not a multiple of group_size {group_size}; "
            f"pad K to a multiple of {group_size} or pick a group size that divides it"
        )


@dataclass
class Int4Weight:
    """A [N, K] weight in INT4 layout "nk8i" (see the module docstring for every field)."""

    qweight: torch.Tensor  # int32 [N, K/8], layout nk8i
    scales: torch.Tensor  # fp16 [N, K/G]
    zeros: torch.Tensor  # uint8 [N, K/G]
    group_size: int
    shape: tuple[int, int]  # (N, K)
    perm: torch.Tensor | None = None  # int64 [K]: packed column k is input channel perm[k]

    layout = LAYOUT  # class constant, not a field

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.group_size = int(self.group_size)
        n, k = self.shape
        check_group_shape(n, k, self.group_size)
        groups = k // self.group_size
        expect = {
            "qweight": (self.qweight, torch.int32, (n, k // 8)),
            "scales": (self.scales, torch.float16, (n, groups)),
            "zeros": (self.zeros, torch.uint8, (n, groups)),
        }
        for name, (tensor, dtype, shape) in expect.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"Int4Weight.{name} must be a tensor; got {type(tensor).__name__}")
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(
                    f"Int4Weight.{name} must be {dtype} {list(shape)} for shape {self.shape} "
                    f"and group_size {self.group_size}; got {tensor.dtype} {list(tensor.shape)}"
                )
        devices = {t.device for t in (self.qweight, self.scales, self.zeros)}
        if self.perm is not None:
            if self.perm.dtype != torch.int64 or tuple(self.perm.shape) != (k,):
                raise ValueError(
                    f"Int4Weight.perm must be int64 [{k}]; got {self.perm.dtype} {list(self.perm.shape)}"
                )
            devices.add(self.perm.device)
        if len(devices) != 1:
            raise ValueError(
                f"Int4Weight tensors are on several devices {devices}; move them together with .to()"
            )

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.zeros] + (
            [self.perm] if self.perm is not None else []
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> Int4Weight:
        perm = None if self.perm is None else self.perm.to(device)
        return Int4Weight(
            self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
            self.group_size, self.shape, perm,
        )  # fmt: skip

    def codes(self) -> torch.Tensor:
        """uint8 [N, K]: the 4-bit codes in packed (kernel) column order."""
        return unpack_nk8i(self.qweight)


def pack_nk8i(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes in 0..15 (K a multiple of 8) -> int32 [N, K/8] in layout nk8i."""
    if codes.dim() != 2 or codes.shape[1] % 8 != 0:
        raise ValueError(f"codes must be [N, K] with K a multiple of 8; got {list(codes.shape)}")
    n, k = codes.shape
    c = (codes.to(torch.uint8) & 0xF).reshape(n, k // 8, 8)  # [N, word, k offset]
    # byte b of a (little-endian) word holds nibble positions 2b and 2b + 1
    order = NK8I_ORDER
    pairs = [c[..., order[2 * b]] | (c[..., order[2 * b + 1]] << 4) for b in range(4)]
    return torch.stack(pairs, dim=-1).view(torch.int32).reshape(n, k // 8)


def unpack_nk8i(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] in layout nk8i -> uint8 [N, K] codes."""
    n, words = qweight.shape
    # int32 shifts are arithmetic, but the 4-bit mask drops the sign bits they bring in
    parts = [((qweight >> (4 * position)) & 0xF).to(torch.uint8) for position in NK8I_POSITION]
    return torch.stack(parts, dim=-1).reshape(n, words * 8)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """fp16 [N, K] = fp16((codes − zeros) · scales), groups of group_size along K.

    (codes − zeros) is an integer in [−16, 15] and the scale an fp16 value, so the fp32 product
    is exact and one rounding to fp16 equals the fp16 product AutoAWQ/GPTQ compute."""
    n, k = codes.shape
    values = codes.to(torch.float32).reshape(n, k // group_size, group_size)
    values -= zeros.to(torch.float32)[..., None]  # q − z: exact small integers
    values *= scales.to(torch.float32)[..., None]  # exact in fp32
    return values.to(torch.float16).reshape(n, k)  # the one rounding


def dequantize(q: Int4Weight) -> torch.Tensor:
    """fp16 [N, K]: (q − z) · s exactly (see the module docstring), in the original input
    channel order (a GPTQ act-order permutation is undone)."""
    packed = dequantize_codes(q.codes(), q.scales, q.zeros, q.group_size)
    if q.perm is None:
        return packed
    out = torch.empty_like(packed)
    out[:, q.perm] = packed
    return out


# --- tensors in files ------------------------------------------------------------------------
# A linear `name` is saved as three (or four) tensors whose names say the layout:
#   {name}.qweight_nk8i  int32 [N, K/8]    {name}.scales  fp16 [N, K/G]
#   {name}.zeros         uint8 [N, K/G]    {name}.perm    int64 [K]   (only with act order)
# and the file metadata "rgpt_int4" holds {name: {"shape": [N, K], "group_size": G}} as JSON.
QWEIGHT_SUFFIX = f".qweight_{LAYOUT}"
METADATA_KEY = "rgpt_int4"


def int4_tensors(name: str, q: Int4Weight) -> dict[str, torch.Tensor]:
    """The flat tensors that store `q` under `name` (see the table above)."""
    tensors = {
        name + QWEIGHT_SUFFIX: q.qweight,
        name + ".scales": q.scales,
        name + ".zeros": q.zeros,
    }
    if q.perm is not None:
        tensors[name + ".perm"] = q.perm
    return tensors


def int4_metadata(shapes: dict[str, tuple[tuple[int, int], int]]) -> dict[str, str]:
    """safetensors metadata (str -> str) for a file holding INT4 weights {name: (shape, group_size)}."""
    table = {
        name: {"shape": list(shape), "group_size": group} for name, (shape, group) in shapes.items()
    }
    return {
        "format": "rgpt_rt.int4",
        "layout": LAYOUT,
        METADATA_KEY: json.dumps(table, sort_keys=True),
    }


def split_int4_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> tuple[dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """Inverse of int4_tensors + int4_metadata: ({name: Int4Weight}, {name: other tensor})."""
    metadata = metadata or {}
    layout = metadata.get("layout", LAYOUT)
    if layout != LAYOUT:
        raise ValueError(f"the file holds INT4 layout {layout!r}; this build reads {LAYOUT!r}")
    table = json.loads(metadata.get(METADATA_KEY, "{}"))
    rest = dict(tensors)
    weights = {}
    for name, info in table.items():
        try:
            qweight = rest.pop(name + QWEIGHT_SUFFIX)
            scales = rest.pop(name + ".scales")
            zeros = rest.pop(name + ".zeros")
        except KeyError as missing:
            raise ValueError(
                f"INT4 weight {name!r} is listed in the metadata but {missing} is not in the file"
            ) from None
        perm = rest.pop(name + ".perm", None)
        weights[name] = Int4Weight(
            qweight, scales, zeros, info["group_size"], tuple(info["shape"]), perm
        )
    leftover = [key for key in rest if key.endswith(QWEIGHT_SUFFIX)]
    if leftover:
        raise ValueError(f"{leftover[0]} is not described in the file metadata {METADATA_KEY!r}")
    return weights, rest


def save_int4(
    path, weights: dict[str, Int4Weight], tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Write INT4 weights (and plain tensors) to one safetensors file, atomically."""
    from rgpt_rt.safetensors_io import write_safetensors

    flat = {}
    for name, q in weights.items():
        flat.update(int4_tensors(name, q))
    for name, tensor in (tensors or {}).items():
        if name in flat:
            raise ValueError(f"tensor name {name!r} is used twice")
        flat[name] = tensor
    write_safetensors(
        path, flat, int4_metadata({name: (q.shape, q.group_size) for name, q in weights.items()})
    )


def load_int4(
    path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """Read a file written by save_int4 (or quantize_checkpoint): ({name: Int4Weight}, {name: tensor})."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return split_int4_tensors(tensors, metadata)
