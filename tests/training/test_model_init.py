"""The checkpoint changes of the shipped model's recipe: number_regions gives a model a
region-number table whose row K-1 is the digit K's input word embedding and keeps every other
weight; scale_words multiplies the input word embeddings and nothing else."""

import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.training.model_init import number_regions, scale_words


def test_number_regions_starts_each_row_at_its_digit():
    torch.manual_seed(0)
    model = RGPT(RGPTConfig.from_preset("tiny")).eval()
    numbered = number_regions(model, 5)
    assert numbered.config.connector.region_numbers == 5
    words = model.llm.get_input_embeddings().weight
    for k in range(1, 6):
        row = numbered.connector.region_number[k - 1]
        assert torch.equal(row, words[model.tokenizer.token_to_id(str(k))])
    state, before = numbered.connector.state_dict(), model.connector.state_dict()
    assert all(torch.equal(state[name], value) for name, value in before.items())
    with pytest.raises(ValueError, match="already numbers its regions"):
        number_regions(numbered, 5)
    with pytest.raises(ValueError, match="numbers must be 1-9"):
        number_regions(model, 12)


def test_scale_words_scales_the_input_word_embeddings_alone():
    torch.manual_seed(0)
    model = RGPT(RGPTConfig.from_preset("tiny")).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    scaled = scale_words(model, 65.0)
    words = "llm.model.embed_tokens.weight"
    for name, value in scaled.state_dict().items():
        expected = before[name] * 65.0 if name == words else before[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
