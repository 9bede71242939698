"""Streaming quantization of a sharded LLaMA checkpoint: the output, its atomicity, and its peak
memory.

How the peak is measured: quantize_checkpoint runs in a fresh subprocess; after a warm-up run on
a small checkpoint (so lazy imports and allocator pools are already in place), the kernel's
peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), and the rise of VmHWM over VmRSS
before the run is the peak. Sources are read with plain reads (no mmap), so RSS counts only
memory the process allocated; the page cache is not in it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rgpt_rt.bundle import LLM_FILE
from rgpt_rt.quant import load_int4_checkpoint, quantize_checkpoint, quantize_rtn

LINEARS = {  # name: (out, in) as multiples of (hidden, intermediate)
    "self_attn.q_proj": ("h", "h"),
    "self_attn.k_proj": ("h", "h"),
    "self_attn.v_proj": ("h", "h"),
    "self_attn.o_proj": ("h", "h"),
    "mlp.gate_proj": ("i", "h"),
    "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}


def write_llama(
    folder: Path,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    shards: int,
    dtype=torch.float16,
) -> int:
    """A random LLaMA checkpoint as transformers shards it; returns its size in bytes."""
    folder.mkdir(parents=True)
    sizes = {"h": hidden, "i": intermediate}
    names = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, (out_dim, in_dim) in LINEARS.items():
            names[prefix + name + ".weight"] = (sizes[out_dim], sizes[in_dim])
        names[prefix + "input_layernorm.weight"] = (hidden,)
        names[prefix + "post_attention_layernorm.weight"] = (hidden,)
    names["model.norm.weight"] = (hidden,)
    names["lm_head.weight"] = (vocab, hidden)
    config = {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "vocab_size": vocab, "num_attention_heads": 4,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    keys = list(names)
    weight_map, total = {}, 0
    for shard in range(shards):
        part = keys[shard * len(keys) // shards : (shard + 1) * len(keys) // shards]
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {key: (torch.randn(names[key]) * 0.05).to(dtype) for key in part}
        save_file(tensors, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_quantize_checkpoint_output(tmp_path, monkeypatch):
    from rgpt_rt.quant import checkpoint as checkpoint_module

    # blocks of 48 rows (3 tiles of 16): 256 and 384 rows take several, 256 a partial last one
    monkeypatch.setattr(checkpoint_module, "ROWS_PER_BLOCK", 48)
    write_llama(
        tmp_path / "src",
        hidden=256,
        intermediate=384,
        layers=2,
        vocab=300,
        shards=2,
        dtype=torch.bfloat16,
    )
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "dst", group_size=128)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", LLM_FILE]
    checkpoint = load_int4_checkpoint(out)
    assert len(checkpoint.int4) == 2 * len(LINEARS)
    assert set(checkpoint.tensors) == {
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        *(f"model.layers.{i}.{n}_layernorm.weight" for i in range(2) for n in ("input", "post_attention")),
    }  # fmt: skip
    assert all(t.dtype == torch.float16 for t in checkpoint.tensors.values())
    assert checkpoint.config["rgpt_quantization"]["layout"] == "n16k64"
    assert checkpoint.config["rgpt_quantization"]["format_version"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "src" / "model-00002-of-00002.safetensors"), "pt") as handle:
        down = handle.get_tensor("model.layers.1.mlp.down_proj.weight")
    q = checkpoint.int4["model.layers.1.mlp.down_proj"]
    expected = quantize_rtn(down, 128)  # streaming (blocks of rows) gives what one call gives
    assert q.shape == (256, 384)
    for field in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(q, field), getattr(expected, field))


def test_a_failed_quantization_leaves_nothing(tmp_path):
    write_llama(tmp_path / "src", hidden=256, intermediate=384, layers=2, vocab=300, shards=2)
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])  # truncated inside its last tensor
    with pytest.raises(ValueError, match="truncated"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ValueError, match="not a multiple of group_size 384"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst", group_size=384)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    import torch
    from rgpt_rt.quant import quantize_checkpoint

    torch.set_num_threads(1)  # as the other quantizer tests (tests/quant/conftest.py)

    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    small, big, out = (Path(p) for p in sys.argv[1:4])
    quantize_checkpoint(small, out / "warmup")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
    before = status("VmRSS")
    quantize_checkpoint(big, out / "big")
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


@pytest.mark.slow
def test_streaming_peak_memory_is_about_one_layer(tmp_path):
    hidden, intermediate, layers = 768, 2048, 8
    model_bytes = write_llama(tmp_path / "big", hidden, intermediate, layers, vocab=4096, shards=3)
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    write_llama(tmp_path / "small", 256, 384, 1, vocab=300, shards=1)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure the peak RSS")
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "small"), str(tmp_path / "big"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak = measured["peak"] - measured["before"]
    print(
        f"model {model_bytes / 2**20:.0f} MiB, one layer {layer_bytes / 2**20:.1f} MiB fp16, peak rise {peak / 2**20:.1f} MiB"
    )
    # about one layer: its biggest tensor, fp32 temporaries of a block of rows, and malloc slack
    assert peak < 2 * layer_bytes
    assert peak < model_bytes / 4  # and never the model
    assert load_int4_checkpoint(tmp_path / "big").int4  # and the output is there
