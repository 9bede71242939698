"""The reference for the runtime decoder tests: tiny random LLaMA models built by transformers,
one per variant the decoder must match (MHA, GQA, rope scaling linear / dynamic / llama3, tied
embeddings), transformers' greedy generate, and the error measure."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

VOCAB = 256
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # Larger than HF's 0.02 so that logits are peaked (fewer near-ties between top tokens).
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 32 positions: the 16-dim heads then have high, medium and low frequencies alike.
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3": dict(rope_scaling=LLAMA3),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
}


def hf_config(variant: str, **overrides) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **VARIANTS[variant], **overrides})


def build_hf(variant: str, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config(variant, **overrides)).eval()


def hf_greedy(
    model: LlamaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, **kwargs
) -> list[int]:
    """transformers' greedy generate: the new tokens of one [1, T] prompt."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return out[0, input_ids.shape[1] :].tolist()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


# Text with characters of 2, 3 and 4 UTF-8 bytes, for tokenizers whose tokens split characters.
MULTIBYTE_TEXT = "Hello 世界! 🙂🎉 café — naïve 日本語のテキスト, ünïcödé ✓ 🚀🌍 and plain words."


def byte_level_tokenizer():
    """A byte-level BPE (rgpt_rt's own kind) trained so small that emoji and CJK characters
    span several tokens."""
    from rgpt_rt.tokenizer import train_tokenizer

    return train_tokenizer([MULTIBYTE_TEXT] * 8, vocab_size=300)


def byte_fallback_tokenizer():
    """A LLaMA-style tokenizer: Metaspace pieces with byte fallback (<0xE4> ...) for characters
    not in the vocabulary, and LLaMA's decoder (▁ -> space, fuse bytes, strip one leading space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁Hello", "▁caf", "é", "▁and", "▁plain", "▁words", ".", "!", ",", "世"]
    vocab = [(p, 0.0 if i < 259 else -float(i)) for i, p in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tokenizer
