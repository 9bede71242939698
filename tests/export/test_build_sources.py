"""Bad sources fail fast with an error naming the file, and a failing build (a full disk
included) leaves nothing half-written at --out. The LLM is a small sharded LLaMA folder, the
CLIP folder the tiny checkpoint's."""

import errno
import json

import pytest
from tiny_llama_folder import write_tiny_llama

from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.safetensors_io import SafetensorsWriter

pytestmark = pytest.mark.slow  # bundle builds: ~8 s on 2 cores


@pytest.fixture()
def llm(tmp_path):
    folder = write_tiny_llama(tmp_path / "llm", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def build(clip, llm, out):
    # --quant none: the tiny LLaMA's widths (48, 96) take no INT4 group size
    options = BuildOptions(out=out, clip=clip, llm=llm, quant="none", trt="off", log=lambda _: None)
    return build_bundle(options)


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_a_sharded_folder_builds(tiny_checkpoint, llm, tmp_path):
    manifest = build(tiny_checkpoint / "vision", llm, tmp_path / "out")
    assert manifest["quantization"]["fused"] and (tmp_path / "out" / "llm.safetensors").is_file()


def test_a_missing_shard_is_named(tiny_checkpoint, llm, tmp_path):
    gone = shards(llm)[-1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"{gone.name} is missing"):
        build(tiny_checkpoint / "vision", llm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_shard_is_named(tiny_checkpoint, llm, tmp_path):
    cut = shards(llm)[0]
    cut.write_bytes(cut.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{cut.name} is truncated"):
        build(tiny_checkpoint / "vision", llm, tmp_path / "out")
    cut.write_bytes(b"\x07")
    with pytest.raises(ValueError, match=f"{cut.name} is not a"):
        build(tiny_checkpoint / "vision", llm, tmp_path / "out")


def test_an_index_naming_a_tensor_no_shard_holds_is_named(tiny_checkpoint, llm, tmp_path):
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = shards(llm)[0].name
    (llm / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="puts model.layers.0.extra.weight in"):
        build(tiny_checkpoint / "vision", llm, tmp_path / "out")


def test_a_config_that_disagrees_with_the_weights_is_named(tiny_checkpoint, llm, tmp_path):
    config = json.loads((llm / "config.json").read_text())
    config["intermediate_size"] = 128
    (llm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight is .* config.json .* disagree"):
        build(tiny_checkpoint / "vision", llm, tmp_path / "out")


def test_a_full_disk_leaves_the_previous_bundle_and_no_leftovers(
    tiny_checkpoint, llm, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    build(tiny_checkpoint / "vision", llm, out)
    before = (out / "manifest.json").read_bytes()
    written = {"count": 0}
    write = SafetensorsWriter.write

    def full_disk(self, name, tensor):
        written["count"] += 1
        if written["count"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._handle.name))
        return write(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left on device: .*safetensors"):
        build(tiny_checkpoint / "vision", llm, out)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
