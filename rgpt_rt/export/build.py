"""Checkpoint -> verified bundle, step by step (the logic behind `python export/build_engine.py`).

    summary = build_bundle(BuildOptions(out=Path("build/bundles/tiny")))

Bounded memory: only the vision side (CLIP + refinement + connector) is ever materialised;
the LLM goes from its source shards into llm.safetensors one tensor at a time (AWQ: one layer
at a time). The bundle is assembled in a temporary folder beside --out and swapped into place
when every step has passed, so an interrupted build leaves the previous bundle (or none),
never half of one. Each step prints its time; the summary holds the peak RSS.
"""

from __future__ import annotations

import json
import platform
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.bundle import LLM_FILE, write_manifest
from rgpt_rt.config import RGPTConfig
from rgpt_rt.export import onnx_vision, tensorrt_engine
from rgpt_rt.export.llama_source import LlamaSource
from rgpt_rt.export.llm import QUANT_METHODS, resolve_group_size, write_llm
from rgpt_rt.export.vision_side import VisionSide
from rgpt_rt.tokenizer import ensure_special_tokens, load_tokenizer

DEFAULT_OUT = Path("build/bundles/tiny")
TRT_MODES = ("auto", "on", "off")
CHECKPOINT_FILES = (
    "config.json", "tokenizer.json", "rgpt.safetensors", "vision/config.json", "llm/config.json",
)  # fmt: skip


@dataclass
class BuildOptions:
    out: Path = DEFAULT_OUT
    checkpoint: Path | None = None  # an RGPT.save_pretrained folder; None: the embedded model
    clip: Path | None = None
    llm: Path | None = None
    rgpt_weights: Path | None = None  # refinement + connector (rgpt.safetensors) for --clip/--llm
    osprey: Path | None = None  # an Osprey-7b folder (docs/osprey.md)
    convnext: Path | None = None  # OpenCLIP's ConvNeXt file for --osprey
    quant: str = "rtn"
    group_size: int | None = None  # None: 128 when it divides every linear's input width
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
        if self.osprey is not None and (self.checkpoint is not None or self.clip is not None):
            raise ValueError("give one source: --osprey, --checkpoint or --clip/--llm")
        if self.convnext is not None and self.osprey is None:
            raise ValueError("--convnext goes with --osprey")
        if self.osprey is not None and self.quant == "awq":
            raise ValueError(
                "--quant awq is not written for Osprey yet (its calibration inputs are "
                "RegionGPT's); use --quant rtn or none"
            )


@dataclass
class Sources:
    """What a build reads, opened and checked before any long step."""

    config: RGPTConfig
    llm: LlamaSource
    tokenizer: Any
    load_side: Callable[[], VisionSide]
    record: dict[str, Any]


@dataclass
class StepLog:
    """Progress per step, the seconds each took, and the process's peak RSS after it."""

    log: Callable[[str], None]
    total: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    _index: int = 0

    def run(self, name: str, action: Callable[[], Any]) -> Any:
        self._index += 1
        self.log(f"[{self._index}/{self.total}] {name} ...")
        start = time.perf_counter()
        result = action()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.peak_rss_mb[name] = peak_rss_mb()
        self.log(
            f"[{self._index}/{self.total}] {name}: done in {self.seconds[name]:.1f} s "
            f"(peak RSS so far {self.peak_rss_mb[name]:.0f} MB)"
        )
        return result


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- checks before any long work -------------------------------------------------------------
def open_sources(options: BuildOptions) -> Sources:
    """Fail fast on bad inputs: missing folders or files, not a CLIP model, a missing or
    truncated shard, shapes that disagree with a config, sizes that disagree between parts,
    an output path that is a file, TensorRT demanded but absent."""
    if options.out.exists() and not options.out.is_dir():
        raise ValueError(f"--out {options.out} is a file; give a folder path for the bundle")
    if options.trt == "on" and tensorrt_engine.tensorrt_status() == tensorrt_engine.NOT_INSTALLED:
        raise ValueError(
            "--trt on but TensorRT is not installed; install it, or use --trt auto / off"
        )
    if options.calib is not None and not options.calib.is_file():
        raise FileNotFoundError(f"--calib {options.calib} does not exist")
    if options.clip is not None:
        return _component_sources(options)
    if options.osprey is not None:
        return _osprey_sources(options)
    folder = options.checkpoint if options.checkpoint is not None else default_checkpoint_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"--checkpoint {folder} does not exist")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--checkpoint {folder} is missing {', '.join(missing)}; is the save complete?"
        )
    config = RGPTConfig.from_dict(json.loads((folder / "config.json").read_text())["config"])
    llm = LlamaSource.open(folder / "llm")
    _check_same_llm(config, llm, folder / "config.json")
    record = (
        {"kind": "checkpoint", "path": str(folder.resolve())}
        if options.checkpoint is not None
        else {"kind": "default"}
    )
    return Sources(
        config=config,
        llm=llm,
        tokenizer=load_tokenizer(folder / "tokenizer.json"),
        load_side=lambda: VisionSide.from_checkpoint(folder),
        record=record,
    )


