"""Checkpoint -> verified bundle, step by step (the logic behind `python export/build_engine.py`).

    summary = build_bundle(BuildOptions(out=Path("build/bundles/tiny")))
    report = check_bundle(Path("build/bundles/tiny"))      # hashes + ONNX parity on fresh inputs

The bundle is assembled in a temporary folder beside --out and renamed into place when every
step has passed, so an interrupted build leaves the previous bundle (or none), never half of one.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.bundle import BundleError, verify_bundle, write_manifest
from rgpt_rt.export import onnx_vision, tensorrt_engine
from rgpt_rt.export.llm import QUANT_METHODS, resolve_group_size, write_llm

DEFAULT_OUT = Path("build/bundles/tiny")
TRT_MODES = ("auto", "on", "off")


@dataclass
class BuildOptions:
    out: Path = DEFAULT_OUT
    checkpoint: Path | None = (
        None  # an RGPT.save_pretrained folder; None: the embedded default model
    )
    clip: Path | None = None
    llm: Path | None = None
    rgpt_weights: Path | None = (
        None  # refinement + connector weights (rgpt.safetensors) for --clip/--llm
    )
    quant: str = "rtn"
    group_size: int | None = (
        None  # None: 128 when it divides every linear's input width, else 64/32/16
    )
    calib: Path | None = None
    trt: str = "auto"
    max_batch: int = 8
    workspace_gb: float = 4.0
    seed: int = 1234
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.quant not in QUANT_METHODS:
            raise ValueError(f"--quant {self.quant!r} is unknown; use one of {QUANT_METHODS}")
        if self.trt not in TRT_MODES:
            raise ValueError(f"--trt {self.trt!r} is unknown; use one of {TRT_MODES}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1; got {self.max_batch}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"--group-size must be positive; got {self.group_size}")
        if (self.clip is None) != (self.llm is None):
            raise ValueError("--clip and --llm go together: give both folders, or --checkpoint")
        if self.checkpoint is not None and self.clip is not None:
            raise ValueError("give either --checkpoint or --clip/--llm, not both")
        if self.rgpt_weights is not None and self.clip is None:
            raise ValueError("--rgpt-weights goes with --clip/--llm")


@dataclass
class StepLog:
    """Progress per step and the seconds each took."""

    log: Callable[[str], None]
    total: int
    seconds: dict[str, float] = field(default_factory=dict)
    _index: int = 0

    def run(self, name: str, action: Callable[[], Any]) -> Any:
        self._index += 1
        self.log(f"[{self._index}/{self.total}] {name} ...")
        start = time.perf_counter()
        result = action()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.log(f"[{self._index}/{self.total}] {name}: done in {self.seconds[name]:.1f} s")
        return result


# --- checks before any long work -------------------------------------------------------------


def check_sources(options: BuildOptions) -> None:
    """Fail fast on bad folders: missing files, not a CLIP model, disagreeing sizes, an output
    path that is a file, TensorRT demanded but absent."""
    if options.out.exists() and not options.out.is_dir():
        raise ValueError(f"--out {options.out} is a file; give a folder path for the bundle")
    if options.trt == "on" and tensorrt_engine.tensorrt_status() == tensorrt_engine.NOT_INSTALLED:
        raise ValueError(
            "--trt on but TensorRT is not installed; install it, or use --trt auto / off"
        )
    if options.checkpoint is not None:
        from rgpt_rt.model.rgpt import CHECKPOINT_FILES

        folder = options.checkpoint
        if not folder.is_dir():
            raise FileNotFoundError(f"--checkpoint {folder} does not exist")
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--checkpoint {folder} is missing {', '.join(missing)}; is the save complete?"
            )
    if options.clip is not None:
        from rgpt_rt.model.llm import read_llama_config
        from rgpt_rt.model.vision import read_clip_vision_config

        for flag, folder in (("--clip", options.clip), ("--llm", options.llm)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{flag} {folder} does not exist")
        vision = read_clip_vision_config(options.clip)
        llm = read_llama_config(options.llm)
        if options.rgpt_weights is not None:
            check_rgpt_weights(options.rgpt_weights, vision.hidden_size, llm.hidden_size)
    if options.calib is not None and not options.calib.is_file():
        raise FileNotFoundError(f"--calib {options.calib} does not exist")


def check_rgpt_weights(path: Path, channels: int, hidden: int) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"--rgpt-weights {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        needed = {"connector.fc1.weight", "connector.fc2.weight", "refinement.up1.weight"}
        if not needed <= names:
            raise ValueError(
                f"--rgpt-weights {path} lacks {sorted(needed - names)}; give an rgpt.safetensors"
            )
        fc1 = handle.get_slice("connector.fc1.weight").get_shape()  # [D, C]
        fc2 = handle.get_slice("connector.fc2.weight").get_shape()  # [D, D]
    if fc1[1] != channels:
        raise ValueError(
            f"the connector takes {fc1[1]} vision channels but the CLIP model has {channels}"
        )
    if fc2[0] != hidden:
        raise ValueError(
            f"the connector outputs {fc2[0]} values but the LLM's hidden size is {hidden}; they must agree"
        )


# --- the build -----------------------------------------------------------------------------------


def load_source(options: BuildOptions):
    from rgpt_rt.model import RGPT

    if options.clip is not None:
        model = RGPT.from_components(options.clip, options.llm)
        if options.rgpt_weights is not None:
            from safetensors.torch import load_file

            own = load_file(str(options.rgpt_weights))
            model.refinement.load_state_dict(
                {k[11:]: v for k, v in own.items() if k.startswith("refinement.")}
            )
            model.connector.load_state_dict(
                {k[10:]: v for k, v in own.items() if k.startswith("connector.")}
            )
        return model.float().eval()
    folder = options.checkpoint if options.checkpoint is not None else default_checkpoint_folder()
    return RGPT.from_pretrained(folder).float().eval()


def default_checkpoint_folder() -> Path:
    import rgpt_rt

    if not hasattr(rgpt_rt, "default_checkpoint"):
        raise FileNotFoundError("this rgpt_rt has no embedded default model; pass --checkpoint DIR")
    return Path(rgpt_rt.default_checkpoint())


def source_record(options: BuildOptions) -> dict[str, Any]:
    if options.clip is not None:
        record = {
            "kind": "components",
            "clip": str(options.clip.resolve()),
            "llm": str(options.llm.resolve()),
        }
        if options.rgpt_weights is not None:
            record["rgpt_weights"] = str(options.rgpt_weights.resolve())
        return record
    if options.checkpoint is not None:
        return {"kind": "checkpoint", "path": str(options.checkpoint.resolve())}
    return {"kind": "default"}


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import rgpt_rt

    return {
        "rgpt_rt": rgpt_rt.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": tensorrt_engine.tensorrt_status(),
        "python": platform.python_version(),
    }


def build_bundle(options: BuildOptions) -> dict[str, Any]:
    """Build the bundle into options.out; return the summary (what the manifest holds + timings)."""
    check_sources(options)
    use_trt = options.trt == "on" or (
        options.trt == "auto" and tensorrt_engine.tensorrt_status() != tensorrt_engine.NOT_INSTALLED
    )
    steps = StepLog(options.log, total=6)
    started = time.perf_counter()
    model = steps.run("load checkpoint", lambda: load_source(options))
    group_size = (
        None
        if options.quant == "none"
        else resolve_group_size(model.config.llm, options.group_size)
    )
    with atomic_directory(options.out) as tmp:
        onnx_path = tmp / "vision.onnx"
        graph = steps.run(
            "export vision.onnx",
            lambda: (
                onnx_vision.export_vision_onnx(model, onnx_path, options.max_batch),
                onnx_vision.check_onnx_graph(onnx_path),
            )[1],
        )
        parity = steps.run(
            "ONNX Runtime parity",
            lambda: onnx_vision.onnx_parity(model, onnx_path, seed=options.seed),
        )
        engines: dict[str, Any] = {}
        if use_trt:
            cache = options.out.parent / ".tensorrt_timing.cache"

            def build_trt():
                path, info = tensorrt_engine.build_vision_engine(
                    onnx_path,
                    tmp,
                    image_size=model.config.vision.image_size,
                    max_batch=options.max_batch,
                    workspace_bytes=int(options.workspace_gb * (1 << 30)),
                    timing_cache=cache,
                )
                engines[path.name] = info

            steps.run("TensorRT engine", build_trt)
            trt_note = tensorrt_engine.tensorrt_status()
        else:
            trt_note = (
                tensorrt_engine.NOT_INSTALLED
                if options.trt == "auto"
                else "TensorRT off (--trt off): ONNX only"
            )
            steps.run("TensorRT engine", lambda: options.log(f"    {trt_note}"))
        quantization = steps.run(
            "LLM weights",
            lambda: write_llm(
                model,
                tmp / "llm.safetensors",
                quant=options.quant,
                group_size=group_size,
                calibration=options.calib,
            ),
        )

        def write_rest():
            (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
            model.tokenizer.save(str(tmp / "tokenizer.json"))
            connector = {
                k: v.detach().float().contiguous() for k, v in model.connector.state_dict().items()
            }
            save_file(connector, str(tmp / "connector.safetensors"))
            save_file(vision_tensors(model), str(tmp / "vision.safetensors"))
            return write_manifest(
                tmp,
                {
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "config": model.config.to_dict(),
                    "source": source_record(options),
                    "vision": {"onnx": graph, "parity_onnxruntime_cpu": parity},
                    "tensorrt": trt_note,
                    "engines": engines,
                    "quantization": quantization,
                    "tools": tool_versions(),
                    "build_seconds": dict(steps.seconds),
                },
            )

        manifest = steps.run("config, tokenizer, connector, manifest", write_rest)
    manifest["build_seconds"] = dict(steps.seconds)
    manifest["total_seconds"] = round(time.perf_counter() - started, 2)
    return manifest


# --- re-verification -----------------------------------------------------------------------------


def check_bundle(
    folder: Path, checkpoint: Path | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Re-verify a bundle: every file against its sha256, then ONNX Runtime against the
    reference on fresh inputs (the source checkpoint from the manifest, or `checkpoint`).
    Raises BundleError on any mismatch."""
    manifest = verify_bundle(folder)
    report: dict[str, Any] = {"files": len(manifest.files), "hashes": "ok"}
    source = manifest.data.get("source", {})
    reference = checkpoint
    if reference is None and source.get("kind") == "checkpoint":
        reference = Path(source["path"])
    if reference is None and source.get("kind") == "default":
        reference = default_checkpoint_folder()
    if reference is None or not reference.is_dir():
        report["parity"] = (
            f"not re-run: the reference checkpoint {reference} is not available (pass --checkpoint)"
        )
        return report
    from rgpt_rt.model import RGPT

    model = RGPT.from_pretrained(reference).float().eval()
    if model.config != manifest.config:
        raise BundleError(
            f"{folder}: the bundle's config differs from the reference checkpoint {reference}"
        )
    fresh_seed = seed if seed is not None else int(time.time()) % 100_000
    try:
        report["parity"] = onnx_vision.onnx_parity(
            model, manifest.folder / "vision.onnx", seed=fresh_seed
        )
    except ValueError as error:
        raise BundleError(f"{folder}: vision.onnx fails parity on fresh inputs: {error}") from None
    report["seed"] = fresh_seed
    return report


