"""A 2-D table that stays in its safetensors file, read a few rows at a time.

    table = TableInFile(path, "embed_tokens.weight")   # opens the file; reads nothing else
    rows = table.rows(ids)                             # ids [...] int64 -> [..., D], stored dtype

A CPU Session's token-embedding table lives here (loading.load_bundle_decoder): at 7B it is
0.26 GB of fp16 of which a call reads a few hundred rows (the prompt's text tokens, then one
row per decoded token), so holding it in memory costs a twentieth of the process for nothing.
Each row is one `pread` of 8 KB at 7B (a few microseconds once the OS has cached the page);
no mapping is kept, so nothing of the file counts in the process's memory. The file must not
change while the table is open: bundles are written by rename (rgpt_rt/atomic.py), which leaves
an open file as it was.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch

from rgpt_rt.safetensors_io import read_header


class TableInFile:
    """Rows of the 2-D tensor `name` of the safetensors file at `path`, read on demand."""

    def __init__(self, path: str | Path, name: str):
        path = Path(path)
        entries, _, data_start = read_header(path)
        entry = entries.get(name)
        if entry is None or len(entry.shape) != 2:
            raise ValueError(f"{path} has no 2-D tensor {name}")
        self.path, self.name = path, name
        self.shape, self.dtype = entry.shape, entry.dtype
        self._row_bytes = entry.nbytes // max(1, entry.shape[0])
        self._start = data_start + entry.start
        if self._start + entry.nbytes > path.stat().st_size:
            raise ValueError(f"{path} is truncated inside tensor {name}")
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # rows are read at random: no read-ahead
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    @property
    def nbytes(self) -> int:
        return self._row_bytes * self.shape[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (integers in 0..rows-1, any device: read on the host) -> [..., D] on the
        host in the stored dtype: one read per id (a repeated id is served by the OS's cache)."""
        flat = ids.reshape(-1).tolist()
        if flat and not 0 <= min(flat) <= max(flat) < self.shape[0]:
            raise ValueError(
                f"row ids must be in 0..{self.shape[0] - 1}; got {min(flat)}..{max(flat)}"
            )
        size = self._row_bytes
        out = torch.empty(len(flat) * size, dtype=torch.uint8)
        view = memoryview(out.numpy())
        for i, row in enumerate(flat):
            got = os.preadv(self._fd, [view[i * size : (i + 1) * size]], self._start + row * size)
            if got != size:
                raise OSError(
                    f"{self.path} gave {got} of {size} bytes of {self.name} row {row}: the file "
                    "changed while a Session had it open; reload the Session"
                )
        return out.view(self.dtype).view(*ids.shape, self.shape[1])

    def close(self) -> None:
        self._close()