def _component_sources(options: BuildOptions) -> Sources:
    from rgpt_rt.model.rgpt import _llm_tokenizer
    from rgpt_rt.model.vision import read_clip_vision_config

    for flag, folder in (("--clip", options.clip), ("--llm", options.llm)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {folder} does not exist")
    vision = read_clip_vision_config(options.clip)
    llm = LlamaSource.open(options.llm)
    config = RGPTConfig(vision=vision, llm=llm.config, name="from-components")
    if options.rgpt_weights is not None:
        check_rgpt_weights(options.rgpt_weights, vision.hidden_size, llm.config.hidden_size)
    record = {"kind": "components", "clip": str(options.clip.resolve())}
    record["llm"] = str(options.llm.resolve())
    if options.rgpt_weights is not None:
        record["rgpt_weights"] = str(options.rgpt_weights.resolve())
    tokenizer = ensure_special_tokens(_llm_tokenizer(options.llm), config.tokens)
    return Sources(
        config=config,
        llm=llm,
        tokenizer=tokenizer,
        load_side=lambda: VisionSide.from_components(
            config, options.clip, options.rgpt_weights, seed=options.seed
        ),
        record=record,
    )


def _osprey_sources(options: BuildOptions) -> Sources:
    """An Osprey-7b folder and OpenCLIP's ConvNeXt file (rgpt_rt/export/osprey_source.py)."""
    from rgpt_rt.export.osprey_source import OspreySource, OspreyVisionSide

    source = OspreySource.open(options.osprey, options.convnext)
    return Sources(
        config=source.config,
        llm=source.llm,
        tokenizer=source.tokenizer(),
        load_side=lambda: OspreyVisionSide.from_source(source),
        record=source.record,
    )


def _check_same_llm(config: RGPTConfig, llm: LlamaSource, where: Path) -> None:
    theirs, ours = llm.config, config.llm
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if getattr(theirs, name) != getattr(ours, name):
            raise ValueError(
                f"{where} says llm.{name} = {getattr(ours, name)} but {llm.folder}/config.json "
                f"says {getattr(theirs, name)}; the checkpoint's parts disagree"
            )


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


def default_checkpoint_folder() -> Path:
    import rgpt_rt

    return Path(rgpt_rt.default_checkpoint())


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


# --- the build -----------------------------------------------------------------------------------
def build_bundle(options: BuildOptions) -> dict[str, Any]:
    """Build the bundle into options.out; return the summary (what the manifest holds + timings)."""
    started = time.perf_counter()
    sources = open_sources(options)
    config = sources.config
    group_size = (
        None if options.quant == "none" else resolve_group_size(config.llm, options.group_size)
    )
    use_trt = options.trt == "on" or (
        options.trt == "auto" and tensorrt_engine.tensorrt_status() != tensorrt_engine.NOT_INSTALLED
    )
    steps = StepLog(options.log, total=7)
    build_id = uuid.uuid4().hex  # in every weight file and the manifest: files never mix

    def load_side() -> VisionSide:
        side = sources.load_side()
        side.prepare_for_export()  # fp16 values, linears as weight_t: what the bundle stores
        return side

    side = steps.run("load the vision side", load_side)
    with atomic_directory(options.out) as tmp:
        onnx_path = tmp / "vision.onnx"

        def export_graph() -> dict[str, Any]:
            pointed = onnx_vision.export_vision_onnx(
                side, tmp, options.max_batch, build_id=build_id
            )
            return {**onnx_vision.check_onnx_graph(onnx_path), "weights_in": pointed}

        graph = steps.run("export vision.onnx (weights in vision.safetensors)", export_graph)
        references = steps.run(
            "torch reference on fresh images (fp32, fp64)",
            lambda: onnx_vision.reference_outputs(side, seed=options.seed),
        )
        if options.quant != "awq":
            side = None  # only AWQ's calibration needs the vision side again: free it now
        parity = steps.run(
            "ONNX Runtime parity", lambda: onnx_vision.onnx_parity(onnx_path, references)
        )
        engines, trt_note = steps.run(
            "TensorRT engine", lambda: _tensorrt(options, use_trt, onnx_path, tmp, config)
        )
        calibration = None
        if options.quant == "awq":
            from rgpt_rt.export.calibration import calibration_embeds

            def calibration():
                table = sources.llm.read("model.embed_tokens.weight")
                return calibration_embeds(side, sources.tokenizer, table, options.calib)

        quantization = steps.run(
            "LLM weights (streamed from the source shards)",
            lambda: write_llm(
                sources.llm,
                tmp / LLM_FILE,
                quant=options.quant,
                group_size=group_size,
                calibration=calibration,
                log=options.log,
                build_id=build_id,
            ),
        )
        side = None

        def write_rest() -> dict[str, Any]:
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
            sources.tokenizer.save(str(tmp / "tokenizer.json"))
            return write_manifest(
                tmp,
                {
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_id": build_id,
                    "model": config.name,
                    "source": sources.record,
                    "vision": {"onnx": graph, "parity_onnxruntime_cpu": parity},
                    "tensorrt": trt_note,
                    "engines": engines,
                    "quantization": quantization,
                    "tools": tool_versions(),
                    "build_seconds": dict(steps.seconds),
                },
            )

        manifest = steps.run("config, tokenizer, manifest", write_rest)
    manifest["build_seconds"] = dict(steps.seconds)
    manifest["peak_rss_mb"] = peak_rss_mb()
    manifest["total_seconds"] = round(time.perf_counter() - started, 2)
    options.log(
        f"built in {manifest['total_seconds']:.1f} s, peak RSS {manifest['peak_rss_mb']:.0f} MB; "
        f"manifest sha256 {manifest['sha256']}"
    )
    return manifest


def _tensorrt(options: BuildOptions, use_trt: bool, onnx_path: Path, tmp: Path, config):
    if not use_trt:
        note = (
            tensorrt_engine.NOT_INSTALLED
            if options.trt == "auto"
            else "TensorRT off (--trt off): ONNX only"
        )
        options.log(f"    {note}")
        return {}, note
    path, info = tensorrt_engine.build_vision_engine(
        onnx_path,
        tmp,
        image_size=config.vision.image_size,
        max_batch=options.max_batch,
        workspace_bytes=int(options.workspace_gb * (1 << 30)),
        timing_cache=options.out.parent / ".tensorrt_timing.cache",
    )
    return {path.name: info}, tensorrt_engine.tensorrt_status()


def summary_table(manifest: dict[str, Any]) -> str:
    """A markdown summary: files and sizes, parity errors, seconds per step."""
    lines = ["| file | size |", "|---|---:|"]
    for name, entry in manifest["files"].items():
        lines.append(f"| {name} | {_size(entry['bytes'])} |")
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    lines.append(f"| **total** | {_size(total)} |")
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
        f"Peak RSS: {manifest.get('peak_rss_mb', 0):.0f} MB",
        f"TensorRT: {manifest['tensorrt']}",
        f"LLM: {json.dumps(manifest['quantization'])}",
        f"manifest sha256 (pin with Session(bundle, sha256=...)): {manifest['sha256']}",
    ]
    return "\n".join(lines)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
