"""What runs at the edge. Never imports transformers, the trainer, rgpt_rt.model or the offline
quantisers (rgpt_rt.quant); tests/runtime/test_imports.py checks it.

    session.py      Session: the public API (describe, describe_many, classify, refer, ask, chat)
    stages.py       the stages a question goes through: see (preprocess + vision), regions,
                    tokenize, splice, prefill (with the image-prefix cache)
    kv_pool.py      KV caches in flight, reused across answers
    answer.py       AnswerStream (text deltas) and Chat (turns on one cache)
    preprocess.py   images and masks -> the model's geometry
    vision.py       vision backends (TensorRT, ONNX Runtime, torch) and the region connector
    model.py        the LLaMA decoder (gpt-fast style), layers.py its layers, kv_cache.py its
                    cache, graphs.py its CUDA graphs, loading.py its loading, int4_linear.py its
                    INT4 linears, table_in_file.py its embedding table left in the bundle (CPU)
    generate.py     sampling, stop strings, streaming text, the decode loop
"""

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
from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.loading import decoder_from_state, load_bundle_decoder, load_decoder
from rgpt_rt.runtime.model import LlamaDecoder

__all__ = [
    "Generation",
    "KVCache",
    "LlamaDecoder",
    "SamplingParams",
    "TextStream",
    "decode",
    "decoder_from_state",
    "generate",
    "generate_batch",
    "generate_stream",
    "llm_config_from_hf",
    "load_bundle_decoder",
    "load_decoder",
    "read_hf_tensors",
    "read_llm_config",
    "stream",
]
