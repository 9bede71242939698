"""The default bundle: `python export/build_engine.py` with no arguments builds it, and the
bundle shipped in the package (the Session's default) is exactly what that build makes of the
shipped checkpoint."""

import json

import torch
from build_script import run_build_script
from safetensors.torch import load_file

import rgpt_rt
from rgpt_rt.bundle import verify_bundle
from rgpt_rt.export.build import check_bundle
from rgpt_rt.model import RGPT
from rgpt_rt.ops.int4_format import load_int4
from rgpt_rt.quant import quantize_rtn
from rgpt_rt.runtime.session import default_bundle


def test_no_arguments_build_the_default_bundle(tmp_path):
    result = run_build_script(cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = verify_bundle(tmp_path / "build" / "bundles" / "tiny")
    assert manifest.quantization["method"] == "rtn"
    assert manifest.data["source"] == {"kind": "default"}
    assert manifest.data["tensorrt"] == "TensorRT not installed: ONNX only"


def test_the_shipped_bundle_is_the_build_of_the_shipped_checkpoint():
    folder = default_bundle()
    manifest = verify_bundle(folder)  # every file against its sha256
    model = RGPT.from_pretrained(rgpt_rt.default_checkpoint())
    assert manifest.config == model.config
    shipped = json.loads((folder / "tokenizer.json").read_text())
    assert shipped == json.loads(model.tokenizer.to_str())
    connector = load_file(str(folder / "connector.safetensors"))
    for name, value in model.connector.state_dict().items():
        assert torch.equal(connector[name], value.float()), name
    int4, rest = load_int4(folder / "llm.safetensors")
    group = manifest.quantization["group_size"]
    llm = model.llm.state_dict()
    for name, weight in int4.items():  # RTN is deterministic: the same codes, scales, zeros
        fresh = quantize_rtn(llm[f"{name}.weight"].float(), group)
        assert torch.equal(weight.qweight, fresh.qweight) and torch.equal(
            weight.scales, fresh.scales
        ), name
    for name, value in rest.items():
        assert torch.equal(value, llm[name].to(torch.float16)), name
    report = check_bundle(folder, seed=4321)  # vision.onnx against the checkpoint, fresh images
    assert report["parity"]["max_abs"] <= report["parity"]["tolerance"]
    assert json.loads((folder / "manifest.json").read_text())["source"]["kind"] == "default"
