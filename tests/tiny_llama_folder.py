"""A tiny random Vicuna-like folder (LLaMA weights + the default tokenizer), as a user's local
--llm folder would be, for the tests of RGPT.from_components and of fine-tuning on COCO."""

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from rgpt_rt.tokenizer import default_tokenizer


def write_tiny_llama(folder: Path, max_shard_size: str | None = None) -> Path:
    """max_shard_size (e.g. '60KB'): shards and an index, as large checkpoints come."""
    tokenizer = default_tokenizer(vocab_size=400)
    llama = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    LlamaForCausalLM(llama).save_pretrained(folder, **options)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
