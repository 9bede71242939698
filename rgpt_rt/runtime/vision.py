"""Vision backends: pixels -> (global image embeddings, hi-res map), what vision.onnx computes.

    backend = select_vision_backend(bundle_folder, manifest, device)     # best available
    image_embeds, hires = backend(pixel_values)   # [B,3,S,S] -> [B,g²,D], [B,4g,4g,C]

On a GPU: a TensorRT engine built for this card -> ONNX Runtime's CUDA provider -> torch fp16
under a CUDA graph. On a CPU: ONNX Runtime -> torch. ONNX Runtime's CPU provider is never used
for a GPU session. The torch backend is a lean CLIP ViT written here (no transformers), fed by
vision.safetensors; the tests hold it to the reference model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rgpt_rt.config import RGPTConfig


class VisionBackend:
    """pixels [B, 3, S, S] float32 -> (image_embeds [B, g², D], hires [B, 4g, 4g, C]) on `device`."""

    name = "abstract"

    def __init__(self, config: RGPTConfig, device: torch.device):
        self.config = config
        self.device = device

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


# --- ONNX Runtime ----------------------------------------------------------------------------------


class OnnxRuntimeVision(VisionBackend):
    def __init__(self, config: RGPTConfig, device: torch.device, onnx_path: Path):
        super().__init__(config, device)
        import onnxruntime as ort

        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"ONNX Runtime has no {provider} here")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if device.type == "cpu":
            # Share the cores with torch, which runs every other stage: the same thread count,
            # and threads that sleep between runs instead of spinning (spinning ONNX Runtime
            # threads slowed the decoder that runs right after the vision stage several-fold).
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_options = [{"device_id": device.index or 0}] if device.type == "cuda" else [{}]
        self.session = ort.InferenceSession(
            str(onnx_path),
            sess_options=options,
            providers=[provider],
            provider_options=provider_options,
        )
        self.name = f"onnxruntime-{'cuda' if device.type == 'cuda' else 'cpu'}"

    def __call__(self, pixel_values):
        image_embeds, hires = self.session.run(
            ["image_embeds", "hires"], {"pixel_values": pixel_values.float().cpu().numpy()}
        )
        return torch.from_numpy(image_embeds).to(self.device), torch.from_numpy(hires).to(
            self.device
        )


# --- TensorRT --------------------------------------------------------------------------------------


class TensorRTVision(VisionBackend):
    """A serialised engine from export/build_engine.py (TensorRT 10 Python API)."""

    name = "tensorrt"

    def __init__(self, config: RGPTConfig, device: torch.device, engine_path: Path):
        super().__init__(config, device)
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT could not load {engine_path.name}; rebuild it on this device"
            )
        self.context = self.engine.create_execution_context()

    def __call__(self, pixel_values):
        pixels = pixel_values.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape("pixel_values", tuple(pixels.shape))
        outputs = {}
        for name in ("image_embeds", "hires"):
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.context.set_tensor_address("pixel_values", pixels.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the vision engine")
        return outputs["image_embeds"], outputs["hires"]


# --- torch (lean CLIP, no transformers) ------------------------------------------------------------


class TorchVision(VisionBackend):
    """CLIP ViT + refinement + patch merge + connector, written with torch functions over the
    weights of vision.safetensors and connector.safetensors. On CUDA it runs in fp16 and, for
    each batch size, replays a captured CUDA graph."""

    name = "torch"

    def __init__(
        self, config: RGPTConfig, device: torch.device, weights: dict[str, torch.Tensor], dtype=None
    ):
        """weights: clip.*, refinement.* (vision.safetensors) and connector.* tensors."""
        super().__init__(config, device)
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        self.weights = {k: v.to(device=device, dtype=self.dtype) for k, v in weights.items()}
        self._graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self.name = "torch-cuda-graph" if device.type == "cuda" else "torch"

    @classmethod
    def from_files(
        cls, config: RGPTConfig, device: torch.device, vision_path: Path, connector_path: Path
    ) -> TorchVision:
        weights = load_file(str(vision_path))
        weights.update({f"connector.{k}": v for k, v in load_file(str(connector_path)).items()})
        return cls(config, device, weights)

    def __call__(self, pixel_values):
        pixels = pixel_values.to(self.device, self.dtype)
        if self.device.type != "cuda":
            with torch.inference_mode():
                return self.forward(pixels)
        batch = pixels.shape[0]
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch)
        graph, static_in, static_out = self._graphs[batch]
        static_in.copy_(pixels)
        graph.replay()
        return static_out[0].clone(), static_out[1].clone()

    def _capture(self, batch: int):
        size = self.config.vision.image_size
        static_in = torch.zeros(batch, 3, size, size, device=self.device, dtype=self.dtype)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph (cuBLAS handles, autotuning)
                self.forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.forward(static_in)
        return graph, static_in, static_out

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, w = self.config.vision, self.weights
        batch, grid, channels, heads = pixels.shape[0], cfg.grid, cfg.hidden_size, cfg.num_heads
        x = F.conv2d(
            pixels, w["clip.embeddings.patch_embedding.weight"], stride=cfg.patch_size
        )  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g², C]
        cls = w["clip.embeddings.class_embedding"].expand(batch, 1, channels)
        x = (
            torch.cat([cls, x], dim=1) + w["clip.embeddings.position_embedding.weight"][None]
        )  # [B, 1+g², C]
        x = _layer_norm(x, w, "clip.pre_layrnorm", cfg.layer_norm_eps)
        for i in range(cfg.layers_used):
            p = f"clip.encoder.layers.{i}"
            h = _layer_norm(x, w, f"{p}.layer_norm1", cfg.layer_norm_eps)
            q, k, v = (_linear(h, w, f"{p}.self_attn.{n}_proj") for n in "qkv")
            q, k, v = (
                t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)
            )  # [B, heads, T, hd]
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, T, C]
            x = x + _linear(attn, w, f"{p}.self_attn.out_proj")
            h = _layer_norm(x, w, f"{p}.layer_norm2", cfg.layer_norm_eps)
            h = _activation(_linear(h, w, f"{p}.mlp.fc1"), cfg.hidden_act)
            x = x + _linear(h, w, f"{p}.mlp.fc2")
        patches = x[:, 1:].reshape(batch, grid, grid, channels)  # [B, g, g, C]
        hires = refine(patches, w, self.config.refinement.layer_norm_eps)  # [B, 4g, 4g, C]
        merged = (
            F.adaptive_avg_pool2d(hires.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)
        )  # [B, g², C]
        return connect(merged, w), hires


def refine(patches: torch.Tensor, w: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """ConvT(2, s2) - LayerNorm2d - GELU - ConvT(2, s2) - GELU: [B, g, g, C] -> [B, 4g, 4g, C]."""
    x = patches.permute(0, 3, 1, 2)
    x = F.conv_transpose2d(x, w["refinement.up1.weight"], w["refinement.up1.bias"], stride=2)
    x = x.permute(0, 2, 3, 1)
    x = F.gelu(
        F.layer_norm(x, (x.shape[-1],), w["refinement.norm.weight"], w["refinement.norm.bias"], eps)
    )
    x = F.conv_transpose2d(
        x.permute(0, 3, 1, 2), w["refinement.up2.weight"], w["refinement.up2.bias"], stride=2
    )
    return F.gelu(x).permute(0, 2, 3, 1).contiguous()


def connect(features: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mlp2x_gelu connector: [..., C] -> [..., D]."""
    return _linear(F.gelu(_linear(features, w, "connector.fc1")), w, "connector.fc2")


