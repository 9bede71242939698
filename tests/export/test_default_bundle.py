"""The default bundle: `python export/build_engine.py` with no arguments builds it, and the
bundle shipped in the package (the Session's default) is exactly what that build makes of the
shipped checkpoint: the same tensors in every weight file, the same graph, config and
tokenizer (only the build id and timestamps differ)."""

import json
from pathlib import Path

import onnx
import pytest
import torch
from build_script import run_build_script

import rgpt_rt
from rgpt_rt.bundle import BUILD_ID_KEY, verify_bundle
from rgpt_rt.export.check import check_bundle
from rgpt_rt.runtime.session import default_bundle
from rgpt_rt.safetensors_io import read_header, read_tensors

pytestmark = pytest.mark.slow  # a build in a subprocess: ~10 s on 2 cores


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default")
    result = run_build_script(cwd=cwd)
    assert result.returncode == 0, result.stderr + result.stdout
    return cwd / "build" / "bundles" / "tiny"


def test_no_arguments_build_the_default_bundle(fresh):
    manifest = verify_bundle(fresh)
    assert manifest.quantization["method"] == "rtn" and manifest.quantization["fused"]
    assert manifest.data["source"] == {"kind": "default"}
    assert manifest.data["tensorrt"] == "TensorRT not installed: ONNX only"


def test_the_graph_carries_no_path_of_the_build_machine(fresh):
    """The exporter's per-node stack traces name absolute source paths: dropped, so a bundle
    leaks nothing of where it was built and a clone elsewhere builds the same graph."""
    graph = onnx.load(str(fresh / "vision.onnx"), load_external_data=False)
    values = [p.value for n in graph.graph.node for p in n.metadata_props]
    assert values, "the exporter's other node metadata (names, scopes) is kept"
    root = str(Path(rgpt_rt.__file__).resolve().parents[1])
    assert not [v for v in values if root in v or 'File "' in v]


def test_the_shipped_bundle_is_the_build_of_the_shipped_checkpoint(fresh):
    shipped = default_bundle()
    manifest = verify_bundle(shipped)  # every file against its sha256
    assert manifest.config == verify_bundle(fresh).config
    for name in ("config.json", "tokenizer.json"):
        assert (shipped / name).read_bytes() == (fresh / name).read_bytes(), name
    for name in ("vision.safetensors", "connector.safetensors", "llm.safetensors"):
        ours, theirs = read_tensors(shipped / name), read_tensors(fresh / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:  # RTN is deterministic: the same codes, scales and zeros
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"
        metadata = read_header(shipped / name)[1]
        assert metadata[BUILD_ID_KEY] == manifest.data["build_id"]
    graphs = [onnx.load(str(b / "vision.onnx"), load_external_data=False) for b in (shipped, fresh)]
    for graph in graphs:
        del graph.metadata_props[:]  # the build id
    assert graphs[0].graph == graphs[1].graph
    report = check_bundle(shipped, seed=4321)  # vision.onnx against the torch backend, fresh images
    assert report["parity"]["max_abs"] <= report["parity"]["tolerance"]
    assert json.loads((shipped / "manifest.json").read_text())["source"]["kind"] == "default"
