"""What runs at the edge: the LLaMA decoder and generation (vision backends and the Session
arrive with their issues). Never imports transformers, the trainer or rgpt_rt.model."""

from rgpt_rt.runtime.decoder import KVCache, LlamaDecoder
from rgpt_rt.runtime.generate import (
    Generation,
    SamplingParams,
    TextStream,
    decode,
    generate,
    generate_batch,
    generate_stream,
    stream,
)
from rgpt_rt.runtime.hf_llama import llm_config_from_hf, read_hf_tensors, read_llm_config

__all__ = [
    "Generation",
    "KVCache",
    "LlamaDecoder",
    "SamplingParams",
    "TextStream",
    "decode",
    "generate",
    "generate_batch",
    "generate_stream",
    "llm_config_from_hf",
    "read_hf_tensors",
    "read_llm_config",
    "stream",
]
