"""The runtime stands alone: importing it, loading a LLaMA folder and generating never import
transformers, the trainer or the reference model."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import torch
torch.set_num_threads(1)
import rgpt_rt.runtime
from rgpt_rt.runtime import LlamaDecoder, generate
decoder = LlamaDecoder.from_pretrained(sys.argv[1])
assert len(generate(decoder, input_ids=[1, 2, 3], max_new_tokens=4)) == 4
import pkgutil, importlib, rgpt_rt.runtime as runtime
for module in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module(f"rgpt_rt.runtime.{module.name}")
import rgpt_rt
assert rgpt_rt.Session.__name__ == "Session"
loaded = [m for m in ("transformers", "rgpt_rt.model", "rgpt_rt.train", "rgpt_rt.export") if m in sys.modules]
assert not loaded, f"the runtime imported {loaded}"
"""


def test_runtime_never_imports_transformers(hf_llama):
    _, folder = hf_llama("gqa")
    result = subprocess.run(
        [sys.executable, "-c", CODE, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
