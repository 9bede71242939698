"""The bundle: what `export/build_engine.py` writes and `rgpt_rt.Session` reads (DESIGN.md §2).

    bundle/
      manifest.json        format, version, config, every file's sha256 and size, parity, tools
      config.json          the RGPTConfig
      tokenizer.json
      vision.onnx          CLIP + refinement + patch merge + connector: pixel_values -> image_embeds, hires
      vision.safetensors   CLIP + refinement weights for the torch vision backend (no ONNX Runtime / TensorRT)
      connector.safetensors   the connector, for region embeddings (and the torch backend), with
                           its region-number table where config.connector.region_numbers > 0
                           and its centroid projection where config.connector.region_positions > 0
      llm.safetensors      the LLM: INT4 linears (the project's layout) + fp16 embeddings, norms, lm_head
      vision.<gpu>.trt<version>.engine   when TensorRT built one (device-specific)

    manifest = verify_bundle("build/bundles/tiny")     # raises BundleError naming the bad file

Read side only (no transformers): the writer lives in rgpt_rt/export/.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgpt_rt.config import RGPTConfig

BUNDLE_FORMAT = "rgpt_rt.bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
# The LLM file of a bundle, and of a quantized LLM folder (rgpt_rt/quant/checkpoint.py).
LLM_FILE = "llm.safetensors"
REQUIRED_FILES = (
    "config.json",
    "tokenizer.json",
    "vision.onnx",
    "connector.safetensors",
    LLM_FILE,
)


class BundleError(ValueError):
    """A bundle that is missing, incomplete, or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {"sha256", "bytes"}} for every file under `folder` but the manifest."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            name = path.relative_to(folder).as_posix()
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]

    @property
    def config(self) -> RGPTConfig:
        return RGPTConfig.from_dict(self.data["config"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @property
    def quantization(self) -> dict[str, Any]:
        return self.data.get("quantization", {})

    def engine_for(self, device_name: str) -> Path | None:
        """The TensorRT engine built for this GPU, if the bundle holds one."""
        for name, entry in self.data.get("engines", {}).items():
            if entry.get("device") == device_name:
                return self.folder / name
        return None


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"bundle folder {folder} does not exist; build one with `python export/build_engine.py`"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{folder} has no {MANIFEST}: it is not a bundle, or its build did not finish"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON ({error}); rebuild the bundle") from None
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path} is not an rgpt_rt bundle manifest (format {data.get('format')!r})"
        )
    if data.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{folder} is bundle format version {data.get('version')}; this rgpt_rt reads version {BUNDLE_VERSION}: rebuild it"
        )
    return Manifest(folder=folder, data=data)


def verify_bundle(folder: str | Path, *, hashes: bool = True) -> Manifest:
    """Check that every file the manifest lists is there with its size (and sha256 when
    `hashes`), that the required files are listed, and that no unlisted file was added.
    Raises BundleError naming the first file that does not match."""
    manifest = read_manifest(folder)
    folder = manifest.folder
    listed = manifest.files
    for name in REQUIRED_FILES:
        if name not in listed:
            raise BundleError(f"{folder}: the manifest does not list {name}; rebuild the bundle")
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{folder}: {name} is {size} bytes but the manifest says {entry['bytes']}; the file was changed or truncated"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"{folder}: {name} does not match its sha256 in the manifest; the file was changed or corrupted"
            )
    extra = sorted(set(describe_names(folder)) - set(listed))
    if extra:
        raise BundleError(
            f"{folder}: {extra[0]} is not in the manifest; remove it or rebuild the bundle"
        )
    return manifest


def describe_names(folder: Path) -> list[str]:
    return [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    ]


def write_manifest(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` and write manifest.json (the last file a build writes)."""
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        **data,
        "files": describe_files(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest
