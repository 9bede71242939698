"""Fixtures of the runtime tests: tiny transformers LLaMA folders, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llama_reference import build_hf
from transformers import LlamaForCausalLM


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    """variant -> (transformers model, folder it was saved to); built once per session."""
    made: dict[str, tuple[LlamaForCausalLM, Path]] = {}

    def get(variant: str) -> tuple[LlamaForCausalLM, Path]:
        if variant not in made:
            model = build_hf(variant)
            folder = tmp_path_factory.mktemp(f"llama_{variant}")
            model.save_pretrained(str(folder))
            made[variant] = (model, folder)
        return made[variant]

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread, and a shared machine's other jobs cannot stall
    it at OpenMP barriers (2-thread SDPA took 8 ms instead of 10 µs under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
