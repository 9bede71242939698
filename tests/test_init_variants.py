"""scripts/init_variants.py number-regions: a checkpoint gains a region-number table whose row
K-1 is the digit K's input word embedding, and computes what it did apart from that table;
position-regions: it gains a centroid projection started at a least-squares fit."""

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_number_regions_starts_each_row_at_its_digit(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    init_variants = importlib.import_module("init_variants")
    torch.manual_seed(0)
    model = RGPT(RGPTConfig.from_preset("tiny")).eval()
    numbered = init_variants.number_regions(model, argparse.Namespace(numbers=5, init="m"))
    assert numbered.config.connector.region_numbers == 5
    words = model.llm.get_input_embeddings().weight
    for k in range(1, 6):
        row = numbered.connector.region_number[k - 1]
        assert torch.equal(row, words[model.tokenizer.token_to_id(str(k))])
    state, before = numbered.connector.state_dict(), model.connector.state_dict()
    assert all(torch.equal(state[name], value) for name, value in before.items())
    with pytest.raises(SystemExit, match="already numbers"):
        init_variants.number_regions(numbered, argparse.Namespace(numbers=5, init="m"))
    with pytest.raises(SystemExit, match="1-9"):
        init_variants.number_regions(model, argparse.Namespace(numbers=12, init="m"))


def test_position_regions_starts_at_the_fit_of_the_embeddings_to_the_centroids(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    init_variants = importlib.import_module("init_variants")
    monkeypatch.setattr(init_variants, "ALIGN_REGIONS", 200)
    torch.manual_seed(0)
    model = RGPT(RGPTConfig.from_preset("tiny")).eval()
    args = argparse.Namespace(frequencies=2, factor=1.0, init="m")
    placed = init_variants.position_regions(model, args)
    assert placed.config.connector.region_positions == 2
    weight = placed.connector.region_position.weight
    assert weight.shape == (model.config.llm.hidden_size, 8) and weight.any()
    doubled = init_variants.position_regions(
        model, argparse.Namespace(**{**vars(args), "factor": 2.0})
    )
    torch.testing.assert_close(doubled.connector.region_position.weight, 2 * weight)
    state, before = placed.connector.state_dict(), model.connector.state_dict()
    assert all(torch.equal(state[name], value) for name, value in before.items())
    with pytest.raises(SystemExit, match="already projects"):
        init_variants.position_regions(placed, args)
    with pytest.raises(SystemExit, match="1-16"):
        init_variants.position_regions(
            model, argparse.Namespace(**{**vars(args), "frequencies": 0})
        )
