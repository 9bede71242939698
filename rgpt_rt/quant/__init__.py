"""INT4 quantisation, the offline tools (the runtime never imports this package):

    rtn.py         quantize_rtn(w, group_size=128)
    awq.py         quantize_awq(weights, x, ...), fold_into_norm / fold_into_linear
    awq_llama.py   quantize_llama_layer_awq(layer weights, captured inputs): AWQ for a LLaMA layer
    importers.py   from_awq, from_gptq, load_quantized_folder (HF AWQ/GPTQ folders)
    checkpoint.py  quantize_checkpoint (streaming), load_int4_checkpoint, convert_quantized_folder
    linear.py      quantize_linears, load_int4_linears (swap a model's nn.Linear layers in place)

Each produces plain codes [N, K], fp16 scales and zeros [N, K/G] and packs them into the format
the kernels read (Int4Weight.pack: layout "n16k64", format version 2, w = (q − z)·s exactly;
save_int4 / load_int4), which lives in rgpt_rt/ops/int4_format.py (the bit layout itself in
int4_layout.py); the module that runs it is rgpt_rt/runtime/int4_linear.py.
Names below are imported from their modules on first use, so `import rgpt_rt.quant` stays cheap.
"""

from importlib import import_module

_WHERE = {
    "quantize_rtn": "rtn",
    "AwqResult": "awq",
    "AwqScales": "awq",
    "awq_search_clip": "awq",
    "awq_search_scales": "awq",
    "fold_into_linear": "awq",
    "fold_into_norm": "awq",
    "quantize_awq": "awq",
    "AwqLayer": "awq_llama",
    "quantize_llama_layer_awq": "awq_llama",
    "Int4Checkpoint": "checkpoint",
    "convert_quantized_folder": "checkpoint",
    "load_int4_checkpoint": "checkpoint",
    "quantize_checkpoint": "checkpoint",
    "QuantizedFolder": "importers",
    "from_awq": "importers",
    "from_gptq": "importers",
    "load_quantized_folder": "importers",
    "load_int4_linears": "linear",
    "quantize_linears": "linear",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rgpt_rt.quant' has no attribute {name!r}")
    return getattr(import_module(f"rgpt_rt.quant.{_WHERE[name]}"), name)
