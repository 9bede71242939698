"""export/build_engine.py: a verified bundle from a checkpoint, and every way it refuses.

One bundle is built through the command line (a subprocess, as a user runs it) and shared
by the tests of this module."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from build_script import run_build_script as run_script
from onnx import TensorProto, helper

from rgpt_rt.bundle import BundleError, verify_bundle
from rgpt_rt.config import RGPTConfig
from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.export.onnx_vision import TENSORRT_ONNX_OPS, check_onnx_graph, unsupported_ops
from rgpt_rt.safetensors_io import read_header

pytestmark = pytest.mark.slow  # bundle builds and build subprocesses: ~35 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "export" / "build_engine.py"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def test_the_bundle_holds_every_file_with_its_hash(bundle):
    manifest = verify_bundle(bundle)
    assert set(manifest.files) == {
        "config.json",
        "tokenizer.json",
        "vision.onnx",
        "vision.safetensors",
        "connector.safetensors",
        "llm.safetensors",
    }
    data = manifest.data
    assert data["tensorrt"] == "TensorRT not installed: ONNX only" and data["engines"] == {}
    assert set(data["tools"]) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    steps = " / ".join(data["build_seconds"])
    for step in ("export vision.onnx", "ONNX Runtime parity", "LLM weights"):
        assert step in steps
    assert manifest.config == RGPTConfig.from_preset("tiny")
    # the vision weights are stored once, fp16: vision.onnx points into the two safetensors
    model = onnx.load(str(bundle / "vision.onnx"), load_external_data=False)
    pointed = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            where = {item.key: item.value for item in tensor.external_data}
            pointed.add((where["location"], int(where["offset"])))
    starts = set()
    for name in ("vision.safetensors", "connector.safetensors"):
        entries, _, start = read_header(bundle / name)
        starts |= {(name, start + entry.start) for entry in entries.values()}
    assert pointed and pointed <= starts, "the graph points at the files' tensors"
    for tensor in model.graph.initializer:  # no weight of the graph is stored inline
        size = 1
        for dim in tensor.dims:
            size *= dim
        assert tensor.data_location == TensorProto.EXTERNAL or size < 4096, tensor.name
    assert (bundle / "vision.onnx").stat().st_size < manifest.files["vision.safetensors"]["bytes"]


def test_onnx_graph_is_checked_with_a_dynamic_batch(bundle):
    graph = check_onnx_graph(bundle / "vision.onnx")
    cfg = RGPTConfig.from_preset("tiny")
    g, size = cfg.vision.grid, cfg.vision.image_size
    assert graph["opset"] >= 17
    assert graph["shapes"]["pixel_values"][1:] == [3, size, size]
    assert graph["shapes"]["image_embeds"][1:] == [g * g, cfg.llm.hidden_size]
    assert graph["shapes"]["hires"][1:] == [4 * g, 4 * g, cfg.vision.hidden_size]
    assert len({graph["shapes"][n][0] for n in graph["shapes"]}) == 1, (
        "one symbolic batch dimension"
    )


def test_parity_is_recorded_and_within_tolerance(bundle):
    parity = json.loads((bundle / "manifest.json").read_text())["vision"]["parity_onnxruntime_cpu"]
    assert parity["max_abs"] <= parity["tolerance"]
    assert parity["max_rel"] < 1e-4  # fp32 against fp64: a few ulps of accumulated error


def test_the_operator_check_refuses_what_tensorrt_cannot_parse(tmp_path):
    node = helper.make_node("NonZero", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert unsupported_ops(path) == ["NonZero"]
    with pytest.raises(ValueError, match="TensorRT's ONNX parser does not take: \\['NonZero'\\]"):
        check_onnx_graph(path)
    assert "NonZero" not in TENSORRT_ONNX_OPS


def test_check_catches_a_single_flipped_byte_in_any_file(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    for name in json.loads((copy / "manifest.json").read_text())["files"]:
        path = copy / name
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(BundleError, match=name.replace(".", r"\.")):
            verify_bundle(copy)
        path.write_bytes(original)
    verify_bundle(copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin is not in the manifest"):
        verify_bundle(copy)


def test_check_command_passes_then_fails_with_exit_code(bundle, checkpoint, tmp_path):
    result = run_script("--check", str(bundle))
    assert result.returncode == 0, result.stderr
    assert '"hashes": "ok"' in result.stdout and "max_abs" in result.stdout, (
        "parity re-run on fresh inputs, from the bundle alone"
    )
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "vision.onnx", "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0x80]))
    result = run_script("--check", str(copy))
    assert result.returncode == 1
    assert "vision.onnx does not match its sha256" in result.stderr


def test_a_build_killed_midway_leaves_the_previous_bundle(bundle, checkpoint, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(bundle, out)
    before = (out / "manifest.json").read_bytes()
    process = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--quant",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    for line in process.stdout:
        if "export vision.onnx" in line or time.time() > deadline:
            break
    time.sleep(1.0)  # well inside the export: the temporary bundle is half written
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (out / "manifest.json").read_bytes() == before
    verify_bundle(out)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny.tmp-")]
    assert leftovers, "the killed build had started writing beside the bundle"
    # the next build removes what a killed build left behind
    build_bundle(
        BuildOptions(out=tmp_path / "tiny", checkpoint=checkpoint, quant="none", log=lambda _: None)
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny.tmp-")]
    verify_bundle(out)


def test_bad_sources_fail_before_any_long_work(checkpoint, tmp_path):
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build_bundle(
            BuildOptions(out=file_out, checkpoint=checkpoint, quant="none", log=lambda _: None)
        )
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    (partial / "llm" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing llm/config.json"):
        build_bundle(BuildOptions(out=tmp_path / "b", checkpoint=partial, log=lambda _: None))
    with pytest.raises(ValueError, match="not CLIP"):
        build_bundle(
            BuildOptions(
                out=tmp_path / "b",
                clip=checkpoint / "llm",
                llm=checkpoint / "llm",
                log=lambda _: None,
            )
        )
    with pytest.raises(ValueError, match="--clip and --llm go together"):
        BuildOptions(clip=checkpoint / "vision")


def test_connector_and_llm_sizes_must_agree(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint / "rgpt.safetensors"))
    weights["connector.fc2.weight"] = torch.zeros(8, weights["connector.fc2.weight"].shape[1])
    bad = tmp_path / "rgpt.safetensors"
    save_file(weights, str(bad))
    hidden = RGPTConfig.from_preset("tiny").llm.hidden_size
    with pytest.raises(ValueError, match=f"hidden size is {hidden}; they must agree"):
        build_bundle(
            BuildOptions(
                out=tmp_path / "b",
                clip=checkpoint / "vision",
                llm=checkpoint / "llm",
                rgpt_weights=bad,
                log=lambda _: None,
            )
        )