def _linear(x, w, prefix):
    return F.linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias"))


def _layer_norm(x, w, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps)


def _activation(x, name: str):
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"CLIP activation {name!r} is not supported by the torch vision backend")


# --- choosing a backend ----------------------------------------------------------------------------


def select_vision_backend(
    folder: Path, manifest, device: torch.device, prefer: str | None = None
) -> VisionBackend:
    """The fastest backend that works here (see the module docstring). `prefer` forces one:
    "tensorrt", "onnxruntime" or "torch"."""
    config = manifest.config
    candidates = (
        ["tensorrt", "onnxruntime", "torch"] if device.type == "cuda" else ["onnxruntime", "torch"]
    )
    if prefer is not None:
        if prefer not in candidates:
            raise ValueError(
                f"vision backend {prefer!r} is not available on {device.type}; choose from {candidates}"
            )
        candidates = [prefer]
    reasons = []
    for name in candidates:
        try:
            if name == "tensorrt":
                engine = manifest.engine_for(torch.cuda.get_device_name(device))
                if engine is None:
                    raise RuntimeError("the bundle holds no TensorRT engine for this GPU")
                return TensorRTVision(config, device, engine)
            if name == "onnxruntime":
                return OnnxRuntimeVision(config, device, folder / "vision.onnx")
            return TorchVision.from_files(
                config, device, folder / "vision.safetensors", folder / "connector.safetensors"
            )
        except (ImportError, RuntimeError) as error:
            reasons.append(f"{name}: {error}")
    raise RuntimeError("no vision backend works here: " + "; ".join(reasons))
