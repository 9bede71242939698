"""A tiny random Vicuna-like folder (LLaMA weights + the default tokenizer), as a user's local
--llm folder would be, for the tests of RGPT.from_components and of fine-tuning on COCO."""

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from rgpt_rt.tokenizer import default_tokenizer


def write_tiny_llama(folder: Path) -> Path:
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
    LlamaForCausalLM(llama).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
