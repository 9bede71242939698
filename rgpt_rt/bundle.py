"""The bundle: what `export/build_engine.py` writes and `rgpt_rt.Session` reads (DESIGN.md §2).

    bundle/
      manifest.json          format, version, every other file's sha256 and size, parity, tools
      config.json            the RGPTConfig (the Session's only source for it)
      tokenizer.json
      vision.onnx            CLIP + refinement + patch merge + connector: pixel_values -> image_embeds, hires;
                             its weights are external data inside the two files below
      vision.safetensors     CLIP + refinement weights, fp16 (linears as weight_t [in, out])
      connector.safetensors  the connector, fp16, for region embeddings (and the graph)
      llm.safetensors        the LLM: INT4 linears (q/k/v and gate/up stacked) + fp16 embeddings, norms, lm_head
      vision.<gpu>.trt<version>.engine   when TensorRT built one (device-specific)

    manifest = verify_bundle("build/bundles/tiny", sha256="...")   # raises BundleError naming the problem

Trust: the manifest lists and hashes every file the Session reads, and no other file may be
in the folder (none outside it, no links, nothing in subfolders). The manifest's own sha256,
which the build prints, pins the whole bundle: `Session(bundle, sha256=...)`.
Read side only (no transformers): the writer lives in rgpt_rt/export/.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rgpt_rt.config import RGPTConfig

BUNDLE_FORMAT = "rgpt_rt.bundle"
# 2: fp16 vision weights stored once (vision.onnx points into them), the config read from
# config.json only, q/k/v and gate/up stored stacked in llm.safetensors.
BUNDLE_VERSION = 2
MANIFEST = "manifest.json"
# The metadata key (safetensors, ONNX) holding the id of the build that wrote a file.
BUILD_ID_KEY = "rgpt_build_id"
# The LLM file of a bundle, and of a quantized LLM folder (rgpt_rt/quant/checkpoint.py).
LLM_FILE = "llm.safetensors"
REQUIRED_FILES = (
    "config.json",
    "tokenizer.json",
    "vision.onnx",
    "vision.safetensors",
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
    """{name: {"sha256", "bytes"}} for every file of `folder` but the manifest."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]
    sha256: str  # of manifest.json's bytes
    config: RGPTConfig | None = None  # config.json, once its hash is checked (verify_bundle)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @property
    def quantization(self) -> dict[str, Any]:
        return self.data.get("quantization", {})

    def engine_for(self, device_name: str) -> Path | None:
        """The TensorRT engine built for this GPU, if the bundle holds one."""
        for name, entry in self.data.get("engines", {}).items():
            if entry.get("device") == device_name and name in self.files:
                return self.folder / name
        return None


def read_manifest(folder: str | Path, sha256: str | None = None) -> Manifest:
    """manifest.json parsed and checked for form (and against `sha256` when given); the files
    are checked by verify_bundle."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"bundle folder {folder} does not exist; build one with `python export/build_engine.py`"
        )
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise BundleError(
            f"{folder} has no {MANIFEST}: it is not a bundle, or its build did not finish"
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise BundleError(
            f"{path} has sha256 {digest}, not the {sha256} it was pinned to; "
            "the bundle was changed or is another bundle"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON ({error}); rebuild the bundle") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not an rgpt_rt bundle manifest")
    if data.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{folder} is bundle format version {data.get('version')}; this rgpt_rt reads "
            f"version {BUNDLE_VERSION}: rebuild it with `python export/build_engine.py`"
        )
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        for e in files.values()
    ):
        raise BundleError(f"{path}: 'files' must map names to their sha256 and bytes")
    for name in files:
        _check_name(folder, name)
    return Manifest(folder=folder, data=data, sha256=digest)


def verify_bundle(
    folder: str | Path, *, hashes: bool = True, sha256: str | None = None
) -> Manifest:
    """Check that the folder holds exactly the files the manifest lists, each with its size (and
    sha256 when `hashes`), the required ones among them, and that config.json is a valid
    config. `sha256` pins manifest.json itself. Raises BundleError naming the first problem."""
    manifest = read_manifest(folder, sha256)
    folder, listed = manifest.folder, manifest.files
    _check_listing(folder, listed)
    for name in REQUIRED_FILES:
        if name not in listed:
            raise BundleError(f"{folder}: the manifest does not list {name}; rebuild the bundle")
    for name, entry in listed.items():
        path = folder / name
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{folder}: {name} is {size} bytes but the manifest says {entry['bytes']}; "
                "the file was changed or truncated"
            )
        if hashes and sha256_file(path) != entry["sha256"]:
            raise BundleError(
                f"{folder}: {name} does not match its sha256 in the manifest; the file was "
                "changed or corrupted"
            )
    _check_build_id(manifest)
    manifest.config = _read_config(folder)
    return manifest


def _check_build_id(manifest: Manifest) -> None:
    """Each weight file carries its build's id (safetensors metadata): a file taken from another
    bundle of the same model, its hash updated in the manifest, is still refused."""
    from rgpt_rt.safetensors_io import read_header

    build = manifest.data.get("build_id")
    for name in manifest.files:
        if name.endswith(".safetensors"):
            try:
                _, metadata, _ = read_header(manifest.folder / name)
            except ValueError as error:
                raise BundleError(f"{manifest.folder}: {error}") from None
            if metadata.get(BUILD_ID_KEY) != build:
                raise BundleError(
                    f"{manifest.folder}: {name} comes from build {metadata.get(BUILD_ID_KEY)}, "
                    f"not this bundle's {build}; the bundle's files were mixed: rebuild it"
                )


def _check_listing(folder: Path, listed: dict[str, Any]) -> None:
    """Every entry of the folder is a regular file the manifest lists (or the manifest), and
    every listed file is there: no links, no subfolders, nothing unlisted."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink():
            raise BundleError(
                f"{folder}: {entry.name} is a symbolic link; a bundle holds files only"
            )
        if entry.is_dir():
            raise BundleError(
                f"{folder}: {entry.name}/ is a folder; a bundle holds no subfolders (remove it)"
            )
        if entry.name != MANIFEST and entry.name not in listed:
            raise BundleError(
                f"{folder}: {entry.name} is not in the manifest; remove it or rebuild the bundle"
            )
    for name in listed:
        _check_name(folder, name)
        if not (folder / name).is_file():
            raise BundleError(f"{folder}: {name} is missing")


def _check_name(folder: Path, name: Any) -> None:
    """A listed name is a plain file name inside the bundle: not absolute, no '..', no '/'."""
    pure = PurePosixPath(str(name))
    if (
        not isinstance(name, str)
        or not name
        or pure.is_absolute()
        or len(pure.parts) != 1
        or name in (".", "..", MANIFEST)
        or "\\" in name
        or "\0" in name
    ):
        raise BundleError(
            f"{folder}: the manifest lists {name!r}, which is not a file name inside the bundle"
        )


def _read_config(folder: Path) -> RGPTConfig:
    path = folder / "config.json"
    try:
        return RGPTConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise BundleError(f"{folder}: config.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
        raise BundleError(f"{path} is not a valid rgpt_rt config ({error})") from None


def write_manifest(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` and write manifest.json (the last file a build writes).
    Returns the manifest with its own sha256 under "sha256"."""
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        **data,
        "files": describe_files(folder),
    }
    raw = json.dumps(manifest, indent=2, sort_keys=False).encode()
    (folder / MANIFEST).write_bytes(raw)
    return {**manifest, "sha256": hashlib.sha256(raw).hexdigest()}
