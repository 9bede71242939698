"""The INT4 weight (Int4Weight) and the files that hold it (format version 2, layout n16k64).

    w[n, k] = (q[n, k] − z[n, γ]) · s[n, γ]      γ = k // group_size      exactly (no rounding)

q are 4-bit codes, s fp16 scales, z integer zeros (0..15 from our quantizers; 16 occurs in GPTQ v1
imports) per group of group_size inputs along K. The tensors are in layout "n16k64", the one the
kernels read; how the codes sit in them, and pack / unpack / dequantize, is
rgpt_rt/ops/int4_layout.py (and csrc/int4/README.md):

  qweight  int32 [T, 128 S]      T = ceil(N / 16) tiles of 16 output rows, S = ceil(K / 64)
  scales   fp16  [T, K/G, 16]
  zeros    uint8 [T, K/G, 16]
  perm     int64 [K] | None      GPTQ act order only: packed column k holds input channel
                                 perm[k], so y = x[..., perm] @ W_packed.T

K must be a multiple of group_size, and group_size a multiple of 32.

Format version 1 (layout nk8i) defined w as the product rounded to fp16; its files are refused
with an error that says to re-export them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from rgpt_rt.ops import int4_layout as layout
from rgpt_rt.ops.int4_layout import FORMAT_VERSION, LAYOUT, LAYOUT_VERSION, NK8I
from rgpt_rt.safetensors_io import TensorEntry


@dataclass
class Int4Weight:
    """A [N, K] weight in INT4 layout n16k64 (the module docstring has every field)."""

    qweight: torch.Tensor  # int32 [T, 128 S]
    scales: torch.Tensor  # fp16 [T, K/G, 16]
    zeros: torch.Tensor  # uint8 [T, K/G, 16]
    group_size: int
    shape: tuple[int, int]  # (N, K)
    perm: torch.Tensor | None = None  # int64 [K]: packed column k is input channel perm[k]

    layout = LAYOUT  # class constant, not a field

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.group_size = int(self.group_size)
        n, k = self.shape
        shapes = layout.packed_shapes(n, k, self.group_size)
        dtypes = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.uint8}
        for name, dtype in dtypes.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"Int4Weight.{name} must be a tensor; got {type(tensor).__name__}")
            if tensor.dtype != dtype or tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"Int4Weight.{name} must be {dtype} {list(shapes[name])} (layout {LAYOUT}) "
                    f"for shape {self.shape} and group_size {self.group_size}; "
                    f"got {tensor.dtype} {list(tensor.shape)}"
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

    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        perm: torch.Tensor | None = None,
    ) -> Int4Weight:
        """From the plain form: codes uint8 [N, K] (0..15, packed column order), scales fp16
        [N, K/G], zeros uint8 [N, K/G] (0..16)."""
        qweight, packed_scales, packed_zeros = layout.pack(codes, scales, zeros, group_size)
        return cls(qweight, packed_scales, packed_zeros, group_size, tuple(codes.shape), perm)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plain form: (codes uint8 [N, K] in packed column order, scales fp16 [N, K/G],
        zeros uint8 [N, K/G])."""
        return layout.unpack(self.qweight, self.scales, self.zeros, *self.shape, self.group_size)

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


def dequantize(q: Int4Weight) -> torch.Tensor:
    """float32 [N, K]: (q − z)·s exactly, the value every kernel uses, in the original input
    channel order (a GPTQ act-order permutation is undone). fp16 callers use .half(): that is
    the fp16 product AutoAWQ and GPTQ compute."""
    packed = layout.dequantize(q.qweight, q.scales, q.zeros, *q.shape, q.group_size)
    if q.perm is None:
        return packed
    out = torch.empty_like(packed)
    out[:, q.perm] = packed
    return out


def concat_int4(weights: list[Int4Weight]) -> Int4Weight:
    """One weight whose output rows are those of `weights` in order (q/k/v, gate/up stacked);
    nothing is requantized. Tiles are concatenated as they are when every weight but the last
    fills its tiles (N % 16 == 0, as in every LLaMA); otherwise the rows are unpacked and packed
    again."""
    first = weights[0]
    for w in weights:
        if (w.shape[1], w.group_size) != (first.shape[1], first.group_size) or w.perm is not None:
            raise ValueError(
                "only INT4 weights with the same K and group size and no act-order stack; got "
                f"{[(w.shape, w.group_size, w.perm is not None) for w in weights]}"
            )
    shape = (sum(w.shape[0] for w in weights), first.shape[1])
    if all(w.shape[0] % layout.TILE_ROWS == 0 for w in weights[:-1]):
        return Int4Weight(
            torch.cat([w.qweight for w in weights]),
            torch.cat([w.scales for w in weights]),
            torch.cat([w.zeros for w in weights]),
            first.group_size,
            shape,
        )
    codes, scales, zeros = zip(*(w.unpack() for w in weights))
    return Int4Weight.pack(torch.cat(codes), torch.cat(scales), torch.cat(zeros), first.group_size)