def vision_tensors(model) -> dict[str, torch.Tensor]:
    """CLIP (the layers that run) and refinement weights, fp32, under the names the runtime's
    torch vision backend reads: clip.embeddings.*, clip.encoder.layers.N.*, refinement.*."""
    from rgpt_rt.model.vision import transformer_root

    tensors = {}
    for name, value in transformer_root(model.vision.clip).state_dict().items():
        if name.startswith("post_layernorm.") or not value.is_floating_point():
            continue  # the pooled-output norm never runs; position ids are recomputed
        tensors[f"clip.{name}"] = value.detach().float().contiguous()
    for name, value in model.refinement.state_dict().items():
        tensors[f"refinement.{name}"] = value.detach().float().contiguous()
    return tensors


def summary_table(manifest: dict[str, Any]) -> str:
    """A markdown summary: files and sizes, parity errors, seconds per step."""
    lines = ["| file | size |", "|---|---:|"]
    for name, entry in manifest["files"].items():
        lines.append(f"| {name} | {_size(entry['bytes'])} |")
    parity = manifest["vision"]["parity_onnxruntime_cpu"]
    lines += [
        "",
        "| parity (ONNX Runtime vs PyTorch, fresh images) | value |",
        "|---|---:|",
        f"| max abs error | {parity['max_abs']:.3g} |",
        f"| max relative error | {parity['max_rel']:.3g} |",
        f"| tolerance (4x torch fp32 error vs fp64) | {parity['tolerance']:.3g} |",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in manifest["build_seconds"].items()]
    lines += [
        "",
        f"TensorRT: {manifest['tensorrt']}",
        f"LLM: {json.dumps(manifest['quantization'])}",
    ]
    return "\n".join(lines)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
