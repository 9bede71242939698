"""How much memory a Session of a bundle takes, computed before loading it.

    plan = MemoryPlan.of_bundle(manifest, device="cuda", max_context=4096)
    print(plan.table(budget=parse_bytes("8GiB")))    # rgpt-rt info --bundle B --memory 8GiB
    plan.check(budget)                               # ValueError naming the numbers when it cannot fit

On a Jetson the CPU and the GPU share one memory, so a CUDA session's plan counts the host
side (the Python process with torch and ONNX Runtime loaded) and the device side together.
Weights are exact (from the bundle's files); the KV cache is exact per position; the working
set of one call and the runtime's own baseline are estimates (RUNTIME_BASE, measured on this
project's machines and stated as such in the table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rgpt_rt.config import RGPTConfig

MiB = 1 << 20
GiB = 1 << 30
# The process before any weight: Python, torch, tokenizers, ONNX Runtime (measured: ~0.4 GB
# RSS on x86 CPU with torch 2.13; a CUDA context adds ~0.5 GB on the device side).
RUNTIME_BASE = {"cpu": 400 * MiB, "cuda": 900 * MiB}
# The prefix cache's default budget: at least 512 MiB, and room for one image prefix of the
# model as a CPU keeps it (the whole cache of an answer: the image tokens, the system prompt, a
# question and up to 256 new tokens), so that a second question about an image skips the image's
# tokens. Osprey-7b's 1,024 image tokens make it 704 MiB of fp16 KV; RegionGPT-7B's 576, 480 MiB.
PREFIX_CACHE_FLOOR = 512 * MiB
PREFIX_ROOM = 384  # positions past the image tokens


def default_prefix_cache_bytes(num_image_tokens: int, kv_bytes_per_position: int) -> int:
    return max(PREFIX_CACHE_FLOOR, (num_image_tokens + PREFIX_ROOM) * kv_bytes_per_position)


def parse_bytes(text: str | int) -> int:
    """'8GiB', '7.5GB', '512MiB', '6000000000' -> bytes (GiB/MiB powers of 2, GB/MB of 10)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise TypeError(
            f"a memory size is an int of bytes or a str like '8GiB'; got {type(text).__name__}"
        )
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"memory size {text!r} is not like '8GiB', '7.5GB' or '512MiB'")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    powers |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
    return int(value * powers[unit])