# --- tensors in files ------------------------------------------------------------------------
# A linear `name` is saved as three (or four) tensors whose names say the layout:
#   {name}.qweight_n16k64  int32 [T, 128 S]     {name}.scales_n16k64  fp16  [T, K/G, 16]
#   {name}.zeros_n16k64    uint8 [T, K/G, 16]   {name}.perm           int64 [K]  (act order only)
# and the file metadata holds the format's identity and, under "rgpt_int4",
# {name: {"shape": [N, K], "group_size": G}} as JSON.
QWEIGHT_SUFFIX = f".qweight_{LAYOUT}"
SCALES_SUFFIX = f".scales_{LAYOUT}"
ZEROS_SUFFIX = f".zeros_{LAYOUT}"
PERM_SUFFIX = ".perm"
METADATA_KEY = "rgpt_int4"
FORMAT_NAME = "rgpt_rt.int4"
REEXPORT = (
    "re-export it with this rgpt_rt (python export/build_engine.py for a bundle; "
    "rgpt_rt.quant.quantize_checkpoint or convert_quantized_folder for a checkpoint)"
)


def int4_tensors(name: str, q: Int4Weight) -> dict[str, torch.Tensor]:
    """The flat tensors that store `q` under `name` (see the table above)."""
    tensors = {
        name + QWEIGHT_SUFFIX: q.qweight,
        name + SCALES_SUFFIX: q.scales,
        name + ZEROS_SUFFIX: q.zeros,
    }
    if q.perm is not None:
        tensors[name + PERM_SUFFIX] = q.perm
    return tensors


def int4_entries(name: str, shape: tuple[int, int], group_size: int) -> list[TensorEntry]:
    """The file entries (names, dtypes, shapes) int4_tensors writes for an [N, K] weight without
    act order: a streaming writer declares them before the weight exists."""
    shapes = layout.packed_shapes(*shape, group_size)
    return [
        TensorEntry(name + QWEIGHT_SUFFIX, torch.int32, shapes["qweight"]),
        TensorEntry(name + SCALES_SUFFIX, torch.float16, shapes["scales"]),
        TensorEntry(name + ZEROS_SUFFIX, torch.uint8, shapes["zeros"]),
    ]


def int4_metadata(shapes: dict[str, tuple[tuple[int, int], int]]) -> dict[str, str]:
    """safetensors metadata (str -> str) for a file holding INT4 weights {name: (shape, group_size)}."""
    table = {
        name: {"shape": list(shape), "group_size": group} for name, (shape, group) in shapes.items()
    }
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layout": LAYOUT,
        "layout_version": str(LAYOUT_VERSION),
        METADATA_KEY: json.dumps(table, sort_keys=True),
    }


def check_int4_file(metadata: dict[str, str], names, where: str = "the file") -> None:
    """Raise ValueError unless a file with this metadata and these tensor names holds no INT4
    weights or holds them in format version FORMAT_VERSION (layout n16k64)."""
    old = [name for name in names if name.endswith(f".qweight_{NK8I}")]
    if json.loads(metadata.get(METADATA_KEY, "{}")) == {} and not old:
        return  # no INT4 weights (an unquantized bundle's llm.safetensors has an empty table)
    version = metadata.get("format_version", "1")  # version 1 files carry no format_version
    found = (version, metadata.get("layout", NK8I), metadata.get("layout_version", "1"))
    if found == (str(FORMAT_VERSION), LAYOUT, str(LAYOUT_VERSION)) and not old:
        return
    if version == "1" or found[1] == NK8I or old:
        raise ValueError(
            f"{where} holds INT4 weights in format version 1 (layout {NK8I}, w = fp16((q − z)·s)); "
            f"this rgpt_rt reads format version {FORMAT_VERSION} (layout {LAYOUT}) only: {REEXPORT}"
        )
    raise ValueError(
        f"{where} holds INT4 format version {found[0]}, layout {found[1]!r} version {found[2]}; "
        f"this rgpt_rt reads format version {FORMAT_VERSION}, layout {LAYOUT!r} version "
        f"{LAYOUT_VERSION}: read it with the rgpt_rt that wrote it, or {REEXPORT}"
    )


def split_int4_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, where: str = "the file"
) -> tuple[dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """Inverse of int4_tensors + int4_metadata: ({name: Int4Weight}, {name: other tensor}).
    A file of format version 1 (layout nk8i) is refused with an error (naming `where`) that
    says to re-export it."""
    metadata = metadata or {}
    check_int4_file(metadata, tensors, where)
    table = json.loads(metadata.get(METADATA_KEY, "{}"))
    rest = dict(tensors)
    weights = {}
    for name, info in table.items():
        try:
            qweight = rest.pop(name + QWEIGHT_SUFFIX)
            scales = rest.pop(name + SCALES_SUFFIX)
            zeros = rest.pop(name + ZEROS_SUFFIX)
        except KeyError as missing:
            raise ValueError(
                f"INT4 weight {name!r} is listed in the metadata but {missing} is not in the file"
            ) from None
        perm = rest.pop(name + PERM_SUFFIX, None)
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
        metadata = handle.metadata() or {}
        check_int4_file(metadata, handle.keys(), str(path))  # before reading any tensor
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return split_int4_tensors(tensors, metadata, str(path))
