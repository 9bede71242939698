"""INT4 weight-only quantization (DESIGN.md §2): the format, quantizers, importers, checkpoints.

    format.py      Int4Weight (layout "nk8i"), dequantize, save_int4 / load_int4
    rtn.py         quantize_rtn(w, group_size=128)
    awq.py         quantize_awq(weights, x, ...), fold_into_norm / fold_into_linear
    awq_llama.py   quantize_llama_layer_awq(layer weights, captured inputs): AWQ for a LLaMA layer
    importers.py   from_awq, from_gptq, load_quantized_folder (HF AWQ/GPTQ folders)
    checkpoint.py  quantize_checkpoint (streaming), load_int4_checkpoint, convert_quantized_folder
    linear.py      Int4Linear, quantize_linears, load_int4_linears
The matmul itself is rgpt_rt.ops.int4_linear.
"""

from rgpt_rt.quant.awq import (
    AwqResult,
    AwqScales,
    awq_search_clip,
    awq_search_scales,
    fold_into_linear,
    fold_into_norm,
    quantize_awq,
)
from rgpt_rt.quant.awq_llama import AwqLayer, quantize_llama_layer_awq
from rgpt_rt.quant.checkpoint import (
    INT4_FILE,
    Int4Checkpoint,
    convert_quantized_folder,
    load_int4_checkpoint,
    quantize_checkpoint,
)
from rgpt_rt.quant.format import LAYOUT, Int4Weight, dequantize, load_int4, save_int4
from rgpt_rt.quant.importers import QuantizedFolder, from_awq, from_gptq, load_quantized_folder
from rgpt_rt.quant.linear import Int4Linear, load_int4_linears, quantize_linears
from rgpt_rt.quant.rtn import quantize_rtn

__all__ = [
    "INT4_FILE",
    "LAYOUT",
    "AwqLayer",
    "AwqResult",
    "AwqScales",
    "Int4Checkpoint",
    "Int4Linear",
    "Int4Weight",
    "QuantizedFolder",
    "awq_search_clip",
    "awq_search_scales",
    "convert_quantized_folder",
    "dequantize",
    "fold_into_linear",
    "fold_into_norm",
    "from_awq",
    "from_gptq",
    "load_int4",
    "load_int4_checkpoint",
    "load_int4_linears",
    "load_quantized_folder",
    "quantize_awq",
    "quantize_checkpoint",
    "quantize_linears",
    "quantize_llama_layer_awq",
    "quantize_rtn",
    "save_int4",
]
