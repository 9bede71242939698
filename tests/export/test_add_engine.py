"""Adding a TensorRT engine to a built bundle (export/build_engine.py --add-engine). TensorRT is
installed nowhere we test, so the engine builder is replaced by one that writes known bytes;
what is tested is the bundle around it: listed, verified, picked, replaced atomically."""

from __future__ import annotations

import os
import shutil

import pytest
from build_script import run_build_script

from rgpt_rt.bundle import MANIFEST, read_manifest, verify_bundle
from rgpt_rt.export import tensorrt_engine
from rgpt_rt.export.add_engine import add_engine
from rgpt_rt.runtime.session import default_bundle

GPU = "NVIDIA Fake Orin"


@pytest.fixture()
def bundle(tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(default_bundle(), target)
    return target


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    """A TensorRT that 'builds' an engine of known bytes; returns the list of its builds."""
    builds = []

    def build(onnx_path, out_dir, *, image_size, max_batch, workspace_bytes, timing_cache):
        assert onnx_path.is_file() and (out_dir / "vision.safetensors").is_file()
        path = out_dir / tensorrt_engine.engine_name(GPU, "10.9")
        partial = path.with_name(path.name + ".partial")  # as the real builder writes
        partial.write_bytes(f"engine {len(builds)} {image_size} {max_batch}".encode())
        os.replace(partial, path)
        builds.append(path.name)
        return path, {"device": GPU, "tensorrt": "10.9", "precision": "fp16"}

    monkeypatch.setattr(tensorrt_engine, "tensorrt_status", lambda: "TensorRT 10.9")
    monkeypatch.setattr(tensorrt_engine, "build_vision_engine", build)
    return builds


def test_the_engine_is_listed_verified_and_picked(bundle, fake_tensorrt):
    before = read_manifest(bundle)
    inodes = {name: (bundle / name).stat().st_ino for name in before.files}
    written = add_engine(bundle, max_batch=4, log=lambda _: None)
    manifest = verify_bundle(bundle)  # every hash, the listing, the build ids
    name = fake_tensorrt[0]
    assert manifest.files[name]["bytes"] == (bundle / name).stat().st_size
    assert manifest.engine_for(GPU) == bundle / name
    assert manifest.data["tensorrt"] == "TensorRT 10.9"
    assert manifest.sha256 == written["sha256"] != before.sha256  # re-pin after adding
    for key in ("build_id", "source", "quantization", "vision"):
        assert manifest.data[key] == before.data[key]
    # the other files were linked, not rewritten
    assert {n: (bundle / n).stat().st_ino for n in before.files} == inodes


def test_a_second_engine_of_the_same_name_replaces_the_first_without_writing_through(
    bundle, fake_tensorrt, tmp_path
):
    add_engine(bundle, log=lambda _: None)
    name = fake_tensorrt[0]
    kept = tmp_path / "first.engine"
    os.link(bundle / name, kept)  # the first engine's inode, as the old bundle held it
    add_engine(bundle, log=lambda _: None)
    assert kept.read_bytes().startswith(b"engine 0")  # not written through the hard link
    assert (bundle / name).read_bytes().startswith(b"engine 1")
    assert list(verify_bundle(bundle).data["engines"]) == [name]


def test_without_tensorrt_the_command_says_so_and_leaves_the_bundle(bundle):
    raw = (bundle / MANIFEST).read_bytes()
    result = run_build_script("--add-engine", str(bundle))
    assert result.returncode == 2
    assert "TensorRT is not installed here" in result.stderr and "is unchanged" in result.stderr
    assert (bundle / MANIFEST).read_bytes() == raw
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]  # no leftovers


def test_a_changed_bundle_is_refused_before_any_build(bundle, fake_tensorrt):
    with open(bundle / "connector.safetensors", "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="does not match its sha256"):
        add_engine(bundle, log=lambda _: None)
    assert fake_tensorrt == []


def test_a_failed_build_leaves_the_bundle_as_it_was(bundle, monkeypatch):
    raw = (bundle / MANIFEST).read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("TensorRT could not parse vision.onnx: (fake)")

    monkeypatch.setattr(tensorrt_engine, "tensorrt_status", lambda: "TensorRT 10.9")
    monkeypatch.setattr(tensorrt_engine, "build_vision_engine", fail)
    with pytest.raises(RuntimeError, match="could not parse"):
        add_engine(bundle, log=lambda _: None)
    assert (bundle / MANIFEST).read_bytes() == raw
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]
    verify_bundle(bundle)
