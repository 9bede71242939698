// The one binding table of rgpt_rt._C. Each kernel family exposes plain functions over
// raw pointers, sizes and dtype tags (see its header); this file only names them for Python.
// Validation, allocation and the torch.library registration live in rgpt_rt/ops/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"
#include "decode/decode.h"
#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "mask_pool/mask_pool_host.h"
#ifdef RGPT_WITH_CUDA
#include "device/device.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rgpt_rt kernels (C++ always, CUDA when built with nvcc)";
  m.def("build_info", &rgpt::build_info_dict,
        "What this build holds: {'cuda': bool, 'cuda_architectures': [...], 'cxx_compiler': str, ...}");
  // INT4 (csrc/int4): pointers are integers (tensor.data_ptr()); see int4.h for the contracts.
  m.def("int4_linear_cpu", &rgpt::int4_linear_cpu_entry, py::call_guard<py::gil_scoped_release>(),
        "out[M,N] = x[M,K] @ W^T + bias (float32), W INT4 layout nk8i",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_dequant_cpu", &rgpt::int4_dequant_cpu_entry, py::call_guard<py::gil_scoped_release>(),
        "Dequantize W [N, K] into `out` (float32), for the CPU prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_cpu_has_simd", &rgpt::int4_cpu_has_simd, "Whether the AVX2+FMA+F16C CPU path runs here");
  // INT4 layout n16k64 (csrc/int4/int4_n16k64.h): W = (q - z)·s exactly; tiles of 16 rows × 64 inputs
  m.def("int4_linear_n16k64_cpu", &rgpt::int4_linear_n16k64_cpu_entry,
        py::call_guard<py::gil_scoped_release>(),
        "out[M,N] = x[M,K] @ W^T + bias (float32), W INT4 layout n16k64",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_dequant_n16k64_cpu", &rgpt::int4_dequant_n16k64_cpu_entry,
        py::call_guard<py::gil_scoped_release>(),
        "Rows [row_begin, row_end) of W (layout n16k64) into `out` float32 [rows, K], exactly",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("row_begin"), py::arg("row_end"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_gemm_n16k64_cpu", &rgpt::int4_gemm_n16k64_cpu_entry,
        py::call_guard<py::gil_scoped_release>(),
        "out[M,N] = x[M,K] @ W^T + bias (float32), W INT4 layout n16k64: the CPU GEMM (prefill rows)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_gemm_n16k64_splits", &rgpt::int4_gemm_n16k64_splits,
        "Split-K factor for the n16k64 CUDA GEMM (M rows) on a device with this many SMs",
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("multiprocessors"));
  m.def("int4_gemm_n16k64_counter_bytes", &rgpt::int4_gemm_n16k64_counter_bytes,
        "Bytes of the n16k64 GEMM's split-K counters for N outputs (zero them once, reuse them)",
        py::arg("n"));
  m.def("int4_gemm_n16k64_partial_bytes", &rgpt::int4_gemm_n16k64_partial_bytes,
        "Bytes of the n16k64 GEMM's fp32 split-K partial sums (0 without split-K)", py::arg("m"),
        py::arg("n"), py::arg("splits"));
  m.def("int4_gemv_n16k64_splits", &rgpt::int4_gemv_n16k64_splits,
        "Split-K factor for the n16k64 GEMV on a device with this many SMs", py::arg("n"),
        py::arg("k"), py::arg("multiprocessors"));
  m.def("int4_gemv_n16k64_workspace_bytes", &rgpt::int4_gemv_n16k64_workspace_bytes,
        "Workspace bytes of the n16k64 GEMV (0 without split-K); zero it once, reuse it",
        py::arg("m"), py::arg("n"), py::arg("splits"));

  // mask pooling (csrc/mask_pool/, rgpt_rt/ops/mask_pool.py)
  m.def("mask_pool_workspace_bytes", &rgpt::mask_pool::workspace_bytes, py::kw_only(),
        py::arg("features_dtype"), py::arg("features_shape"), py::arg("masks_shape"),
        py::arg("mode"), py::arg("device"), py::arg("device_index"), py::arg("num_threads"),
        "Bytes of scratch memory mask_pool needs for these shapes on this device");
  m.def("mask_pool", &rgpt::mask_pool::run, py::kw_only(), py::arg("features"),
        py::arg("features_dtype"), py::arg("features_shape"), py::arg("masks"),
        py::arg("masks_dtype"), py::arg("masks_shape"), py::arg("batch_index"), py::arg("mode"),
        py::arg("out"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
        py::arg("device_index"), py::arg("stream"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "out[N, C] = mask-weighted means of features[B, H, W, C] (pointers as integers)");
  m.def("mask_pool_levels_workspace_bytes", &rgpt::mask_pool::levels_workspace_bytes,
        py::kw_only(), py::arg("features_dtype"), py::arg("features_shapes"),
        py::arg("masks_shape"), py::arg("mode"), py::arg("device"), py::arg("device_index"),
        py::arg("num_threads"),
        "Bytes of scratch memory mask_pool_levels needs for these shapes on this device");
  m.def("mask_pool_levels", &rgpt::mask_pool::run_levels, py::kw_only(), py::arg("features"),
        py::arg("features_dtype"), py::arg("features_shapes"), py::arg("masks"),
        py::arg("masks_dtype"), py::arg("masks_shape"), py::arg("batch_index"), py::arg("mode"),
        py::arg("out"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
        py::arg("device_index"), py::arg("stream"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "out[N, sum C_k] = mask-weighted means of 1-4 feature levels [B, H_k, W_k, C_k] in one "
        "call (pointers as integers)");
  // the fused decode step (csrc/decode/, rgpt_rt/ops/decode.py): C++ twin or CUDA kernel by `cuda`
  m.def("decode_add_rms_norm", &rgpt::decode::add_rms_norm_entry,
        py::call_guard<py::gil_scoped_release>(),
        "residual_out = x + residual (null: x); out = rms_norm(residual_out) * weight, [rows, dim]",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"),
        py::arg("residual_out"), py::arg("rows"), py::arg("dim"), py::arg("eps"), py::arg("dtype"),
        py::arg("cuda"), py::arg("stream"));
  m.def("decode_rope_kv_append", &rgpt::decode::rope_kv_append_entry,
        py::call_guard<py::gil_scoped_release>(),
        "Rotate q and k of qkv [tokens, row_stride] in place; write k and v into the caches "
        "[B, Hkv, max_len, hd] at positions[tokens]",
        py::arg("qkv"), py::arg("row_stride"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("positions"), py::arg("cos"), py::arg("signed_sin"), py::arg("tokens"),
        py::arg("tokens_per_row"), py::arg("batch"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_len"), py::arg("table_len"),
        py::arg("dtype"), py::arg("cache_dtype"), py::arg("cuda"), py::arg("stream"),
        py::arg("use_simd") = true);
  m.def("decode_attention", &rgpt::decode::decode_attention_entry,
        py::call_guard<py::gil_scoped_release>(),
        "out [B, H*hd] = attention of q [B, H, hd] over each row's slots 0..positions[b]",
        py::arg("q"), py::arg("q_row_stride"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("positions"), py::arg("out"), py::arg("batch"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_len"), py::arg("scale"),
        py::arg("dtype"), py::arg("cache_dtype"), py::arg("splits"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("cuda"), py::arg("stream"), py::arg("num_threads"),
        py::arg("use_simd") = true);
  m.def("decode_silu_mul", &rgpt::decode::silu_mul_entry, py::call_guard<py::gil_scoped_release>(),
        "out [rows, inner] = silu(gate_up[:, :inner]) * gate_up[:, inner:]", py::arg("gate_up"),
        py::arg("out"), py::arg("rows"), py::arg("inner"), py::arg("dtype"), py::arg("cuda"),
        py::arg("stream"), py::arg("use_simd") = true);
  m.def("decode_attention_splits", &rgpt::decode::decode_attention_splits,
        "CUDA blocks per (row, kv head) of decode_attention for B*Hkv pairs on this many SMs",
        py::arg("batch_heads"), py::arg("max_len"), py::arg("multiprocessors"));
  m.def("decode_attention_workspace_bytes", &rgpt::decode::decode_attention_workspace_bytes,
        "Workspace bytes of decode_attention with `splits` > 1 (0 for 1); zero it once, reuse it",
        py::arg("batch"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("splits"));
  m.def("decode_attention_cuda_supports", &rgpt::decode::decode_attention_cuda_supports,
        "Whether the CUDA decode_attention kernel takes these heads, head_dim and dtype tags",
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype"),
        py::arg("cache_dtype"));
  m.def("decode_cpu_has_simd", &rgpt::decode::decode_cpu_has_simd,
        "Whether the decode twins' AVX2+FMA+F16C CPU paths run here");
#ifdef RGPT_WITH_CUDA
  m.def("int4_gemv_cuda", &rgpt::int4_gemv_cuda_entry,
        "GEMV for 1..8 rows of x on `stream`; split-K when splits > 1 (fp32 workspace [splits, M, N])",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("partial"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_dequant_cuda", &rgpt::int4_dequant_cuda_entry,
        "Dequantize W [N, K] into `out` (dtype) on `stream`, for the prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_gemv_n16k64_cuda", &rgpt::int4_gemv_n16k64_cuda_entry,
        "GEMV for 1..8 rows of x, W INT4 layout n16k64, on `stream`; split-K (splits > 1) in one "
        "kernel through `workspace` (int4_gemv_n16k64_workspace_bytes, zeroed once)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("workspace"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_dequant_n16k64_cuda", &rgpt::int4_dequant_n16k64_cuda_entry,
        "Dequantize W [N, K] (layout n16k64) into `out` (dtype) on `stream`, for the prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_gemm_n16k64_cuda", &rgpt::int4_gemm_n16k64_cuda_entry,
        "GEMM for prefill rows of x (fp16/bf16), W INT4 layout n16k64 read straight into "
        "tensor-core fragments, on `stream`; split-K (splits > 1) through `counters` and `partial`",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("counters"), py::arg("partial"), py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
  m.def("cuda_runtime_info", &rgpt::cuda_runtime_info,
        "The linked CUDA runtime version, the driver version, and the visible devices");
#endif
}
