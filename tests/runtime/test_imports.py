"""The runtime stands alone: importing it, loading a LLaMA folder and generating, or loading a
Session and answering, never import transformers, the trainer, the reference model, the
exporter or the offline quantisers; a Session loads only the modules it runs."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("transformers", "timm", "onnx", "rgpt_rt.model", "rgpt_rt.training")
FORBIDDEN += ("rgpt_rt.export", "rgpt_rt.quant")

DECODER = """
import sys
import torch
torch.set_num_threads(1)
from rgpt_rt.runtime import generate, load_decoder
decoder = load_decoder(sys.argv[1])
assert len(generate(decoder, input_ids=[1, 2, 3], max_new_tokens=4)) == 4
import pkgutil, importlib, rgpt_rt.runtime as runtime
for module in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module(f"rgpt_rt.runtime.{module.name}")
print(sorted(sys.modules))
"""

SESSION = """
import json, sys
import torch
torch.set_num_threads(1)
import rgpt_rt
session = rgpt_rt.Session(device="cpu")
assert session.describe("examples/shapes.png", (200, 20, 270, 90), max_new_tokens=4)
print(json.dumps(sorted(sys.modules)))
"""

# What a CPU Session over the embedded bundle runs, and nothing else of rgpt_rt.
SESSION_MODULES = {
    "rgpt_rt", "rgpt_rt._C", "rgpt_rt.bundle", "rgpt_rt.config", "rgpt_rt.inputs",
    "rgpt_rt.prompts", "rgpt_rt.tokenizer", "rgpt_rt.safetensors_io",
    "rgpt_rt.ops", "rgpt_rt.ops.decode", "rgpt_rt.ops.int4", "rgpt_rt.ops.int4_format",
    "rgpt_rt.ops.int4_layout", "rgpt_rt.ops.mask_pool", "rgpt_rt.ops.region_numbers",
    "rgpt_rt.ops.region_positions",
    "rgpt_rt.runtime", "rgpt_rt.runtime.answer", "rgpt_rt.runtime.arguments",
    "rgpt_rt.runtime.cache", "rgpt_rt.runtime.families", "rgpt_rt.runtime.families.base",
    "rgpt_rt.runtime.families.osprey", "rgpt_rt.runtime.families.regiongpt",
    "rgpt_rt.runtime.generate", "rgpt_rt.runtime.graphs", "rgpt_rt.runtime.hf_llama",
    "rgpt_rt.runtime.int4_linear", "rgpt_rt.runtime.kv_cache", "rgpt_rt.runtime.kv_pool", "rgpt_rt.runtime.layers",
    "rgpt_rt.runtime.loading", "rgpt_rt.runtime.memory", "rgpt_rt.runtime.model",
    "rgpt_rt.runtime.preprocess", "rgpt_rt.runtime.session", "rgpt_rt.runtime.stages",
    "rgpt_rt.runtime.table_in_file", "rgpt_rt.runtime.vision",
}  # fmt: skip


def _modules(code: str, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_the_decoder_never_imports_transformers_or_offline_tools(hf_llama):
    _, folder = hf_llama("gqa")
    assert _forbidden(_modules(DECODER, str(folder))) == []


def test_a_session_loads_only_the_modules_it_runs():
    modules = _modules(SESSION)
    assert _forbidden(modules) == []
    ours = {m for m in modules if m == "rgpt_rt" or m.startswith("rgpt_rt.")}
    assert ours - SESSION_MODULES == set(), "a Session loaded a module it does not run"
