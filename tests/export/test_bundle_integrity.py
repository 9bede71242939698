"""A bundle you can trust: the manifest lists and hashes everything the Session reads, nothing
else may be in the folder, a file from another build is refused even with its hash updated,
config and tensors are checked against each other at load, the manifest's digest pins the
whole bundle, `--check` reports instead of tracebacking, and an interrupted rebuild never
leaves --out without a bundle."""

import hashlib
import json
import os
import shutil

import pytest
from build_script import run_build_script

from rgpt_rt.atomic import atomic_directory, remove_abandoned
from rgpt_rt.bundle import BundleError, verify_bundle
from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.runtime.session import Session


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def relist(bundle, name, raw: bytes) -> None:
    """Write `name` and update its size and sha256 in the manifest (an edit that hides itself)."""
    (bundle / name).write_bytes(raw)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def edit_config(bundle, section, key, value) -> None:
    config = json.loads((bundle / "config.json").read_text())
    config[section][key] = value
    relist(bundle, "config.json", json.dumps(config).encode())


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/x.bin", "..", ""])
def test_a_listed_name_outside_the_folder_is_refused(copy, name):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a file name inside the bundle"):
        verify_bundle(copy)


def test_unlisted_files_folders_and_links_are_refused(copy, tmp_path):
    (copy / "sub").mkdir()
    (copy / "sub" / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="sub/ is a folder"):
        verify_bundle(copy)
    shutil.rmtree(copy / "sub")
    os.symlink(copy / "config.json", copy / "link.json")
    with pytest.raises(BundleError, match="link.json is a symbolic link"):
        verify_bundle(copy)
    (copy / "link.json").unlink()
    (copy / "vision.onnx").rename(tmp_path / "elsewhere.onnx")
    os.symlink(tmp_path / "elsewhere.onnx", copy / "vision.onnx")
    with pytest.raises(BundleError, match="vision.onnx is a symbolic link"):
        verify_bundle(copy)


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("llm", "hidden_size", 128, r"llm.safetensors.*config.json implies|config.json implies"),
        ("llm", "num_heads", 8, r"config.json implies"),
        ("vision", "image_size", 192, r"vision.onnx takes images of shape .* config.json"),
    ],
)
def test_a_config_that_disagrees_with_the_tensors_is_refused_naming_both(
    copy, section, key, value, match
):
    edit_config(copy, section, key, value)
    verify_bundle(copy)  # every file checks out: only the shapes can tell
    with pytest.raises(ValueError, match=match):
        Session(copy, device="cpu")


def test_the_manifest_digest_pins_the_bundle(copy, tiny_bundle):
    digest = verify_bundle(tiny_bundle).sha256
    assert Session(copy, device="cpu", sha256=digest).source["sha256"] == digest
    edit_config(copy, "llm", "max_position_embeddings", 100000)  # nothing else would notice
    Session(copy, device="cpu")
    with pytest.raises(BundleError, match="not the .* it was pinned to"):
        Session(copy, device="cpu", sha256=digest)


@pytest.mark.slow  # a second build: ~3.5 s
def test_a_file_from_another_build_is_refused_even_with_its_hash_updated(
    copy, tiny_checkpoint, tmp_path
):
    other = tmp_path / "other"
    build_bundle(
        BuildOptions(
            out=other, checkpoint=tiny_checkpoint, quant="none", trt="off", log=lambda _: None
        )
    )
    for name in ("llm.safetensors", "connector.safetensors"):
        swapped = tmp_path / f"swap-{name}"
        shutil.copytree(copy, swapped)
        relist(swapped, name, (other / name).read_bytes())
        with pytest.raises(BundleError, match=f"{name} comes from build"):
            verify_bundle(swapped)
    relist(copy, "vision.onnx", (other / "vision.onnx").read_bytes())
    with pytest.raises(ValueError, match="vision.onnx comes from build"):
        Session(copy, device="cpu")


@pytest.mark.slow  # --check in a subprocess: ~4 s each
@pytest.mark.parametrize("damage", ["not json", "unknown key", "bad value"])
def test_check_reports_a_bad_config_without_a_traceback(copy, damage):
    config = json.loads((copy / "config.json").read_text())
    raw = {
        "not json": b"{ not json",
        "unknown key": json.dumps({**config, "extra": 1}).encode(),
        "bad value": json.dumps({**config, "pool_mode": "nearest"}).encode(),
    }[damage]
    relist(copy, "config.json", raw)
    result = run_build_script("--check", str(copy))
    assert result.returncode == 1
    assert "bundle check FAILED" in result.stderr and "config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_old_bundle_is_refused_with_a_rebuild_message(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 1; this rgpt_rt reads version 2: rebuild"):
        Session(copy, device="cpu")


def test_a_swap_that_was_interrupted_is_repaired_by_the_next_write(tmp_path):
    target = tmp_path / "tiny"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    # a writer (long gone: pid 2**22 + 1 is not running) moved the old folder aside and died
    aside = tmp_path / f".tiny.old-{2**22 + 1}"
    target.rename(aside)
    remove_abandoned(target)
    assert (target / "a").read_text() == "old" and not aside.exists()
    # with a bundle in place, a stale side folder is removed
    shutil.copytree(target, aside)
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and not aside.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
