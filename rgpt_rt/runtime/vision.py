"""Vision backends: pixels -> (global image embeddings, region features), what vision.onnx computes.

    backend = select_vision_backend(bundle_folder, manifest, device)     # best available
    image_embeds, hires = backend(pixel_values)   # [B,3,S,S] -> [B,g²,D], [B,4g,4g,C]
    image_embeds, levels = backend(pixel_values)  # osprey: [B,1024,D], (res2..res5 [B,H_l,W_l,C_l])

On a GPU: a TensorRT engine built for this card -> ONNX Runtime's CUDA provider -> torch fp16
under a CUDA graph. On a CPU: ONNX Runtime -> torch. ONNX Runtime's CPU provider is never used
for a GPU session. The torch backend is a lean CLIP ViT written here (no transformers), fed by
vision.safetensors and connector.safetensors (fp16; widened to fp32 on a CPU); the tests hold
it to the reference model and to vision.onnx, whose weights are the same two files. For the
osprey family the torch backend is a lean ConvNeXt + projector (no timm) over
vision.safetensors. Linear weights are stored as weight_t [in, out]: y = x @ weight_t + bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from rgpt_rt.bundle import BUILD_ID_KEY
from rgpt_rt.config import RGPTConfig
from rgpt_rt.safetensors_io import read_tensors


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
    def __init__(
        self, config: RGPTConfig, device: torch.device, onnx_path: Path, build_id: str | None = None
    ):
        """build_id: the bundle's; a graph another build wrote is refused (bundle.py)."""
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
        written_by = self.session.get_modelmeta().custom_metadata_map.get(BUILD_ID_KEY)
        if build_id is not None and written_by != build_id:
            raise ValueError(
                f"{onnx_path.name} comes from build {written_by}, not this bundle's {build_id}; "
                "the bundle's files were mixed: rebuild it"
            )
        size = config.vision.image_size
        shape = self.session.get_inputs()[0].shape  # [batch, 3, S, S]
        if list(shape[1:]) != [3, size, size]:
            raise ValueError(
                f"{onnx_path.name} takes images of shape {shape[1:]} but config.json's "
                f"vision.image_size is {size}; the bundle's files disagree: rebuild it"
            )

    def __call__(self, pixel_values):
        names = [output.name for output in self.session.get_outputs()]
        outputs = self.session.run(names, {"pixel_values": pixel_values.float().cpu().numpy()})
        return split_outputs([torch.from_numpy(o).to(self.device) for o in outputs])


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
        self.outputs = [  # image_embeds, then hires (or Osprey's res2..res5), as exported
            name
            for name in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT
        ]

    def __call__(self, pixel_values):
        pixels = pixel_values.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape("pixel_values", tuple(pixels.shape))
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.context.set_tensor_address("pixel_values", pixels.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the vision engine")
        return split_outputs([outputs[name] for name in self.outputs])


def split_outputs(outputs: list[torch.Tensor]):
    """The graph's outputs -> (image_embeds, hires) or, with several region-feature outputs
    (Osprey's res2..res5), (image_embeds, (res2, ..., res5))."""
    first, rest = outputs[0], outputs[1:]
    return first, rest[0] if len(rest) == 1 else tuple(rest)


# --- torch (lean CLIP, no transformers) ------------------------------------------------------------


class Widened(Mapping):
    """Weights kept in their stored dtype, each widened to `dtype` when it is read: a CPU
    computes in fp32 on the bundle's fp16 weights holding one layer's fp32 copy at a time."""

    def __init__(self, weights: dict[str, torch.Tensor], dtype: torch.dtype):
        self.stored, self.dtype = weights, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stored[name].to(self.dtype)  # no copy when the dtypes agree

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


class TorchVision(VisionBackend):
    """CLIP ViT + refinement + patch merge + connector, written with torch functions over the
    weights of vision.safetensors and connector.safetensors. On CUDA it runs in fp16 and, for
    each batch size, replays a captured CUDA graph. On a CPU it computes in fp32 and keeps the
    weights as stored (fp16: half the memory of ONNX Runtime's fp32 copy)."""

    name = "torch"

    def __init__(
        self, config: RGPTConfig, device: torch.device, weights: dict[str, torch.Tensor], dtype=None
    ):
        """weights: clip.*, refinement.* (vision.safetensors) and connector.* tensors, in any
        float dtype; dtype: the compute dtype (default fp16 on CUDA, fp32 on a CPU)."""
        super().__init__(config, device)
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        stored = self.dtype if device.type == "cuda" else None  # CUDA: convert once
        self.weights = Widened(
            {k: v.to(device=device, dtype=stored) for k, v in weights.items()}, self.dtype
        )
        self._graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self.name = "torch-cuda-graph" if device.type == "cuda" else "torch"

    @classmethod
    def from_files(
        cls,
        config: RGPTConfig,
        device: torch.device,
        vision_path: Path,
        connector_path: Path,
        dtype: torch.dtype | None = None,
    ) -> TorchVision:
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        stored = dtype if device.type == "cuda" else None  # a CPU keeps the files' fp16
        weights = read_tensors(vision_path, device, stored)
        connector = read_tensors(connector_path, device, stored)
        weights.update({f"connector.{k}": v for k, v in connector.items()})
        check_vision_weights(config, weights, vision_path)
        return cls(config, device, weights, dtype)

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
        return _cloned(static_out)

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


def _cloned(value):
    """Tensors (nested in tuples) copied out of a CUDA graph's static outputs."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return tuple(_cloned(v) for v in value)


class TorchConvNeXtVision(TorchVision):
    """Osprey's vision side (osprey family): a lean ConvNeXt trunk with timm's weight names
    (no timm) and the mlp2x_gelu projector, over vision.safetensors (convnext.*, projector.*).
    pixels [B, 3, S, S] -> (image_embeds [B, g², D], (res2..res5, each [B, H_l, W_l, C_l]))."""

    @classmethod
    def from_files(cls, config, device, vision_path, connector_path=None, dtype=None):
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        stored = dtype if device.type == "cuda" else None  # a CPU keeps the file's fp16
        weights = read_tensors(vision_path, device, stored)
        check_convnext_weights(config, weights, vision_path)
        return cls(config, device, weights, dtype)

    def forward(self, pixels: torch.Tensor):
        cfg, w = self.config.convnext, self.weights
        eps = cfg.layer_norm_eps
        x = F.conv2d(pixels, w["convnext.stem.0.weight"], w["convnext.stem.0.bias"], stride=4)
        x = _channel_norm(x, w, "convnext.stem.1", eps)  # [B, C_0, S/4, S/4]
        levels = []
        for i, depth in enumerate(cfg.depths):
            p = f"convnext.stages.{i}"
            if i > 0:
                x = _channel_norm(x, w, f"{p}.downsample.0", eps)
                x = F.conv2d(
                    x, w[f"{p}.downsample.1.weight"], w[f"{p}.downsample.1.bias"], stride=2
                )
            for j in range(depth):
                b = f"{p}.blocks.{j}"
                channels = x.shape[1]
                y = F.conv2d(
                    x, w[f"{b}.conv_dw.weight"], w[f"{b}.conv_dw.bias"], padding=3, groups=channels
                )
                y = y.permute(0, 2, 3, 1)  # [B, H, W, C]
                y = _layer_norm(y, w, f"{b}.norm", eps)
                y = _linear(F.gelu(_linear(y, w, f"{b}.mlp.fc1")), w, f"{b}.mlp.fc2")
                x = x + (y * w[f"{b}.gamma"]).permute(0, 3, 1, 2)
            levels.append(x.permute(0, 2, 3, 1).contiguous())  # channels last, for mask pooling
        image = levels[self.config.mask_extractor.image_level]  # [B, g, g, C]
        tokens = image.flatten(1, 2)  # [B, g², C]
        embeds = _linear(F.gelu(_linear(tokens, w, "projector.0")), w, "projector.2")
        return embeds, tuple(levels)


def _channel_norm(x, w, prefix, eps):
    """LayerNorm over the channels of an NCHW map (timm's LayerNorm2d)."""
    return _layer_norm(x.permute(0, 2, 3, 1), w, prefix, eps).permute(0, 3, 1, 2)


def check_convnext_weights(config: RGPTConfig, w: dict[str, torch.Tensor], where: Path) -> None:
    """vision.safetensors holds the trunk and projector config.json implies."""
    cfg, hidden = config.convnext, config.llm.hidden_size
    last = cfg.depths[3] - 1
    expected = {
        "convnext.stem.0.weight": (cfg.dims[0], 3, 4, 4),
        f"convnext.stages.3.blocks.{last}.mlp.fc1.weight_t": (
            cfg.dims[3],
            cfg.mlp_ratio * cfg.dims[3],
        ),
        "projector.0.weight_t": (config.vision.hidden_size, hidden),
        "projector.2.weight_t": (hidden, hidden),
    }
    for name, shape in expected.items():
        got = tuple(w[name].shape) if name in w else None
        if got != shape:
            raise ValueError(
                f"{where.parent.name}: config.json implies {name} {list(shape)} but "
                f"{where.name} holds {list(got) if got else 'no such tensor'}"
            )


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


def check_vision_weights(config: RGPTConfig, w: dict[str, torch.Tensor], where: Path) -> None:
    """The weights have the shapes config.json implies; an error names both files."""
    cfg, hidden = config.vision, config.llm.hidden_size
    C, p, g = cfg.hidden_size, cfg.patch_size, cfg.grid
    expected = {
        "clip.embeddings.patch_embedding.weight": (C, 3, p, p),
        "clip.embeddings.position_embedding.weight": (g * g + 1, C),
        f"clip.encoder.layers.{cfg.layers_used - 1}.mlp.fc1.weight_t": (C, cfg.intermediate_size),
        "refinement.up1.weight": (C, C, 2, 2),
        "connector.fc1.weight_t": (C, hidden),
        "connector.fc2.weight_t": (hidden, hidden),
    }
    for name, shape in expected.items():
        got = tuple(w[name].shape) if name in w else None
        if got != shape:
            raise ValueError(
                f"{where.parent.name}: config.json implies {name} {list(shape)} but "
                f"{where.name} / connector.safetensors hold {list(got) if got else 'no such tensor'}"
            )


def _linear(x, w, prefix):
    y = torch.matmul(x, w[f"{prefix}.weight_t"])  # [..., in] @ [in, out]
    bias = w.get(f"{prefix}.bias")
    return y if bias is None else y + bias


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
# On a CPU, ONNX Runtime folds the graph's casts into fp32 weights (twice the file) and is the
# faster of the two (tiny: 1.5 ms against 2.3 ms); past this size of vision weights memory
# matters more, and the torch backend, which keeps them in fp16, goes first (CLIP-L: 0.6 GB
# held instead of 1.35 GB, for ~0.5 s more per image on 2 cores).
ONNXRUNTIME_CPU_LIMIT = 256 << 20


def vision_bytes(manifest) -> int:
    files = manifest.files
    return files["vision.safetensors"]["bytes"] + files["connector.safetensors"]["bytes"]


def torch_backend(config: RGPTConfig) -> type[TorchVision]:
    """The lean torch backend of the config's model family."""
    return TorchConvNeXtVision if config.family == "osprey" else TorchVision


def select_vision_backend(
    folder: Path, manifest, device: torch.device, prefer: str | None = None
) -> VisionBackend:
    """The fastest backend that works here (see the module docstring). `prefer` forces one:
    "tensorrt", "onnxruntime" or "torch"."""
    config = manifest.config
    if device.type == "cuda":
        candidates = ["tensorrt", "onnxruntime", "torch"]
    elif vision_bytes(manifest) <= ONNXRUNTIME_CPU_LIMIT:
        candidates = ["onnxruntime", "torch"]
    else:  # ONNX Runtime would hold the weights in fp32: the torch backend keeps them in fp16
        candidates = ["torch", "onnxruntime"]
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
                build_id = manifest.data.get("build_id")
                return OnnxRuntimeVision(config, device, folder / "vision.onnx", build_id)
            return torch_backend(config).from_files(
                config, device, folder / "vision.safetensors", folder / "connector.safetensors"
            )
        except (ImportError, RuntimeError) as error:
            reasons.append(f"{name}: {error}")
        except ValueError:
            raise  # the bundle's files disagree: no other backend would fix that
    raise RuntimeError("no vision backend works here: " + "; ".join(reasons))
