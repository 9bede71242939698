"""A TensorRT engine added to a built bundle, on the machine that will run it.

    python export/build_engine.py --add-engine B [--max-batch 8] [--workspace 4]
    manifest = add_engine(Path("B"), max_batch=8, workspace_gb=4.0)

An engine runs only on the GPU model and the TensorRT version that built it, so a bundle built
on a workstation holds none for a Jetson. This builds one from the bundle's own vision.onnx
(weights in vision.safetensors) on this machine's GPU and lists it in the manifest; the Session
then picks it (`Manifest.engine_for`). The bundle is checked first (every hash). Its other files
are not rewritten: the new folder holds hard links to them (copies where the file system has
none) and replaces the old folder in one step (rgpt_rt/atomic.py), so a failure leaves the
bundle as it was. The manifest's sha256 changes: re-pin a Session that pinned it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.bundle import verify_bundle, write_manifest
from rgpt_rt.export import tensorrt_engine

# the manifest's own keys, which write_manifest sets again
_OWN_KEYS = ("format", "version", "files", "sha256")


def add_engine(
    folder: Path,
    *,
    max_batch: int = 8,
    workspace_gb: float = 4.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build this GPU's engine for the bundle at `folder` and list it; returns the new manifest
    (with its sha256). An engine of the same name (same GPU, same TensorRT) is replaced."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1; got {max_batch}")
    status = tensorrt_engine.tensorrt_status()
    if status == tensorrt_engine.NOT_INSTALLED:
        raise ValueError(
            "TensorRT is not installed here, so no engine can be built; install it on the "
            "machine that will run the bundle (JetPack ships it: docs/jetson.md)"
        )
    manifest = verify_bundle(folder)
    log(f"bundle verified: {folder} ({len(manifest.files)} files)")
    with atomic_directory(folder) as tmp:
        for name in manifest.files:
            _link_or_copy(folder / name, tmp / name)
        path, info = tensorrt_engine.build_vision_engine(
            tmp / "vision.onnx",
            tmp,
            image_size=manifest.config.vision.image_size,
            max_batch=max_batch,
            workspace_bytes=int(workspace_gb * (1 << 30)),
            timing_cache=folder.parent / ".tensorrt_timing.cache",
        )
        data = {k: v for k, v in manifest.data.items() if k not in _OWN_KEYS}
        data["engines"] = {**data.get("engines", {}), path.name: info}
        data["tensorrt"] = status
        written = write_manifest(tmp, data)
    log(f"engine added: {path.name} ({info.get('device')}); manifest sha256 {written['sha256']}")
    return written


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system
        shutil.copy2(source, target)
