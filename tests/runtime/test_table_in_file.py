"""The embedding table a CPU Session leaves in the bundle's file: rows read on demand equal the
table read whole, and a file that changed under the Session is an error, not wrong numbers."""

import os

import pytest
import torch

from rgpt_rt.runtime.loading import EMBED_TENSOR
from rgpt_rt.runtime.session import Session, default_bundle
from rgpt_rt.runtime.table_in_file import TableInFile
from rgpt_rt.safetensors_io import read_tensors, write_safetensors


@pytest.fixture
def table_file(tmp_path):
    table = torch.randn(37, 24).to(torch.float16)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"bias": torch.randn(5), "table": table}, {})
    return path, table


@pytest.mark.parametrize(
    "ids",
    [[0], [36], [3, 3, 3], [[5, 1, 5], [0, 36, 2]], []],
    ids=["first", "last", "repeated", "2d", "empty"],
)
def test_rows_equal_the_table_read_whole(table_file, ids):
    path, table = table_file
    ids = torch.tensor(ids, dtype=torch.int64)
    rows = TableInFile(path, "table").rows(ids)
    assert rows.dtype == torch.float16 and rows.shape == (*ids.shape, 24)
    assert torch.equal(rows, table[ids])  # the same bytes


@pytest.mark.parametrize("bad", [-1, 37])
def test_ids_out_of_range_are_refused(table_file, bad):
    path, _ = table_file
    with pytest.raises(ValueError, match=r"row ids must be in 0\.\.36"):
        TableInFile(path, "table").rows(torch.tensor([0, bad]))


def test_a_missing_or_not_2d_tensor_is_named(table_file):
    path, _ = table_file
    for name in ("nope", "bias"):
        with pytest.raises(ValueError, match=f"no 2-D tensor {name}"):
            TableInFile(path, name)


def test_a_file_cut_short_while_open_is_an_error(table_file):
    path, _ = table_file
    table = TableInFile(path, "table")
    os.truncate(path, path.stat().st_size - 24 * 2 * 10)  # the last 10 rows are gone
    assert table.rows(torch.tensor([0])).shape == (1, 24)
    with pytest.raises(OSError, match="changed while a Session had it open"):
        table.rows(torch.tensor([36]))


def test_a_cpu_session_reads_its_embeddings_from_the_bundle():
    bundle = default_bundle()
    decoder = Session(bundle, device="cpu").stages.decoder
    assert decoder.embed_tokens is None and decoder.embed_file is not None
    whole = read_tensors(bundle / "llm.safetensors", names={EMBED_TENSOR})[EMBED_TENSOR]
    ids = torch.tensor([[1, 2, 3, 2], [0, 5, 9, 1]])
    assert torch.equal(decoder.embed(ids), whole[ids].to(decoder.dtype))