@dataclass
class MemoryPlan:
    device: str  # "cpu" or "cuda"
    llm_weights: int
    vision_weights: int
    kv_per_token: int
    max_context: int
    max_batch: int  # rows of one describe_many batch
    batch_row: int  # positions one row of it holds (the prompt and a 128-token answer, bucketed)
    vision_cache: int  # the cache's budget (it never holds more)
    prefix_cache: int
    per_image_vision: int  # one image's cached vision result
    per_image_prefix: int  # one image's cached prefix KV
    working: int  # activations and workspaces of one call (estimate)
    runtime: int  # the process's own baseline (estimate)
    embed_in_file: int = 0  # the embedding table, left in llm.safetensors (a CPU reads rows)

    @classmethod
    def of_bundle(cls, manifest, device: str = "cpu", **options) -> MemoryPlan:
        """The plan of a verified bundle's Session; options as of_config's (max_context,
        vision_cache_bytes, prefix_cache_bytes, max_batch)."""
        files = manifest.files
        return cls.of_config(
            manifest.config,
            quantized=manifest.quantization.get("method", "none") != "none",
            llm_file_bytes=files["llm.safetensors"]["bytes"],
            vision_file_bytes=files["vision.safetensors"]["bytes"]
            + files["connector.safetensors"]["bytes"],
            device=device,
            **options,
        )

    @classmethod
    def of_config(
        cls,
        config: RGPTConfig,
        *,
        quantized: bool = True,
        llm_file_bytes: int,
        vision_file_bytes: int,
        device: str = "cpu",
        max_context: int | None = None,
        vision_cache_bytes: int = 256 * MiB,
        prefix_cache_bytes: int | None = None,
        max_batch: int = 16,
    ) -> MemoryPlan:
        """prefix_cache_bytes: None for the Session's default (default_prefix_cache_bytes)."""
        if device not in RUNTIME_BASE:
            raise ValueError(f"device {device!r}: plan for 'cpu' or 'cuda'")
        llm, vision = config.llm, config.vision
        element = 2 if device == "cuda" else 4  # activations: fp16 on CUDA, fp32 on a CPU
        kv_element = 2 if quantized else element  # an INT4 model's KV cache is fp16 everywhere
        kv_per_token = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * kv_element
        context = min(max_context or llm.max_position_embeddings, llm.max_position_embeddings)
        hires = config.hires_grid**2 * vision.hidden_size
        bucket = 256 if device == "cuda" else 64  # kv_pool.KV_BUCKET / CPU_KV_BUCKET
        prefix_tokens = config.num_image_tokens + 64  # the system prompt, roles, the image
        batch_row = min(context, -(-(prefix_tokens + 128) // bucket) * bucket)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = default_prefix_cache_bytes(config.num_image_tokens, kv_per_token)
        per_image_vision = (config.num_image_tokens * llm.hidden_size + hires) * element
        # On a CPU, ONNX Runtime (chosen for small vision weights) folds them into fp32; the
        # torch backend (chosen past runtime/vision.ONNXRUNTIME_CPU_LIMIT) and CUDA keep fp16.
        from rgpt_rt.runtime.vision import ONNXRUNTIME_CPU_LIMIT

        widened = device == "cpu" and vision_file_bytes <= ONNXRUNTIME_CPU_LIMIT
        vision_weights = vision_file_bytes * (2 if widened else 1)
        # a CPU leaves an untied embedding table in the file (loading.load_bundle_decoder); an
        # INT4 bundle's is fp16 (a plain bundle's dtype is not known here: it stays counted)
        in_file = device == "cpu" and quantized and not llm.tie_word_embeddings
        embed_in_file = llm.vocab_size * llm.hidden_size * 2 if in_file else 0
        return cls(
            device=device,
            llm_weights=llm_file_bytes - embed_in_file,
            embed_in_file=embed_in_file,
            vision_weights=vision_weights,
            kv_per_token=kv_per_token,
            max_context=context,
            max_batch=max_batch,
            batch_row=batch_row,
            vision_cache=vision_cache_bytes,
            prefix_cache=prefix_cache_bytes,
            per_image_vision=per_image_vision,
            # CUDA keeps a copy of the prefix; a CPU keeps the answer's cache itself (no copy)
            per_image_prefix=(prefix_tokens if device == "cuda" else batch_row) * kv_per_token,
            working=_working_set(config, prefix_tokens + 64, element, device),
            runtime=RUNTIME_BASE[device],
        )

    def fixed(self) -> int:
        """Everything but the KV cache of the calls in flight."""
        caches = min(
            self.vision_cache,
            self.per_image_vision * _fits(self.vision_cache, self.per_image_vision),
        )
        caches += min(
            self.prefix_cache,
            self.per_image_prefix * _fits(self.prefix_cache, self.per_image_prefix),
        )
        return self.llm_weights + self.vision_weights + caches + self.working + self.runtime

    def kv(self) -> int:
        """The KV cache of the largest call: one answer of max_context positions, or a
        describe_many batch of max_batch rows (each row holds its own copy of the prompt)."""
        return self.kv_per_token * max(self.max_context, self.max_batch * self.batch_row)

    def total(self) -> int:
        """Peak bytes with the largest call in flight."""
        return self.fixed() + self.kv()

    def longest_context(self, budget: int) -> int:
        """The longest context one call can use within `budget` (0: the weights alone do not fit)."""
        room = budget - self.fixed()
        return max(0, min(self.max_context, room // self.kv_per_token))

    def largest_batch(self, budget: int) -> int:
        """The most describe_many rows of a typical describe that fit within `budget`."""
        room = budget - self.fixed()
        return max(0, min(self.max_batch, room // (self.kv_per_token * self.batch_row)))

    def check(self, budget: int) -> None:
        need = self.total()
        if need <= budget:
            return
        context, batch = self.longest_context(budget), self.largest_batch(budget)
        if context >= 256 and batch >= 1:
            advice = f"set max_context={context} and max_batch={batch} (what fits)"
        else:
            advice = "the weights alone leave no room for a context: use a device with more memory"
        raise ValueError(
            f"this Session needs about {need / GiB:.2f} GiB (weights {self.weights() / GiB:.2f}, "
            f"KV cache {self.kv() / GiB:.2f} for max_context {self.max_context} or "
            f"{self.max_batch} batched rows of {self.batch_row}, caches, working set and "
            f"runtime {(need - self.weights() - self.kv()) / GiB:.2f}) but the budget is "
            f"{budget / GiB:.2f} GiB; {advice}, or lower the cache sizes"
        )

    def weights(self) -> int:
        return self.llm_weights + self.vision_weights

    def table(self, budget: int | None = None) -> str:
        """A markdown table a user can read before loading."""
        llm_note = "exact: llm.safetensors as loaded"
        if self.embed_in_file:
            llm_note += (
                f" less its {self.embed_in_file / MiB:,.0f} MiB embedding table (read by rows)"
            )
        rows = [
            ("LLM weights", self.llm_weights, llm_note),
            ("vision weights", self.vision_weights, "as held by the vision backend"),
            ("KV cache per 1k positions", self.kv_per_token * 1024, "fp16 for an INT4 model"),
            (f"KV cache at max_context {self.max_context}", self.kv_per_token * self.max_context, ""),
            (f"KV cache of describe_many, {self.max_batch} rows", self.kv_per_token * self.max_batch * self.batch_row, f"{self.batch_row} positions a row"),
            ("vision cache (budget)", self.vision_cache, f"room for {_fits(self.vision_cache, self.per_image_vision)} × {self.per_image_vision / MiB:.0f} MiB (one image each)"),
            ("prefix cache (budget)", self.prefix_cache, f"room for {_fits(self.prefix_cache, self.per_image_prefix)} × {self.per_image_prefix / MiB:.0f} MiB (one image prefix each)"),
            ("working set of one call", self.working, "estimate"),
            ("runtime (Python, torch, ONNX Runtime)", self.runtime, "estimate, measured on x86"),
            ("total, largest call in flight", self.total(), ""),
        ]  # fmt: skip
        lines = [f"memory plan ({self.device})", "", "| part | MiB | note |", "|---|---:|---|"]
        lines += [f"| {name} | {value / MiB:,.0f} | {note} |" for name, value, note in rows]
        if budget is not None:
            fits, batch = self.longest_context(budget), self.largest_batch(budget)
            if self.total() <= budget:
                verdict = "fits as configured"
            elif fits >= min(256, self.max_context) and batch >= 1:
                verdict = (
                    f"does not fit as configured (max_context {self.max_context}, max_batch "
                    f"{self.max_batch}); fits with max_context={fits} and max_batch={batch}"
                )
            else:
                verdict = "does not fit: the weights leave no room for a context"
            lines += ["", f"budget {budget / GiB:.2f} GiB: {verdict}"]
        return "\n".join(lines)


def _fits(budget: int, item: int) -> int:
    return budget // item if item else 0


def _working_set(config: RGPTConfig, tokens: int, element: int, device: str) -> int:
    """Activations of one prefill of `tokens` (hidden states, the MLP's two intermediates,
    fp32 attention scores per head, logits of the last token) plus, on CUDA, the prefill's
    dequantized weight workspace of the largest linear."""
    llm = config.llm
    hidden = tokens * (6 * llm.hidden_size + 3 * llm.intermediate_size) * element
    scores = llm.num_heads * tokens * tokens * 4
    logits = llm.vocab_size * 4 * 16
    workspace = 2 * llm.intermediate_size * llm.hidden_size * 2 if device == "cuda" else 4 * MiB
    return hidden + scores + logits + workspace
