"""safetensors files read and written without mmap and without holding every tensor at once.

    read_header(path) -> ({name: TensorEntry}, metadata, data_start)
    read_tensor(path, entry, data_start) -> Tensor          (plain reads into fresh memory)
    read_tensors(path, device, dtype) -> {name: Tensor}     (one at a time, each straight to device)
    with SafetensorsWriter(path, entries, metadata) as w: w.write(name, tensor) ...
    write_safetensors(path, tensors, metadata)              (atomic: temp file + rename)

The format: a u64 little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes back to back
(offsets relative to the end of the header). Files written here load with safetensors.safe_open.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes (the format's header spells dtypes this way)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20


@dataclass
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # byte offset in the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty(0, dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """({name: TensorEntry}, metadata, data start) of a safetensors file. A file that is not
    one (too short, a header that is not JSON, offsets out of order) is a ValueError naming it."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file (no valid header length)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} has a header that is not JSON ({error})") from None
    metadata = header.pop("__metadata__", {}) or {}
    entries = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: the header entry of {name} is malformed") from None
        if dtype not in ST_DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {dtype}, which rgpt_rt does not read"
            )
        entry = TensorEntry(name, ST_DTYPES[dtype], shape, start, end)
        if not 0 <= start <= end or end - start != entry.nbytes:
            raise ValueError(
                f"{path}: tensor {name} has offsets {[start, end]} for shape {list(shape)}"
            )
        entries[name] = entry
    return entries, metadata, 8 + length


def read_tensor(path: Path, entry: TensorEntry, data_start: int) -> torch.Tensor:
    """One tensor, read into fresh (anonymous) memory."""
    if entry.end - entry.start != entry.nbytes:
        raise ValueError(
            f"{path}: tensor {entry.name} has {entry.end - entry.start} bytes for shape {entry.shape}"
        )
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(data_start + entry.start)
        if entry.nbytes and handle.readinto(memoryview(buffer.numpy())) != entry.nbytes:
            raise ValueError(f"{path} is truncated inside tensor {entry.name}")
    return buffer.view(entry.dtype).reshape(entry.shape)


def read_tensors(
    path: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    names=None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a file (or those in `names`), each read into fresh memory, cast to
    `dtype` when floating and moved to `device` before the next is read: nothing of the file
    stays mapped, and the host holds at most one tensor of it at a time."""
    path = Path(path)
    entries, _, data_start = read_header(path)
    size = path.stat().st_size
    out = {}
    for name, entry in entries.items():
        if names is not None and name not in names:
            continue
        if data_start + entry.end > size:
            raise ValueError(f"{path} is truncated inside tensor {name}")
        tensor = read_tensor(path, entry, data_start)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.to(device)
    return out


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are all declared up front, then given one by one
    in the declared order, so nothing but the tensor being written is held in memory.

        with SafetensorsWriter(path, entries, metadata) as writer:
            writer.write(name, tensor)   # for every entry, in order
    """

    def __init__(self, path: Path, entries: list[TensorEntry], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for entry in entries:
            entry.start, entry.end = offset, offset + entry.nbytes
            offset = entry.end
            header[entry.name] = {
                "dtype": ST_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [entry.start, entry.end],
            }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._pending = list(entries)
        self._handle = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._pending.pop(0) if self._pending else None
        if entry is None or entry.name != name:
            raise ValueError(
                f"tensor {name} written out of the declared order (expected {entry and entry.name})"
            )
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"tensor {name} is {tensor.dtype} {list(tensor.shape)}; declared {entry.dtype} {list(entry.shape)}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self._handle.close()
            return
        if self._pending:
            self._handle.close()
            raise ValueError(
                f"{len(self._pending)} declared tensors were never written, e.g. {self._pending[0].name}"
            )
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write tensors (in the given order) to a safetensors file that appears complete or not at
    all. Tensors may share memory (safetensors.torch.save refuses that; this writes each once
    per name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with SafetensorsWriter(Path(tmp), entries, metadata) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
